"""Where a decode step's device time goes: a JAX profiler trace of steady decode, summed by kernel.

    python benchmarks/profile_decode.py --batch 1 --context 1024 --out-dir /tmp/trace
    NCCL_NVLS_ENABLE=0 python benchmarks/profile_decode.py --model meta-llama/Llama-3.1-8B --tp 2 --batch 256

With --tp N the table is GPU 0's and the idle line is given per GPU: in a tensor-parallel step
the GPUs meet at every all-reduce, so one waiting for the other shows as time inside the
collective's kernel, and the host falling behind shows as idle time.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import logging
import re

import jax
import numpy as np

from minisgl_jax import LLM, SamplingParams
from minisgl_jax.engine.batch import ScheduledBatch, ScheduledRow, StepKey, build_step_batch
from minisgl_jax.engine.request import Phase


def trace_events(trace_dir: str) -> tuple[dict[str, list[dict]], list[dict]]:
    """Complete events ("X") of the newest perfetto trace under trace_dir: each GPU's by GPU name,
    and the host's."""
    path = sorted(glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True))[-1]
    with gzip.open(path) as f:
        trace = json.load(f)
    names = {}
    for ev in trace["traceEvents"]:
        if ev.get("ph") == "M" and ev.get("name") == "process_name":
            names[ev["pid"]] = ev["args"]["name"]
    by_gpu: dict[str, list[dict]] = collections.defaultdict(list)
    host = []
    for ev in trace["traceEvents"]:
        if ev.get("ph") != "X":
            continue
        if "/device:GPU" in names.get(ev.get("pid"), ""):
            by_gpu[names[ev["pid"]]].append(ev)
        else:
            host.append(ev)
    return dict(sorted(by_gpu.items())), host


def command_buffer_calls(host: list[dict], steps: int, gpus: int) -> dict[str, tuple[float, float]]:
    """XLA's CUDA-graph work on the host, per step and GPU: {"execute" | "update": (calls, µs)}.

    Every thunk that cannot be captured (a collective, say) splits the step's graph; each piece is
    launched, and updated when an address it uses has moved, on its own."""
    out = {}
    for kind in ("execute", "update"):
        events = [ev for ev in host if ev["name"] == f"command_buffer::{kind}"]
        out[kind] = (len(events) / steps / gpus, sum(ev.get("dur", 0) for ev in events) / steps / gpus)
    return out


# XLA names each of its collective kernels after its own instruction (all_reduce_6_0_fusion_1, ...):
# summed under one name, or 65 all-reduces of 20 µs each hide below the top of the table.
COLLECTIVE_KERNEL = re.compile(r"^(all_reduce|all_gather|reduce_scatter)_[0-9_]+fusion(_[0-9]+)?$")


def kernel_table(events: list[dict], steps: int, top: int) -> list[tuple[str, float, float]]:
    """(kernel name, µs per step, launches per step)."""
    total, count = collections.Counter(), collections.Counter()
    for ev in events:
        name = COLLECTIVE_KERNEL.sub(r"\1_*_fusion (XLA collective kernels)", ev["name"])
        total[name] += ev.get("dur", 0)
        count[name] += 1
    rows = [(name, us / steps, count[name] / steps) for name, us in total.most_common(top)]
    rows.append(("ALL", sum(total.values()) / steps, sum(count.values()) / steps))
    return rows


GAP_BOUNDS_US = (20.0, 200.0)  # launch gaps inside a step / stalls / the host between steps


def idle_time(events: list[dict]) -> tuple[float, list[float]]:
    """(span µs from the first kernel's start to the last one's end, idle µs in it by gap length).

    The idle time is what the host failed to hide: the GPU waiting for the next launch. It is
    split by the length of each gap: under 20 µs, 20-200 µs, over 200 µs.
    """
    intervals = sorted((ev["ts"], ev["ts"] + ev.get("dur", 0)) for ev in events)
    idle, busy_until = [0.0] * (len(GAP_BOUNDS_US) + 1), intervals[0][0]
    for start, end in intervals:
        gap = max(0.0, start - busy_until)
        idle[sum(gap >= bound for bound in GAP_BOUNDS_US)] += gap
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
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--all-reduce", default="auto", help="auto, xla, psum, peer (tp > 1)")
    parser.add_argument("--no-overlap", action="store_true", help="read each step's tokens before the next step")
    parser.add_argument("--decode-steps", type=int, default=1, help="decode steps per launch (1: one step per launch)")
    parser.add_argument("--hlo-out", default=None, help="write the decode bucket's compiled HLO here (fusion names)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    llm = LLM(args.model, load_format="dummy", cache="naive", max_model_len=args.max_model_len,
              compile_cache_dir=args.compile_cache_dir, overlap=not args.no_overlap,
              decode_buckets=[max(8, args.batch)], tp=args.tp, max_running_requests=max(args.batch, 8),
              decode_steps=args.decode_steps, all_reduce=args.all_reduce,
              background_compile=False)  # greedy only: no variant compiles inside the trace
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
    by_gpu, host = trace_events(args.out_dir)
    first = next(iter(by_gpu))
    print(f"\n{args.model}, tp {args.tp}, batch {args.batch}, context {args.context}: {first} time per decode step by kernel")
    print("| kernel | µs per step | launches per step |\n| --- | --- | --- |")
    for name, us, n in kernel_table(by_gpu[first], args.steps, args.top):
        print(f"| {name[:90]} | {us:.1f} | {n:.1f} |")
    print("\n| GPU | batch | overlap | steps | µs per step | GPU idle µs per step | idle share "
          "| idle in gaps <20 / 20-200 / >200 µs, per step |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for gpu, events in by_gpu.items():
        span, idle = idle_time(events)
        split = " / ".join(f"{part / args.steps:.0f}" for part in idle)
        print(f"| {gpu} | {args.batch} | {not args.no_overlap} | {args.steps} | {span / args.steps:.0f} "
              f"| {sum(idle) / args.steps:.0f} | {sum(idle) / span:.1%} | {split} |")
    graphs = command_buffer_calls(host, args.steps, len(by_gpu))
    print("\nhost, per step and GPU: " + ", ".join(
        f"command_buffer::{kind} {calls:.1f} calls, {us:.0f} µs" for kind, (calls, us) in graphs.items()))
    if args.hlo_out:
        write_decode_hlo(engine, args.hlo_out)


def write_decode_hlo(engine, path: str) -> None:
    """The compiled HLO of the step that just ran (a burst where the engine ran one), so the trace's
    fusion names can be read in it."""
    size = engine.buckets.shape(True, len(engine.scheduler.running), 0)[0]
    num_steps = engine.args.decode_steps if size in engine.buckets.burst_buckets() else 1
    rows = [ScheduledRow(r, r.kv_len - num_steps, 1, samples=True, token_index=0, steps=num_steps)
            for r in engine.scheduler.running]
    scheduled = ScheduledBatch(rows=rows, is_decode=True, num_steps=num_steps)
    batch = build_step_batch(scheduled, size, size, engine.batch_constants)
    with open(path, "w") as f:
        f.write(engine.runner.lower_text(batch, StepKey(True, scheduled.sample_mode, num_steps=num_steps)))


if __name__ == "__main__":
    main()
