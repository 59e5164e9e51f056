"""The first requests after start-up: do they wait for compiles?

Start-up compiles the plain step programs; top-k/top-p/min-p and logprobs variants compile in a
background thread while the engine is idle (`--no-background-compile`: on first use). This runs
one workload (256 requests, 128-token prompts, 100-400 new tokens, temperature 0.7) right after
start-up (plain), again once the background compiler is done (plain), then with top_p twice,
then with top_k and logprobs, and reports each pass's seconds and the programs compiled meanwhile.

    python benchmarks/first_requests.py --model meta-llama/Llama-3.1-8B --compile-cache-dir /tmp/xla [--no-background-compile]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

from offline import workload  # noqa: E402

from minisgl_jax import SamplingParams  # noqa: E402
from minisgl_jax.config import EngineArgs  # noqa: E402
from minisgl_jax.engine import Engine  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="meta-llama/Llama-3.1-8B")
    parser.add_argument("--load-format", default="dummy")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--compile-cache-dir", default="/tmp/xla")
    parser.add_argument("--no-background-compile", action="store_true")
    args = parser.parse_args()

    started = time.perf_counter()
    engine = Engine(EngineArgs(
        model=args.model, load_format=args.load_format, max_model_len=args.max_model_len,
        compile_cache_dir=args.compile_cache_dir or None, background_compile=not args.no_background_compile,
    ))
    programs = engine.runner.programs.compiled
    print(f"ready in {time.perf_counter() - started:.1f} s (programs {engine.warmup_seconds:.1f} s): {len(programs)} programs")
    prompts, lens = workload(256, 100, 1024)
    vocab = engine.model_config.vocab_size  # a tiny test model's may be below the workload's 10,000 ids
    prompts, lens = [[t % vocab for t in p[:128]] for p in prompts], [min(n, 400) for n in lens]
    print("| pass | seconds | output tok/s | programs compiled during it |")
    print("| --- | --- | --- | --- |")

    def run(name: str, **sampling) -> None:
        params = [SamplingParams(temperature=0.7, max_tokens=n, ignore_eos=True, seed=i, **sampling)
                  for i, n in enumerate(lens)]
        before, start = len(programs), time.perf_counter()
        outputs = engine.generate(prompts, params)
        seconds = time.perf_counter() - start
        print(f"| {name} | {seconds:.2f} | {sum(map(len, outputs)) / seconds:,.0f} | {len(programs) - before} |", flush=True)

    run("plain, right after start-up")
    if engine.background_compiler is not None:
        idle = time.perf_counter()
        engine.background_compiler.thread.join()
        print(f"| background compiler done after {time.perf_counter() - idle:.1f} s idle | | | {len(programs)} in all |")
    run("plain")
    run("top_p 0.9, first", top_p=0.9)
    run("top_p 0.9, again", top_p=0.9)
    run("top_k 20 + 2 logprobs, first", top_k=20, logprobs=2)
    engine.check_kv_invariant()


if __name__ == "__main__":
    main()
