"""Where a decode step's device time goes: a JAX profiler trace of steady decode, summed by kernel.

    python benchmarks/profile_decode.py --batch 1 --context 1024 --out-dir /tmp/trace
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import logging

import jax
import numpy as np

from minisgl_jax import LLM, SamplingParams
from minisgl_jax.engine.request import Phase


def gpu_events(trace_dir: str) -> list[dict]:
    """The GPU's complete events ("X") of the newest perfetto trace under trace_dir."""
    path = sorted(glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True))[-1]
    with gzip.open(path) as f:
        trace = json.load(f)
    names = {}
    for ev in trace["traceEvents"]:
        if ev.get("ph") == "M" and ev.get("name") == "process_name":
            names[ev["pid"]] = ev["args"]["name"]
    gpu_pids = {pid for pid, name in names.items() if "/device:GPU" in name}
    return [ev for ev in trace["traceEvents"] if ev.get("ph") == "X" and ev.get("pid") in gpu_pids]


def kernel_table(events: list[dict], steps: int, top: int) -> list[tuple[str, float, float]]:
    """(kernel name, µs per step, launches per step)."""
    total, count = collections.Counter(), collections.Counter()
    for ev in events:
        total[ev["name"]] += ev.get("dur", 0)
        count[ev["name"]] += 1
    rows = [(name, us / steps, count[name] / steps) for name, us in total.most_common(top)]
    rows.append(("ALL", sum(total.values()) / steps, sum(count.values()) / steps))
    return rows


def idle_time(events: list[dict]) -> tuple[float, float]:
    """(span µs from the first kernel's start to the last one's end, µs in it with no kernel running).

    The idle time is what the host failed to hide: the GPU waiting for the next launch.
    """
    intervals = sorted((ev["ts"], ev["ts"] + ev.get("dur", 0)) for ev in events)
    idle, busy_until = 0.0, intervals[0][0]
    for start, end in intervals:
        idle += max(0.0, start - busy_until)
        busy_until = max(busy_until, end)
    return busy_until - intervals[0][0], idle


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="Qwen/Qwen3-0.6B")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--max-model-len", type=int, default=9216)
    parser.add_argument("--compile-cache-dir", default="~/.cache/minisgl_jax/xla")
    parser.add_argument("--out-dir", default="/tmp/minisgl_trace")
    parser.add_argument("--no-overlap", action="store_true", help="read each step's tokens before the next step")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    llm = LLM(args.model, load_format="dummy", cache="naive", max_model_len=args.max_model_len,
              compile_cache_dir=args.compile_cache_dir, overlap=not args.no_overlap,
              decode_buckets=[max(8, args.batch)])
    engine = llm.engine
    rng = np.random.default_rng(0)
    params = SamplingParams(temperature=0.0, max_tokens=args.steps + 64, ignore_eos=True)
    for i in range(args.batch):
        engine.add_request(f"p{i}", rng.integers(0, 10000, args.context).tolist(), params)
    while any(r.phase is not Phase.DECODE for r in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()
    for _ in range(4):
        engine.step()
    jax.block_until_ready(engine.runner.kv_pool)
    with jax.profiler.trace(args.out_dir, create_perfetto_trace=True):
        for _ in range(args.steps):
            engine.step()
        jax.block_until_ready(engine.runner.kv_pool)
    events = gpu_events(args.out_dir)
    print(f"\nbatch {args.batch}, context {args.context}: device time per decode step by kernel")
    print("| kernel | µs per step | launches per step |\n| --- | --- | --- |")
    for name, us, n in kernel_table(events, args.steps, args.top):
        print(f"| {name[:90]} | {us:.1f} | {n:.1f} |")
    span, idle = idle_time(events)
    print("\n| batch | overlap | steps | µs per step | GPU idle µs per step | idle share |")
    print("| --- | --- | --- | --- | --- | --- |")
    print(f"| {args.batch} | {not args.no_overlap} | {args.steps} | {span / args.steps:.0f} | {idle / args.steps:.0f} "
          f"| {idle / span:.1%} |")


if __name__ == "__main__":
    main()
