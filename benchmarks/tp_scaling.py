"""Throughput of the offline workload at several tensor-parallel sizes, in one call, and greedy agreement.

    NCCL_NVLS_ENABLE=0 python benchmarks/tp_scaling.py --model meta-llama/Llama-3.1-8B --tps 1,2
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

from offline import workload  # noqa: E402

from minisgl_jax import SamplingParams  # noqa: E402
from minisgl_jax.config import EngineArgs  # noqa: E402
from minisgl_jax.engine import Engine  # noqa: E402
from minisgl_jax.engine.setup import enable_compile_cache  # noqa: E402


def run(args: argparse.Namespace, spec: str) -> dict:
    """spec: TP or TP:ALL_REDUCE (e.g. 2:xla)."""
    tp, _, all_reduce = spec.partition(":")
    tp = int(tp)
    started = time.perf_counter()
    engine = Engine(EngineArgs(
        model=args.model, load_format="dummy", tp=tp, dtype=args.dtype, cache="naive", max_model_len=args.max_model_len,
        compile_cache_dir=args.compile_cache_dir, max_running_requests=args.max_running_requests,
        decode_steps=args.decode_steps, all_reduce=all_reduce or "auto",
    ))
    startup = time.perf_counter() - started
    greedy_prompts = [[(7 * i + 13 * j) % 10000 for j in range(128)] for i in range(8)]
    greedy = engine.generate(greedy_prompts, SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True))
    prompts, output_lens = workload(args.num_requests, args.min_len, args.max_len)
    if args.prompt_len:
        prompts = [p[: args.prompt_len] for p in prompts]
    params = [SamplingParams(temperature=0.6, max_tokens=n, ignore_eos=True) for n in output_lens]
    timing_before = dict(engine.timing)
    start = time.perf_counter()
    outputs = engine.generate(prompts, params)
    seconds = time.perf_counter() - start
    timing = {k: engine.timing[k] - v for k, v in timing_before.items()}
    tokens = sum(len(o) for o in outputs)
    engine.check_kv_invariant()
    result = dict(tp=tp, all_reduce=engine.runner.all_reduce.mode, seconds=seconds, output_tokens=tokens,
                  tokens_per_s=tokens / seconds, startup_s=startup, kv_pages=engine.allocator.num_usable,
                  greedy=greedy, timing=timing)
    del engine
    gc.collect()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="meta-llama/Llama-3.1-8B")
    parser.add_argument("--tps", default="1,2", help="comma-separated TP or TP:ALL_REDUCE (e.g. 1,2,2:xla)")
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--min-len", type=int, default=100)
    parser.add_argument("--max-len", type=int, default=1024)
    parser.add_argument("--max-running-requests", type=int, default=256)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--prompt-len", type=int, default=0, help="cut prompts to this length: a decode-heavy run")
    parser.add_argument("--dtype", default="bfloat16", help="float32 separates kernel bugs from bf16 near-ties")
    parser.add_argument("--decode-steps", type=int, default=4, help="1: no decode bursts")
    parser.add_argument("--compile-cache-dir", default="~/.cache/minisgl_jax/xla")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    enable_compile_cache(args.compile_cache_dir)
    results = [run(args, spec) for spec in args.tps.split(",")]
    print(f"\ndtype {args.dtype}, decode_steps {args.decode_steps}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    base = results[0]
    print(f"\n{args.model}, {args.num_requests} requests\n| tp | all-reduce | seconds | output tok/s | speed-up | "
          f"start-up s | KV pages | greedy = tp{base['tp']} |\n| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        same = sum(a == b for a, b in zip(r["greedy"], base["greedy"]))
        speedup = r["tokens_per_s"] / base["tokens_per_s"]
        print(f"| {r['tp']} | {r['all_reduce']} | {r['seconds']:.2f} | {r['tokens_per_s']:.0f} | {speedup:.2f}x "
              f"| {r['startup_s']:.0f} | {r['kv_pages']} | {same}/8 |")
    print("\n| tp | all-reduce | engine step s | of it waiting for the device s | launching s |"
          "\n| --- | --- | --- | --- | --- |")
    for r in results:
        t = r["timing"]
        print(f"| {r['tp']} | {r['all_reduce']} | {t['step_s']:.2f} | {t['wait_s']:.2f} | {t['launch_s']:.2f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
