"""Throughput of the offline workload at several tensor-parallel sizes, in one call, and greedy agreement.

    NCCL_NVLS_ENABLE=0 python benchmarks/tp_scaling.py --model meta-llama/Llama-3.1-8B --tps 1,2
    python benchmarks/tp_scaling.py --model meta-llama/Llama-3.1-8B --tps 1,shard2    # one GPU

`shardN` runs, on one GPU, the model one GPU of tp=N holds: heads, KV heads, intermediate size and
vocabulary divided by N. It does exactly that GPU's GEMMs, attention and sampling, without the
all-reduces: its speed-up over tp=1 is the most tp=N can reach with these kernels.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))

from offline import BACKGROUND_COMPILE_HELP, workload  # noqa: E402
from roofline import Experts, decode_roofline_bytes, measure_copy_bandwidth  # noqa: E402

from minisgl_jax import SamplingParams  # noqa: E402
from minisgl_jax.config import EngineArgs  # noqa: E402
from minisgl_jax.engine import Engine  # noqa: E402
from minisgl_jax.engine.setup import enable_compile_cache, resolve_model  # noqa: E402
from minisgl_jax.models.config import SUPPORTED_ARCHITECTURES  # noqa: E402


def write_shard_config(model: str, tp: int, folder: str) -> str:
    """Write into `folder` the config.json of one GPU's share of `model` at tensor parallel `tp`; returns `folder`."""
    config = resolve_model(EngineArgs(model=model, load_format="dummy"))[0].for_tp(tp)
    architecture = next(name for name, arch in SUPPORTED_ARCHITECTURES.items() if arch == config.architecture)
    hf = dict(
        architectures=[architecture], vocab_size=config.vocab_size // tp, hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size // tp, num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_q_heads // tp, num_key_value_heads=config.num_kv_heads // tp,
        head_dim=config.head_dim, rms_norm_eps=config.rms_norm_eps, rope_theta=config.rope_theta,
        rope_scaling=config.rope_scaling, max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=config.tie_word_embeddings, attention_bias=config.o_bias,
    )
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(hf, f)
    return folder


def run(args: argparse.Namespace, spec: str) -> dict:
    """spec: TP, TP:ALL_REDUCE (e.g. 2:xla) or shardN (one GPU running one GPU's share of tp=N)."""
    model, label = args.model, spec
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="shard-config-") as folder:  # read by the engine's start only
        if spec.startswith("shard"):
            model, spec = write_shard_config(args.model, int(spec[len("shard"):]), folder), "1"
        tp, _, all_reduce = spec.partition(":")
        tp = int(tp)
        engine = Engine(EngineArgs(
            model=model, load_format="dummy", quantization=args.quantization, tp=tp, moe_parallel=args.moe_parallel,
            moe_backend=args.moe_backend, dtype=args.dtype,
            kv_cache_dtype=args.kv_cache_dtype, cache="naive", max_model_len=args.max_model_len,
            compile_cache_dir=args.compile_cache_dir, max_running_requests=args.max_running_requests,
            decode_steps=args.decode_steps, all_reduce=all_reduce or "auto", burst_max_rows=args.burst_max_rows,
            background_compile=args.background_compile,
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
    # One device's floor: its shard of the weights and of every live sequence's KV, once a decode step.
    kv_bytes_per_token = engine.model_config.kv_bytes_per_token(engine.runner.kv_dtype.itemsize) // tp
    roof_bytes = decode_roofline_bytes([len(p) for p in prompts], output_lens, kv_bytes_per_token,
                                       engine.weights_bytes // tp, Experts.of(engine.model_config, args.dtype, tp))
    roof_seconds = roof_bytes / args.copy_bandwidth if args.copy_bandwidth else float("nan")
    result = dict(run=label, tp=tp, shard=model != args.model, all_reduce=engine.runner.all_reduce.mode,
                  moe_parallel=engine.model_config.moe_parallel, moe_backend=engine.model_config.moe_backend,
                  seconds=seconds, output_tokens=tokens, tokens_per_s=tokens / seconds, startup_s=startup,
                  kv_pages=engine.allocator.num_usable, greedy=greedy, timing=timing,
                  weights_bytes=engine.weights_bytes, fraction_of_roofline=roof_seconds / seconds)
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
    parser.add_argument("--kv-cache-dtype", default="auto", help="auto (the model's dtype) or fp8_e4m3")
    parser.add_argument("--quantization", default=None, help="fp8: random block-wise FP8 weights")
    parser.add_argument("--moe-parallel", default="tp", help="tp or ep: a mixture of experts' experts at tp > 1")
    parser.add_argument("--moe-backend", default="auto", help="experts' grouped GEMM: auto, ragged_dot, pallas")
    parser.add_argument("--decode-steps", type=int, default=4, help="1: no decode bursts")
    parser.add_argument("--burst-max-rows", type=int, default=None, help="the most rows a burst may have")
    parser.add_argument("--background-compile", action="store_true", help=BACKGROUND_COMPILE_HELP)
    parser.add_argument("--compile-cache-dir", default="~/.cache/minisgl_jax/xla")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    enable_compile_cache(args.compile_cache_dir)
    args.copy_bandwidth = measure_copy_bandwidth() if os.environ.get("JAX_PLATFORMS") != "cpu" else 0.0
    results = [run(args, spec) for spec in args.tps.split(",")]
    print(f"\ndtype {args.dtype}, quantization {args.quantization}, KV {args.kv_cache_dtype}, "
          f"moe_parallel {args.moe_parallel}, "
          f"decode_steps {args.decode_steps}, burst_max_rows {args.burst_max_rows}, "
          f"background compile {args.background_compile}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    base = results[0]
    print(f"\n{args.model}, {args.num_requests} requests\n| tp | all-reduce | seconds | output tok/s | speed-up | "
          f"of roofline | start-up s | KV pages | greedy = {base['run']} |"
          "\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        same = "-" if r["shard"] or base["shard"] else f"{sum(a == b for a, b in zip(r['greedy'], base['greedy']))}/8"
        speedup = r["tokens_per_s"] / base["tokens_per_s"]
        print(f"| {r['run']} | {r['all_reduce']} | {r['seconds']:.2f} | {r['tokens_per_s']:.0f} | {speedup:.2f}x "
              f"| {r['fraction_of_roofline']:.2f} | {r['startup_s']:.0f} | {r['kv_pages']} | {same} |")
    print("\n| tp | all-reduce | engine step s | of it waiting for the device s | launching s |"
          "\n| --- | --- | --- | --- | --- |")
    for r in results:
        t = r["timing"]
        print(f"| {r['run']} | {r['all_reduce']} | {t['step_s']:.2f} | {t['wait_s']:.2f} | {t['launch_s']:.2f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
