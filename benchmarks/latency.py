"""Decode latency per token at batch 1..N, the same step with no host in the loop, and prefill latency.

    python benchmarks/latency.py --model Qwen/Qwen3-0.6B --load-format dummy
    NCCL_NVLS_ENABLE=0 python benchmarks/latency.py --model meta-llama/Llama-3.1-8B --tp 2 --batches 256

"device-only" replays the last decode batch through the compiled step back to back, so the
difference to "engine" is host time the overlap did not hide; "launch" is the host time of one
call that dispatches the compiled step (packing the batch, the transfer, XLA's launch), and
"fixed input" the same with the packed batch already on the device, in one buffer. The
engine's own step splits into launching, waiting for the device's tokens, and the rest (scheduling,
building the batch, bookkeeping). Small batches decode in bursts of --decode-steps steps per
launch; "device-only burst" replays such a burst back to back.
"""

from __future__ import annotations

import argparse
import json
import logging
import time

import jax
import numpy as np

from minisgl_jax import LLM, SamplingParams
from minisgl_jax.engine.batch import ScheduledBatch, ScheduledRow, StepKey, build_step_batch, pack_batch
from minisgl_jax.engine.programs import ProgramKey
from minisgl_jax.engine.request import Phase


def decode_latency(llm: LLM, batch: int, context: int, steps: int) -> dict[str, float]:
    engine = llm.engine
    rng = np.random.default_rng(batch)
    params = SamplingParams(temperature=0.0, max_tokens=steps + 128, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"lat-{batch}-{i}", rng.integers(0, min(10000, engine.model_config.vocab_size), context).tolist(), params)
    while any(r.phase is not Phase.DECODE for r in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()
    for _ in range(4):
        engine.step()
    before = dict(engine.timing)
    launches = engine.stats()["steps"]
    start = time.perf_counter()
    tokens = 0
    while tokens < steps * batch:  # a burst step yields several tokens per request
        tokens += sum(len(out.new_token_ids) for out in engine.step())
    per_request = tokens / batch
    engine_ms = (time.perf_counter() - start) / per_request * 1e3
    spent = {k: (engine.timing[k] - before[k]) / per_request * 1e3 for k in before}
    tokens_per_launch = per_request / (engine.stats()["steps"] - launches)

    rows = [ScheduledRow(r, r.kv_len - 1, 1, samples=True, token_index=0) for r in engine.scheduler.running]
    scheduled = ScheduledBatch(rows=rows, is_decode=True)
    size = engine.buckets.shape(True, len(rows), len(rows))[0]
    step_batch = build_step_batch(scheduled, size, size, engine.batch_constants)
    key = StepKey(is_decode=True, sample_mode=scheduled.sample_mode)
    run = lambda: engine.runner.run(step_batch, key)  # noqa: E731
    run().ids.block_until_ready()
    launch = 0.0
    start = time.perf_counter()
    for _ in range(steps):
        launched = time.perf_counter()
        out = run()
        launch += time.perf_counter() - launched
    out.ids.block_until_ready()
    device_ms = (time.perf_counter() - start) / steps * 1e3

    burst_ms = float("nan")
    burst = engine.args.decode_steps
    if size in engine.buckets.burst_buckets():  # the burst program replayed: positions already written, rewritten
        rows = [ScheduledRow(r, r.kv_len - burst, 1, samples=True, token_index=0, steps=burst)
                for r in engine.scheduler.running]
        burst_batch = build_step_batch(
            ScheduledBatch(rows=rows, is_decode=True, num_steps=burst), size, size, engine.batch_constants,
        )
        burst_key = StepKey(is_decode=True, sample_mode=scheduled.sample_mode, num_steps=burst)
        replay_burst = lambda: engine.runner.run(burst_batch, burst_key)  # noqa: E731
        replay_burst().ids.block_until_ready()
        start = time.perf_counter()
        for _ in range(steps // burst):
            out = replay_burst()
        out.ids.block_until_ready()
        burst_ms = (time.perf_counter() - start) / (steps // burst * burst) * 1e3

    # The same step on one packed buffer already on the device: no transfer, and an input address
    # that never changes, so the graph nodes that read the batch need no update (outputs and
    # temporaries may still move).
    packed, layout = pack_batch(step_batch)
    packed = jax.device_put(packed)
    replay = lambda: engine.runner.run_packed(packed, ProgramKey(layout, key))  # noqa: E731
    replay().ids.block_until_ready()
    fixed_launch = 0.0
    for _ in range(steps):
        launched = time.perf_counter()
        out = replay()
        fixed_launch += time.perf_counter() - launched
    out.ids.block_until_ready()

    start = time.perf_counter()
    for _ in range(steps):
        build_step_batch(scheduled, size, size, engine.batch_constants)
    build_ms = (time.perf_counter() - start) / steps * 1e3

    for rid in list(engine.requests):
        engine.abort_request(rid)
    while engine.has_unfinished():
        engine.step()
    engine.check_kv_invariant()
    return dict(batch=batch, context=context, engine_ms_per_token=engine_ms, tokens_per_launch=tokens_per_launch,
                device_only_ms_per_step=device_ms, device_only_burst_ms_per_token=burst_ms,
                launch_ms=launch / steps * 1e3, fixed_input_launch_ms=fixed_launch / steps * 1e3,
                host_build_ms=build_ms, engine_launch_ms=spent["launch_s"],
                engine_wait_ms=spent["wait_s"], engine_other_ms=spent["step_s"] - spent["launch_s"] - spent["wait_s"])


def prefill_latency(llm: LLM, length: int, reps: int = 3) -> dict[str, float]:
    """Time to first token of one request with a `length`-token prompt."""
    rng = np.random.default_rng(length)
    times = []
    for _ in range(reps + 1):
        prompt = rng.integers(0, min(10000, llm.engine.model_config.vocab_size), length).tolist()
        start = time.perf_counter()
        llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=1))
        times.append(time.perf_counter() - start)
    return dict(prompt_len=length, ttft_ms=float(np.median(times[1:])) * 1e3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="Qwen/Qwen3-0.6B")
    parser.add_argument("--load-format", default="dummy")
    parser.add_argument("--quantization", default=None, help="fp8: FP8 weights (random block-wise ones with dummy)")
    parser.add_argument("--attention-backend", default="pallas")
    parser.add_argument("--moe-backend", default="auto", help="experts' grouped GEMM: auto, ragged_dot, pallas")
    parser.add_argument("--kv-cache-dtype", default="auto", help="auto (the model's dtype) or fp8_e4m3")
    parser.add_argument("--batches", default="1,8,64,256")
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--prompt-lens", default="128,512,2048,8192")
    parser.add_argument("--max-model-len", type=int, default=9216)
    parser.add_argument("--compile-cache-dir", default="~/.cache/minisgl_jax/xla")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--all-reduce", default="auto", help="auto, xla, psum, peer (tp > 1)")
    parser.add_argument("--moe-parallel", default="tp", help="tp or ep: a mixture of experts' experts at tp > 1")
    parser.add_argument("--no-overlap", action="store_true")
    parser.add_argument("--decode-steps", type=int, default=4, help="decode steps per launch of small batches")
    parser.add_argument("--max-prefill-tokens", type=int, default=8192)
    parser.add_argument("--num-pages", type=int, default=None, help="KV pages (default: sized from free memory)")
    parser.add_argument("--decode-buckets", default=None, help="compile only these (default: the engine's)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    llm = LLM(
        args.model, load_format=args.load_format, quantization=args.quantization,
        attention_backend=args.attention_backend, moe_backend=args.moe_backend, cache="naive", kv_cache_dtype=args.kv_cache_dtype,
        max_model_len=args.max_model_len, compile_cache_dir=args.compile_cache_dir, overlap=not args.no_overlap,
        decode_steps=args.decode_steps, tp=args.tp, moe_parallel=args.moe_parallel, num_pages=args.num_pages,
        all_reduce=args.all_reduce,
        max_prefill_tokens=args.max_prefill_tokens, background_compile=False,  # plain sampling only
        decode_buckets=[int(b) for b in args.decode_buckets.split(",")] if args.decode_buckets else [],
    )
    decode = [decode_latency(llm, int(b), args.context, args.steps) for b in args.batches.split(",")]
    prefill = [prefill_latency(llm, int(n)) for n in args.prompt_lens.split(",")]
    print("\n| batch | context | engine ms/token | tokens per launch | device-only ms/step | device-only burst ms/token "
          "| launch ms | launch ms, fixed input | host batch build ms | engine per token: launch / wait / other ms |"
          "\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for d in decode:
        print(f"| {d['batch']} | {d['context']} | {d['engine_ms_per_token']:.2f} | {d['tokens_per_launch']:.2f} "
              f"| {d['device_only_ms_per_step']:.2f} | {d['device_only_burst_ms_per_token']:.2f} "
              f"| {d['launch_ms']:.2f} | {d['fixed_input_launch_ms']:.2f} | {d['host_build_ms']:.2f} "
              f"| {d['engine_launch_ms']:.2f} / {d['engine_wait_ms']:.2f} / {d['engine_other_ms']:.2f} |")
    print("\n| prompt tokens | time to first token ms |\n| --- | --- |")
    for p in prefill:
        print(f"| {p['prompt_len']} | {p['ttft_ms']:.1f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(decode=decode, prefill=prefill, overlap=not args.no_overlap,
                           moe_backend=llm.engine.model_config.moe_backend), f, indent=2)


if __name__ == "__main__":
    main()
