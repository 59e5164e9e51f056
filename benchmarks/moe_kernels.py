"""The MoE section of kernel_bench.py (`--only moe`): the experts' grouped GEMM, our Pallas kernel
against `lax.ragged_dot`, at Qwen3-30B-A3B's expert shapes (hidden 2048, moe_intermediate 768, 128
experts, top-8, one GPU) for decode steps of 1, 8, 64 and 256 tokens and a prefill of 4,096.

Bandwidth counts the bytes a step must move: the weights of the experts hit (at most tokens x 8 of
128) plus the activations in and out. XLA's default ragged_dot lowering reads every expert's
weights, so its GB/s against those bytes tells how far it is from reading only the hit ones. The
cuDNN ragged-dot fusion takes an XLA flag read at start-up: a second run of the whole section,

    XLA_FLAGS=--xla_gpu_experimental_use_ragged_dot_fusion=true python benchmarks/kernel_bench.py --only moe

labels its ragged_dot rows "ragged_dot (cuDNN fusion)".
"""

from __future__ import annotations

import functools
import os
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from minisgl_jax.kernels.grouped_gemm import align_to_tiles, default_block_m, grouped_gemm
from minisgl_jax.models.moe import EXPERT_BACKENDS

HIDDEN, INTER, EXPERTS, TOP_K = 2048, 768, 128, 8  # Qwen3-30B-A3B
TOKEN_COUNTS = (1, 8, 64, 256, 4096)
# (block_m or None for the default, block_n, block_k, num_warps, num_stages) of the gate/up kernel alone;
# the first is the default tiling. The ones marked are vLLM's tuned H100 choices for these shapes
# (fused_moe configs E=128,N=768) at the token counts named, for a kernel of the same structure.
KERNEL_VARIANTS = [
    (None, 64, 64, 4, 3), (None, 128, 64, 4, 3), (None, 64, 128, 4, 3), (None, 128, 128, 8, 3),
    (None, 32, 64, 4, 4),  # vLLM, 1 token
    (None, 256, 128, 8, 3),  # vLLM, 64-128 tokens
    (32, 256, 128, 8, 3),  # vLLM, 256 tokens
    (64, 128, 64, 4, 3),  # vLLM, 512 tokens
    (128, 256, 64, 8, 4),  # vLLM, >= 1536 tokens
]


def ragged_dot_label() -> str:
    fused = "--xla_gpu_experimental_use_ragged_dot_fusion=true" in os.environ.get("XLA_FLAGS", "")
    return "ragged_dot (cuDNN fusion)" if fused else "ragged_dot (default lowering)"


def make_inputs(tokens: int, seed: int = 0):
    """x [tokens, hidden] bf16, each token's 8 distinct random experts and weights, and the weights."""
    kx, kr, kg, kd = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(kx, (tokens, HIDDEN), jnp.bfloat16)
    weights, ids = jax.lax.top_k(jax.random.uniform(kr, (tokens, EXPERTS)), TOP_K)
    weights = weights / jnp.sum(weights, axis=1, keepdims=True)
    gate_up = (0.02 * jax.random.normal(kg, (EXPERTS, HIDDEN, 2, INTER), jnp.float32)).astype(jnp.bfloat16)
    down = (0.02 * jax.random.normal(kd, (EXPERTS, INTER, HIDDEN), jnp.float32)).astype(jnp.bfloat16)
    return x, ids.astype(jnp.int32), weights, gate_up, down


def rel_err(out, ref) -> float:
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref)) if np.isfinite(out).all() else float("nan")


def kernel_variants(x, ids, gate_up, timed) -> dict:
    """Seconds of the gate/up projection alone (layout precomputed) per "dtype tiling", bf16 and FP8
    weights with per-channel or 128-block scales (Qwen3-30B-A3B-FP8's; scales of 1: the bytes and the
    work are those of real scales)."""
    tokens = x.shape[0]
    w = gate_up.reshape(EXPERTS, HIDDEN, 2 * INTER)
    w8 = w.astype(jnp.float8_e4m3fn)
    scale = jnp.ones((EXPERTS, 1, 2 * INTER), jnp.float32)
    block_scale = jnp.ones((EXPERTS, HIDDEN // 128, 2 * INTER), jnp.float32)
    times = {}
    for bm, bn, bk, warps, stages in KERNEL_VARIANTS:
        bm = bm or default_block_m(tokens * TOP_K, EXPERTS)
        layout = align_to_tiles(ids.reshape(-1), EXPERTS, bm)
        rows = layout.pair_of_row // TOP_K
        fn = jax.jit(functools.partial(grouped_gemm, block_n=bn, block_k=bk, num_warps=warps, num_stages=stages))
        name = f"bm={bm},bn={bn},bk={bk},w={warps},st={stages}"
        for label, args in (("bf16", (x, w, layout.tile_experts, rows)),
                            ("fp8", (x, w8, layout.tile_experts, rows, scale)),
                            ("fp8-block", (x, w8, layout.tile_experts, rows, block_scale))):
            try:
                times[f"{label} {name}"] = timed(fn, *args, reps=10)
            except Exception:
                traceback.print_exc()
    return times


def bench_moe(results: dict, timed) -> None:
    """Fills results["moe"]: per token count the experts hit, the bytes they hold, each backend's time
    for the whole experts block, the kernel's tilings, and pallas' error against ragged_dot."""
    ragged = ragged_dot_label()
    expert_bytes = (HIDDEN * 2 * INTER + INTER * HIDDEN) * 2  # bf16 gate_up + down of one expert
    rows = []
    for tokens in TOKEN_COUNTS:
        x, ids, weights, gate_up, down = make_inputs(tokens)
        hit = int(np.unique(np.asarray(ids)).size)
        row = dict(tokens=tokens, experts_hit=hit, bytes=hit * expert_bytes + 2 * x.nbytes, block={}, error=None)
        outs = {}
        for name, backend in ((ragged, "ragged_dot"), ("pallas", "pallas")):
            fn = jax.jit(EXPERT_BACKENDS[backend])
            try:
                outs[name] = fn(x, ids, weights, gate_up, down)
                row["block"][name] = timed(fn, x, ids, weights, gate_up, down, reps=10)
            except Exception:  # the default lowering's prefill may not fit: [experts, pairs, hidden]
                traceback.print_exc()
        if len(outs) == 2:
            row["error"] = rel_err(outs["pallas"], outs[ragged])
        row["kernel"] = kernel_variants(x, ids, gate_up, timed)
        row["gate_up_bytes"] = hit * HIDDEN * 2 * INTER * 2
        bm, bn, bk, warps, stages = KERNEL_VARIANTS[0]
        row["kernel_default"] = f"bm={default_block_m(tokens * TOP_K, EXPERTS)},bn={bn},bk={bk},w={warps},st={stages}"
        print(f"moe T={tokens}: experts hit {hit}, " + ", ".join(f"{k} {v * 1e6:.1f} us" for k, v in row["block"].items())
              + f"; pallas vs ragged_dot rel err {row['error']}")
        rows.append(row)
    results["moe"] = dict(rows=rows, ragged_dot=ragged, shape=dict(hidden=HIDDEN, inter=INTER, experts=EXPERTS,
                                                                     top_k=TOP_K))


def print_moe(r: dict, copy_bw: float) -> None:
    """The table: the whole experts block per backend, then the gate/up kernel's best bf16 and FP8 tilings
    (per-channel and block-wise scales)."""
    m = r["moe"]
    print(f"\n== MoE experts (hidden {HIDDEN}, inter {INTER}, {EXPERTS} experts, top-{TOP_K}, bf16): "
          f"GB/s of the hit experts' bytes; {m['ragged_dot']} ==")
    print(f"{'tokens':>6s} {'hit':>4s} {'MB':>7s} {'backend':>30s} {'us':>9s} {'GB/s':>7s} {'%copy':>6s}")
    for row in m["rows"]:
        for name, s in row["block"].items():
            gbps = row["bytes"] / s / 1e9
            print(f"{row['tokens']:6d} {row['experts_hit']:4d} {row['bytes'] / 1e6:7.1f} {name:>30s} {s * 1e6:9.1f} "
                  f"{gbps:7.0f} {100 * gbps * 1e9 / copy_bw:5.1f}%")
        for label, itemsize in (("bf16", 2), ("fp8", 1), ("fp8-block", 1)):
            variants = {k: v for k, v in row["kernel"].items() if k.startswith(label + " ")}
            if variants:
                best = min(variants, key=variants.get)
                moved = row["gate_up_bytes"] * itemsize // 2
                default = variants.get(f"{label} {row['kernel_default']}", float("nan"))
                print(f"{'':19s} gate/up kernel {label}: {variants[best] * 1e6:.1f} us, {moved / variants[best] / 1e9:.0f} "
                      f"GB/s of its weights ({best.split(' ', 1)[1]}; default tiling {default * 1e6:.1f} us)")
        if row["error"] is not None:
            print(f"{'':19s} pallas vs ragged_dot: rel err {row['error']:.2e}")
