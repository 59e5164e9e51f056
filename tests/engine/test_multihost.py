"""Two processes as two hosts (jax.distributed on CPU): tp=2 across them gives the tp=1 tokens, for
a grammar-constrained request too (each host fills the masks; node 0 says when its grammar is ready)."""

import json
import os
import socket
import subprocess
import sys

import pytest

from minisgl_jax.config import EngineArgs
from minisgl_jax.core import SamplingParams
from minisgl_jax.engine import Engine
from tiny_models import save_tiny_checkpoint

pytestmark = pytest.mark.slow  # processes and engines of its own

PROMPTS = [[5, 17, 99, 3, 250, 42, 7], list(range(30, 71)), [8, 9, 10]]
PARAMS = [dict(temperature=0.0, max_tokens=8, ignore_eos=True)] * 2 + [
    dict(temperature=1.0, seed=3, max_tokens=12, regex="[a-d]{2}-[0-9]{3}")
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_hosts_follow_node_zero(tmp_path):
    path = save_tiny_checkpoint(str(tmp_path / "m"), "qwen3", seed=4)
    single = Engine(EngineArgs(
        model=path, dtype="float32", attention_backend="reference", cache="naive", num_pages=64,
        max_running_requests=4, max_prefill_tokens=64, compile_cache_dir=None, warmup=False,
    )).generate(PROMPTS, [SamplingParams(**p) for p in PARAMS])

    port, out = free_port(), tmp_path / "out.json"
    node = os.path.join(os.path.dirname(__file__), "multihost_node.py")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = [
        subprocess.Popen([sys.executable, node, str(rank), str(port), path, str(out), json.dumps(PROMPTS),
                          json.dumps(PARAMS)], env=env)
        for rank in (0, 1)
    ]
    try:
        codes = [p.wait(timeout=240) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert codes == [0, 0]
    assert json.loads(out.read_text()) == single
