"""One node of the two-process multi-host test: node 0 generates, node 1 follows."""

import json
import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"

from minisgl_jax.config import EngineArgs  # noqa: E402
from minisgl_jax.core import SamplingParams  # noqa: E402
from minisgl_jax.engine import Engine  # noqa: E402
from minisgl_jax.engine.multihost import follow  # noqa: E402


def main() -> None:
    rank, port, model, out_path = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    prompts, params = json.loads(sys.argv[5]), [SamplingParams(**p) for p in json.loads(sys.argv[6])]
    engine = Engine(EngineArgs(
        model=model, dtype="float32", attention_backend="reference", cache="naive", num_pages=64, page_size=16,
        max_running_requests=4, max_prefill_tokens=64, compile_cache_dir=None, warmup=True, background_compile=False, tp=2,
        nnodes=2, node_rank=rank, coordinator=f"127.0.0.1:{port}",
    ))
    if rank == 0:
        outputs = engine.generate(prompts, params)
        engine.check_kv_invariant()
        engine.shutdown()
        with open(out_path, "w") as f:
            json.dump(outputs, f)
    else:
        follow(engine)
        engine.check_kv_invariant()


if __name__ == "__main__":
    main()
