"""Test session set-up: 8 host devices for tensor-parallel tests, CPU JAX, a shared compile cache."""

import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# One persistent XLA cache for the session, new each run: the many small engines the tests build
# compile the same programs again and again (test_scheduling.py: 134 s without it, 69 s with it).
# Under pytest-xdist each worker takes a folder of its own in it: JAX writes an entry in place, so a
# worker could read another's half-written one.
_SESSION_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _SESSION_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="minisgl-test-xla-")
    os.environ["MINISGL_TEST_XLA_CACHE"] = _SESSION_CACHE
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
elif "PYTEST_XDIST_WORKER" in os.environ and os.environ.get("MINISGL_TEST_XLA_CACHE") == os.environ[
        "JAX_COMPILATION_CACHE_DIR"]:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(
        os.environ["MINISGL_TEST_XLA_CACHE"], os.environ["PYTEST_XDIST_WORKER"])


def pytest_unconfigure(config) -> None:
    if _SESSION_CACHE is not None:
        shutil.rmtree(_SESSION_CACHE, ignore_errors=True)


def pytest_collection_modifyitems(config, items) -> None:
    """Files that build engines or start servers first (any test marked slow, or under tests/server),
    each file's tests kept together and in order: pytest-xdist's loadfile hands out files in this
    order, so both workers end on short files at about the same time."""
    long_files = {item.path for item in items if item.get_closest_marker("slow") or "server" in item.path.parts}
    order = {id(item): i for i, item in enumerate(items)}
    items.sort(key=lambda item: (item.path not in long_files, str(item.path), order[id(item)]))
