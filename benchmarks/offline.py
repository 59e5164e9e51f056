"""Offline throughput on Mini-SGLang's / nano-vLLM's bench.py workload, against the decode roofline.

256 requests, random.seed(0), prompts of randint(100, 1024) random token ids, max_tokens
randint(100, 1024) drawn after all prompts, ignore_eos, temperature 0.6; through `LLM.generate`.

    python benchmarks/offline.py --model Qwen/Qwen3-0.6B --load-format dummy
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

from report import emit  # noqa: E402
from roofline import Experts, decode_roofline_bytes, measure_copy_bandwidth  # noqa: E402

from minisgl_jax import LLM, SamplingParams  # noqa: E402
from minisgl_jax.engine import warmup  # noqa: E402
from minisgl_jax.engine.setup import enable_compile_cache  # noqa: E402

BACKGROUND_COMPILE_HELP = ("compile the top-p / logprobs variants while idle, as the engine does by default; off here: "
                           "this workload never uses them, and their compiles slow a cold-cache first run (RESULTS.md)")


def workload(num_requests: int, min_len: int, max_len: int) -> tuple[list[list[int]], list[int]]:
    random.seed(0)
    prompts = [[random.randint(0, 10000) for _ in range(random.randint(min_len, max_len))] for _ in range(num_requests)]
    output_lens = [random.randint(min_len, max_len) for _ in range(num_requests)]
    return prompts, output_lens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="Qwen/Qwen3-0.6B")
    parser.add_argument("--load-format", default="dummy")
    parser.add_argument("--quantization", default=None, help="fp8: FP8 weights (random block-wise ones with dummy)")
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--min-len", type=int, default=100)
    parser.add_argument("--max-len", type=int, default=1024)
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--max-prefill-tokens", type=int, default=8192)
    parser.add_argument("--max-running-requests", type=int, default=256)
    parser.add_argument("--attention-backend", default="pallas")
    parser.add_argument("--moe-backend", default="auto", help="experts' grouped GEMM: auto, ragged_dot, pallas")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--kv-cache-dtype", default="auto", help="auto (the model's dtype) or fp8_e4m3")
    parser.add_argument("--no-overlap", action="store_true")
    parser.add_argument("--decode-steps", type=int, default=4, help="decode steps per launch of small batches (1: off)")
    parser.add_argument("--burst-max-rows", type=int, default=None, help="the most rows a burst may have")
    parser.add_argument("--background-compile", action="store_true", help=BACKGROUND_COMPILE_HELP)
    parser.add_argument("--cache", default="radix", choices=["radix", "naive"])
    parser.add_argument("--compile-workers", type=int, default=0, help="buckets compiled at once (0: one per core)")
    parser.add_argument("--num-pages", type=int, default=None)
    parser.add_argument("--mem-fraction", type=float, default=0.85)
    parser.add_argument("--max-model-len", type=int, default=2048, help="context length (the workload needs 2048)")
    parser.add_argument("--compile-cache-dir", default="~/.cache/minisgl_jax/xla")
    parser.add_argument("--penalized", action="store_true",
                        help="then run the workload again with frequency_penalty=0.5, repetition_penalty=1.1 on every "
                             "request (the logits-processing programs compiled first, the prefix cache flushed) and "
                             "report its throughput as a fraction of the plain run's")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    enable_compile_cache(args.compile_cache_dir)  # before the first compile, or JAX ignores it
    copy_bw = measure_copy_bandwidth() if os.environ.get("JAX_PLATFORMS") != "cpu" else 0.0
    started = time.perf_counter()
    llm = LLM(
        args.model, load_format=args.load_format, quantization=args.quantization, page_size=args.page_size, max_prefill_tokens=args.max_prefill_tokens,
        max_running_requests=args.max_running_requests, attention_backend=args.attention_backend, dtype=args.dtype,
        moe_backend=args.moe_backend,
        kv_cache_dtype=args.kv_cache_dtype,
        overlap=not args.no_overlap, decode_steps=args.decode_steps, burst_max_rows=args.burst_max_rows,
        background_compile=args.background_compile, num_pages=args.num_pages,
        compile_cache_dir=args.compile_cache_dir, mem_fraction=args.mem_fraction, cache=args.cache,
        compile_workers=args.compile_workers, max_model_len=args.max_model_len,
    )
    startup = time.perf_counter() - started
    prompts, output_lens = workload(args.num_requests, args.min_len, args.max_len)
    params = [SamplingParams(temperature=0.6, max_tokens=n, ignore_eos=True) for n in output_lens]

    llm.generate(prompts[:2], [SamplingParams(temperature=0.6, max_tokens=8, ignore_eos=True)] * 2)  # prefill compiles
    start = time.perf_counter()
    results = llm.generate(prompts, params)
    seconds = time.perf_counter() - start

    engine = llm.engine
    out_tokens = sum(len(r.token_ids) for r in results)
    assert out_tokens == sum(output_lens), (out_tokens, sum(output_lens))
    engine.check_kv_invariant()
    kv_bytes_per_token = engine.model_config.kv_bytes_per_token(engine.runner.kv_dtype.itemsize)
    experts = Experts.of(engine.model_config, args.dtype)
    roof_bytes = decode_roofline_bytes([len(p) for p in prompts], output_lens, kv_bytes_per_token, engine.weights_bytes,
                                       experts)
    roof_seconds = roof_bytes / copy_bw if copy_bw else float("nan")
    report = dict(
        model=args.model, quantization=args.quantization, weights_bytes=engine.weights_bytes, device=str(engine.mesh.devices.flat[0].device_kind), requests=args.num_requests,
        prompt_tokens=sum(len(p) for p in prompts), output_tokens=out_tokens, seconds=seconds,
        output_tokens_per_s=out_tokens / seconds, copy_bandwidth_gbs=copy_bw / 1e9, roofline_seconds=roof_seconds,
        fraction_of_roofline=roof_seconds / seconds, startup_seconds=startup, load_seconds=engine.load_seconds,
        warmup_seconds=engine.warmup_seconds, steps=engine.stats()["steps"], burst_steps=engine.stats()["burst_steps"],
        decode_steps=args.decode_steps, burst_max_rows=engine.buckets.burst_max_rows,
        retractions=engine.stats()["num_retractions"], overlap=not args.no_overlap,
        attention_backend=args.attention_backend, moe_backend=engine.model_config.moe_backend, page_size=args.page_size,
        max_prefill_tokens=args.max_prefill_tokens, kv_pages=engine.allocator.num_usable,
        kv_cache_dtype=args.kv_cache_dtype, kv_tokens=engine.allocator.num_usable * args.page_size,
        host_s=engine.timing["step_s"] - engine.timing["wait_s"], wait_for_device_s=engine.timing["wait_s"],
    )
    if args.penalized:
        report.update(penalized_run(llm, prompts, output_lens, args.compile_workers, seconds))
    emit(report, args.out)


def penalized_run(
    llm: LLM, prompts: list[list[int]], output_lens: list[int], workers: int, plain_seconds: float
) -> dict:
    """The same workload with penalties on every request: the logits-processing stage's cost."""
    engine = llm.engine
    programs = warmup.step_programs(engine, logits_processing=True)
    engine.runner.programs.compile_all(programs, workers=workers or os.cpu_count() or 1)
    engine.flush_cache()
    params = [SamplingParams(temperature=0.6, max_tokens=n, ignore_eos=True, frequency_penalty=0.5,
                             repetition_penalty=1.1) for n in output_lens]
    start = time.perf_counter()
    results = llm.generate(prompts, params)
    seconds = time.perf_counter() - start
    assert sum(len(r.token_ids) for r in results) == sum(output_lens)
    engine.check_kv_invariant()
    return dict(penalized_seconds=seconds, penalized_output_tokens_per_s=sum(output_lens) / seconds,
                penalized_fraction_of_plain=plain_seconds / seconds)


if __name__ == "__main__":
    main()
