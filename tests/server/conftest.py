"""One tiny checkpoint and one shared server for the end-to-end tests; a compile cache they share."""

import pytest
from server_process import ServerProcess
from tiny_models import save_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    return save_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny-qwen3")), "qwen3")


@pytest.fixture(scope="session")
def compile_cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("xla-cache"))


@pytest.fixture(scope="session")
def server(tiny_model_dir, compile_cache, tmp_path_factory):
    log = str(tmp_path_factory.mktemp("logs") / "server.log")
    proc = ServerProcess(tiny_model_dir, log, "--max-request-bytes", "65536", compile_cache=compile_cache)
    proc.wait_ready()
    yield proc
    assert proc.stop() == 0, proc.logs()
