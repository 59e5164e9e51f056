"""Two hosts behind one API (jax.distributed on CPU): node 0 serves HTTP and node 1 follows it.

tp=2 across the two processes answers as one process at tp=1 does (an engine in the test's process), and stopping node 0 stops node 1.
"""

import subprocess
import sys

import httpx
import pytest
from server_process import TEST_FLAGS, ServerProcess, free_port

pytestmark = pytest.mark.slow  # servers of its own

BODY = {"prompt": "two hosts, one answer", "max_tokens": 12, "temperature": 0, "ignore_eos": True}


def greedy_text(server: ServerProcess) -> str:
    response = httpx.post(server.url + "/v1/completions", json=BODY, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def single_process_text(model_dir: str) -> str:
    """The answer of one process at tp=1, in this process: an engine costs less than a third server."""
    from minisgl_jax.core import SamplingParams
    from minisgl_jax.llm import LLM

    llm = LLM(model_dir, dtype="float32", attention_backend="reference", compile_cache_dir=None, warmup=False,
              max_running_requests=4, max_prefill_tokens=64, num_pages=96, page_size=16)
    params = SamplingParams(temperature=0.0, max_tokens=BODY["max_tokens"], ignore_eos=True)
    return llm.generate(BODY["prompt"], params)[0].text


def test_node_zero_serves_and_node_one_follows(tiny_model_dir, compile_cache, tmp_path, monkeypatch):
    expected = single_process_text(tiny_model_dir)
    monkeypatch.delenv("XLA_FLAGS", raising=False)  # one CPU device per process, as one GPU per host

    nodes = ["--dtype", "float32", "--tp", "2", "--nnodes", "2", "--coordinator", f"127.0.0.1:{free_port()}"]
    leader = ServerProcess(tiny_model_dir, str(tmp_path / "node0.log"), *nodes, "--node-rank", "0",
                           compile_cache=compile_cache)
    with open(tmp_path / "node1.log", "w") as log:
        follower = subprocess.Popen(
            [sys.executable, "-m", "minisgl_jax", "--model", tiny_model_dir, *TEST_FLAGS, *nodes, "--node-rank", "1",
             "--compile-cache-dir", compile_cache], stdout=log, stderr=subprocess.STDOUT)
    try:
        leader.wait_ready()
        assert greedy_text(leader) == expected
        with httpx.stream("POST", leader.url + "/v1/completions", json={**BODY, "stream": True}, timeout=60) as r:
            lines = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert lines[-1] == "data: [DONE]" and len(lines) > 2
        assert leader.stop() == 0, leader.logs()
        assert follower.wait(20) == 0
        assert "node 0 said stop" in (tmp_path / "node1.log").read_text()
    finally:
        follower.kill()
        leader.stop()
