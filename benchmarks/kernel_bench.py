"""GPU benchmark of the paged-attention and MoE kernels against the measured floors and the baselines.

    PYTHONUNBUFFERED=1 python benchmarks/kernel_bench.py [--out DIR] [--kv-dtype fp8]

One run: copy-bandwidth ceiling; correctness of every kernel path against the reference on fresh
random inputs; decode (ours, tuned variants, vs jax's bundled Pallas paged_attention) in GB/s of
KV read; prefill vs cuDNN in TFLOP/s; a mixed batch vs its two halves; the KV scatter write.
Prints the table last and writes every number to DIR/kernels.json. `--kv-dtype fp8` makes every
pool float8_e4m3fn (an FP8 KV cache: the kernels convert each loaded page to bf16), so decode's
<<<<<<< HEAD
GB/s count one byte an element; the Mosaic kernel and jax's bundled one take no FP8 pages.
`--only moe`: the experts' grouped GEMM, Pallas against ragged_dot (moe_kernels.py says how).
=======
GB/s count one byte an element; jax's bundled decode kernel takes no FP8 pages (the Mosaic prefill
kernel's correctness cases run over them).
>>>>>>> mosaic-fp8
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from moe_kernels import bench_moe, print_moe
from roofline import measure_copy_bandwidth

from minisgl_jax.kernels import (
    cascade_decode_attention,
    hopper_prefill_attention,
    hopper_prefill_unsupported,
    paged_decode_attention,
    ragged_paged_attention,
    ragged_paged_attention_reference,
    write_kv_reference,
)

Q_HEADS, KV_HEADS, HEAD_DIM = 16, 8, 128  # Qwen3-0.6B
SCALE = 1.0 / math.sqrt(HEAD_DIM)
KV_DTYPES = {"bf16": jnp.bfloat16, "fp8": jnp.float8_e4m3fn}
kv_dtype = jnp.dtype(jnp.bfloat16)  # the pools' (--kv-dtype)


def timed(fn, *args, reps: int = 30, inner: int = 10) -> float:
    """Median seconds per call: `inner` back-to-back calls per sample, so launch gaps stay hidden."""
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        for _ in range(inner):
            out = fn(*args)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - start) / inner)
    return float(np.median(samples))


def make_batch(seed: int, q_lens, kv_lens, page_size: int, dtype=jnp.bfloat16, pages_per_seq: int | None = None,
               q_heads: int = Q_HEADS, kv_heads: int = KV_HEADS, head_dim: int = HEAD_DIM):
    """Random q and pool (of `kv_dtype`), a shuffled page table sized to the lengths; the kernel's six inputs."""
    rng = np.random.default_rng(seed)
    need = [-(-int(k) // page_size) for k in kv_lens]
    num_pages = sum(need) + 1
    width = pages_per_seq or max(need)
    perm = rng.permutation(np.arange(1, num_pages)).astype(np.int32)
    table = np.zeros((len(kv_lens), width), np.int32)
    offset = 0
    for i, n in enumerate(need):
        table[i, :n] = perm[offset:offset + n]
        offset += n
    key = jax.random.key(seed)
    kq, kk, kv = jax.random.split(key, 3)
    q = jax.random.normal(kq, (int(sum(q_lens)), q_heads, head_dim), dtype)
    k = jax.random.normal(kk, (kv_heads, num_pages, page_size, head_dim), dtype).astype(kv_dtype)
    v = jax.random.normal(kv, (kv_heads, num_pages, page_size, head_dim), dtype).astype(kv_dtype)
    cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    return q, k, v, jnp.asarray(np.asarray(kv_lens, np.int32)), jnp.asarray(table), jnp.asarray(cu)


def rel_err(out, ref) -> float:
    out = np.asarray(out, np.float32)
    ref = np.asarray(ref, np.float32)
    if not np.isfinite(out).all():
        return float("nan")
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def check_correctness(results: dict) -> None:
    """Every path on fresh random bf16 inputs vs the reference (which upcasts to f32)."""
    cases = {
        "decode p16 B37": dict(q_lens=[1] * 37, kv_lens=np.random.default_rng(1).integers(1, 700, 37), page_size=16, mq=1),
        "decode p1 B9": dict(q_lens=[1] * 9, kv_lens=[1, 2, 15, 16, 17, 100, 129, 300, 64], page_size=1, mq=1),
        "decode p64 B8 long": dict(q_lens=[1] * 8, kv_lens=[3000, 1, 65, 64, 2047, 4100, 128, 999], page_size=64, mq=1),
        "decode p256 B5": dict(q_lens=[1] * 5, kv_lens=[1, 256, 257, 1000, 2000], page_size=256, mq=1),
        "mixed p16": dict(q_lens=[1, 37, 1, 200, 1, 2], kv_lens=[50, 37, 700, 1000, 16, 300], page_size=16, mq=None),
        "prefix p64": dict(q_lens=[129, 64, 300], kv_lens=[1500, 64, 301], page_size=64, mq=None),
        "ragged p1": dict(q_lens=[5, 1, 33], kv_lens=[20, 7, 33], page_size=1, mq=None),
        "mixed + empty seqs": dict(q_lens=[1, 20, 1, 0, 0], kv_lens=[30, 40, 9, 0, 0], page_size=16, mq=None),
    }
    for i, (name, c) in enumerate(cases.items()):
        args = make_batch(100 + i, c["q_lens"], c["kv_lens"], c["page_size"])
        try:
            out = ragged_paged_attention(*args, sm_scale=SCALE, max_q_len=c["mq"])
            ref = ragged_paged_attention_reference(*args, sm_scale=SCALE)
            results["correctness"][name] = rel_err(out, ref)
        except Exception:
            traceback.print_exc()
            results["correctness"][name] = "error"
        print(f"correctness {name}: {results['correctness'][name]}")
        if c["mq"] is None and hopper_prefill_unsupported(jnp.bfloat16, HEAD_DIM, c["page_size"],
                                                          kv_dtype=kv_dtype) is None:
            try:
                out = hopper_prefill_attention(*args, sm_scale=SCALE)
                results["correctness"][name + " (mosaic)"] = rel_err(out, ref)
            except Exception:
                traceback.print_exc()
                results["correctness"][name + " (mosaic)"] = "error"
            print(f"correctness {name} (mosaic): {results['correctness'][name + ' (mosaic)']}")


def bench_decode(results: dict, copy_bw: float) -> None:
    from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention

    for batch, ctx in [(256, 1024), (64, 4096), (8, 16384), (256, 128)]:
        args = make_batch(batch, [1] * batch, [ctx] * batch, 16)
        kv_bytes = 2 * batch * ctx * KV_HEADS * HEAD_DIM * kv_dtype.itemsize
        row = {"batch": batch, "ctx": ctx, "kv_bytes": kv_bytes, "ours": {}, "jax_bundled": {}}
        variants = [dict(), dict(block_k=128, num_stages=3), dict(block_k=32, num_stages=4)]
        variants += [dict(num_splits=s) for s in (4, 16) if batch * KV_HEADS * s <= 1024]
        for var in variants:
            name = ",".join(f"{k}={v}" for k, v in var.items()) or "default"
            fn = jax.jit(functools.partial(paged_decode_attention, sm_scale=SCALE, **var))
            try:
                row["ours"][name] = timed(fn, *args)
            except Exception:
                traceback.print_exc()
        q, k, v, lens, table, _ = args
        for splits in (1, 16):
            if table.shape[1] % splits or kv_dtype != jnp.bfloat16:
                continue
            fn = jax.jit(functools.partial(paged_attention, k_splits=splits))
            try:
                row["jax_bundled"][f"k_splits={splits}"] = timed(fn, q * SCALE, k, v, table, lens)
            except Exception:
                traceback.print_exc()
        best = min(row["ours"].values())
        best_bundled = min(row["jax_bundled"].values()) if row["jax_bundled"] else float("nan")
        default_bundled = row["jax_bundled"].get("k_splits=16", float("nan"))
        row.update(best_s=best, default_s=row["ours"].get("default"), best_bundled_s=best_bundled,
                   gbps=kv_bytes / best / 1e9, frac_copy=kv_bytes / best / copy_bw,
                   vs_bundled=best_bundled / best, vs_bundled_default=default_bundled / best)
        print(f"decode B={batch} ctx={ctx}: " + json.dumps({k: round(v * 1e6, 1) for k, v in row["ours"].items()}))
        print("  bundled: " + json.dumps({k: round(v * 1e6, 1) for k, v in row["jax_bundled"].items()}))
        results["decode"].append(row)
        if (batch, ctx) == (256, 1024):
            wide = make_batch(batch, [1] * batch, [ctx] * batch, 16, pages_per_seq=2560)
            fn = jax.jit(functools.partial(paged_decode_attention, sm_scale=SCALE))
            results["decode_table_2560_wide_s"] = timed(fn, *wide)


def attention_flops(q_lens, kv_lens) -> float:
    """2 matmuls x 2 flops x heads x d per (query, visible key) pair; causal inside the new tokens."""
    pairs = sum(q * (k - q) + q * (q + 1) / 2 for q, k in zip(q_lens, kv_lens))
    return 4.0 * Q_HEADS * HEAD_DIM * pairs


PREFILL_VARIANTS = [  # (block_m, block_k, num_warps, num_stages); the first is the default
    (256, 64, 8, 3), (128, 32, 8, 3), (128, 64, 8, 3), (256, 64, 8, 4), (256, 64, 16, 3), (256, 32, 16, 3),
]


MOSAIC_VARIANTS = [(128, 2), (64, 2), (64, 3)]  # (block_kv, num_stages) of the Hopper kernel; the first is the default


def sweep_prefill(args) -> dict:
    """Seconds per call of each tiling: the Triton block kernel's, then the Mosaic GPU kernel's ("mosaic ...")."""
    fns = {}
    for bm, bk, warps, stages in PREFILL_VARIANTS:
        fns[f"bm={bm},bk={bk},w={warps},st={stages}"] = functools.partial(
            ragged_paged_attention, sm_scale=SCALE, block_m=bm, block_k=bk, num_warps=warps, num_stages=stages)
    for bkv, stages in MOSAIC_VARIANTS:
        fns[f"mosaic bkv={bkv},st={stages}"] = functools.partial(
            hopper_prefill_attention, sm_scale=SCALE, block_kv=bkv, num_stages=stages)
    times = {}
    for name, fn in fns.items():
        try:
            times[name] = timed(jax.jit(fn), *args, reps=20)
        except Exception:
            traceback.print_exc()
    return times


def best_of(variants: dict, mosaic: bool) -> float:
    return min(s for name, s in variants.items() if name.startswith("mosaic") == mosaic)


def bench_prefill(results: dict) -> None:
    batch, t = 4, 2048
    args = make_batch(7, [t] * batch, [t] * batch, 16)
    flops = attention_flops([t] * batch, [t] * batch)
    ours = sweep_prefill(args)
    kq, kk, kv = jax.random.split(jax.random.key(8), 3)
    q = jax.random.normal(kq, (batch, t, Q_HEADS, HEAD_DIM), jnp.bfloat16)
    k = jax.random.normal(kk, (batch, t, KV_HEADS, HEAD_DIM), jnp.bfloat16)
    v = jax.random.normal(kv, (batch, t, KV_HEADS, HEAD_DIM), jnp.bfloat16)
    cudnn = jax.jit(functools.partial(jax.nn.dot_product_attention, is_causal=True, scale=SCALE, implementation="cudnn"))
    cudnn_s = timed(cudnn, q, k, v, reps=20)
    best, triton_s, mosaic_s = min(ours.values()), best_of(ours, False), best_of(ours, True)
    results["prefill"] = dict(variants=ours, best_s=best, cudnn_s=cudnn_s, flops=flops,
                              tflops=flops / best / 1e12, cudnn_tflops=flops / cudnn_s / 1e12, vs_cudnn=cudnn_s / best,
                              triton_s=triton_s, mosaic_s=mosaic_s)
    print("prefill: " + json.dumps({k: round(v * 1e6, 1) for k, v in ours.items()}) + f" cudnn {cudnn_s * 1e6:.1f}")

    new, cached = 512, 2048
    args = make_batch(9, [new] * batch, [new + cached] * batch, 16)
    variants = sweep_prefill(args)
    prefix_s = min(variants.values())
    flops = attention_flops([new] * batch, [new + cached] * batch)
    results["prefix"] = dict(variants=variants, s=prefix_s, flops=flops, tflops=flops / prefix_s / 1e12,
                             triton_s=best_of(variants, False), mosaic_s=best_of(variants, True))
    print("prefix: " + json.dumps({k: round(v * 1e6, 1) for k, v in variants.items()}))

    # An engine bucket: 4 x 2048 tokens, padded to 256 sequences (252 empty ones), default tilings.
    q, k, v, lens, table, cu = make_batch(7, [t] * batch, [t] * batch, 16)
    pad = 252
    bucket = (q, k, v, jnp.concatenate([lens, jnp.zeros(pad, jnp.int32)]),
              jnp.concatenate([table, jnp.zeros((pad, table.shape[1]), jnp.int32)]),
              jnp.concatenate([cu, jnp.full(pad, cu[-1], jnp.int32)]))
    results["bucket"] = {
        "triton_s": timed(jax.jit(functools.partial(ragged_paged_attention, sm_scale=SCALE)), *bucket, reps=20),
        "mosaic_s": timed(jax.jit(functools.partial(hopper_prefill_attention, sm_scale=SCALE)), *bucket, reps=20),
    }


def shared_prefix_batch(seed: int, batch: int, prefix: int, suffixes, page_size: int = 16):
    """Decode rows whose first `prefix` keys are the same pages (as the radix cache shares them)."""
    args = make_batch(seed, [1] * batch, [prefix + int(s) for s in suffixes], page_size)
    q, k, v, lens, table, cu = args
    table = table.at[:, : prefix // page_size].set(table[0, : prefix // page_size])
    groups = jnp.zeros((8, 3), jnp.int32).at[0].set(jnp.asarray([0, batch, prefix], jnp.int32))
    return (q, k, v, lens, table, cu), jnp.full((batch,), prefix, jnp.int32), groups


def bench_cascade(results: dict) -> None:
    """256 decodes sharing a 2,048-key prefix with 128-256 keys of their own: cascade vs plain decode."""
    small, prefix_lens, groups = shared_prefix_batch(21, 37, 1024, np.random.default_rng(2).integers(1, 300, 37))
    out = cascade_decode_attention(*small, prefix_lens, groups, sm_scale=SCALE)
    results["correctness"]["cascade B37 prefix 1024"] = rel_err(out, ragged_paged_attention_reference(*small, sm_scale=SCALE))
    batch, prefix = 256, 2048
    suffixes = np.random.default_rng(3).integers(128, 257, batch)
    args, prefix_lens, groups = shared_prefix_batch(22, batch, prefix, suffixes)
    plain = jax.jit(functools.partial(paged_decode_attention, sm_scale=SCALE))
    row = {"plain_s": timed(plain, *args), "variants": {}}
    want = plain(*args)
    for var in (dict(), dict(prefix_splits=1), dict(prefix_splits=2), dict(block_m=128, num_warps=4), dict(block_m=64, num_warps=4)):
        name = ",".join(f"{k}={v}" for k, v in var.items()) or "default"
        fn = jax.jit(functools.partial(cascade_decode_attention, sm_scale=SCALE, **var))
        try:
            row["variants"][name] = timed(fn, *args, prefix_lens, groups)
            results["correctness"][f"cascade B256 vs plain ({name})"] = rel_err(fn(*args, prefix_lens, groups), want)
        except Exception:
            traceback.print_exc()
    row["best_s"] = min(row["variants"].values())
    row["kv_bytes_plain"] = 2 * KV_HEADS * HEAD_DIM * kv_dtype.itemsize * int(np.sum(prefix + suffixes))
    row["kv_bytes_cascade"] = 2 * KV_HEADS * HEAD_DIM * kv_dtype.itemsize * int(prefix + np.sum(suffixes))
    results["cascade"] = row
    print("cascade: " + json.dumps({k: round(v * 1e6, 1) for k, v in row["variants"].items()}) + f" plain {row['plain_s'] * 1e6:.1f} us")


def bench_mixed(results: dict) -> None:
    decodes, ctx, chunk = 255, 1024, 512
    mixed = make_batch(11, [1] * decodes + [chunk], [ctx] * decodes + [chunk], 16)
    q, k, v, lens, table, cu = mixed
    fn = jax.jit(functools.partial(ragged_paged_attention, sm_scale=SCALE))
    mixed_s = timed(fn, *mixed)
    dec = jax.jit(functools.partial(ragged_paged_attention, sm_scale=SCALE, max_q_len=1))
    decode_s = timed(dec, q[:decodes], k, v, lens[:decodes], table[:decodes], cu[:decodes + 1])
    chunk_cu = jnp.asarray([0, chunk], jnp.int32)
    chunk_s = timed(fn, q[decodes:], k, v, lens[decodes:], table[decodes:], chunk_cu)
    mosaic_s = timed(jax.jit(functools.partial(hopper_prefill_attention, sm_scale=SCALE)), *mixed)
    results["mixed"] = dict(mixed_s=mixed_s, decode_s=decode_s, chunk_s=chunk_s, separate_s=decode_s + chunk_s,
                            mosaic_s=mosaic_s)


def bench_kv_write(results: dict, tokens: int = 256, num_pages: int = 65536, page_size: int = 16) -> None:
    """XLA's scatter as the engine writes K/V, and with unique slots promised; donated pools (in place),
    so their cost should be the new rows, not the pool."""
    pools = (jnp.zeros((KV_HEADS, num_pages, page_size, HEAD_DIM), jnp.bfloat16),) * 2
    new = jax.random.normal(jax.random.key(3), (tokens, KV_HEADS, HEAD_DIM), jnp.bfloat16)
    results["kv_write"] = dict(tokens=tokens, pool_bytes=2 * pools[0].size * 2)
    reps = 16
    all_slots = jnp.asarray(np.random.default_rng(4).permutation(num_pages * page_size)[: reps * tokens]
                            .astype(np.int32).reshape(reps, tokens))

    def unique_scatter(k_pages, v_pages, k, v, slot_mapping):
        # as write_kv_reference, but promising XLA distinct in-bounds slots
        flat = (k_pages.shape[0], -1, k_pages.shape[3])
        k_flat = k_pages.reshape(flat).at[:, slot_mapping].set(
            k.transpose(1, 0, 2), unique_indices=True, indices_are_sorted=False, mode="promise_in_bounds")
        v_flat = v_pages.reshape(flat).at[:, slot_mapping].set(
            v.transpose(1, 0, 2), unique_indices=True, indices_are_sorted=False, mode="promise_in_bounds")
        return k_flat.reshape(k_pages.shape), v_flat.reshape(v_pages.shape)

    for name, fn in (("reference", write_kv_reference), ("unique_scatter", unique_scatter)):
        def many_writes(k_pages, v_pages, new, all_slots, fn=fn):
            # straight-line inside one program, as in the engine's step: no dispatch or loop cost
            pools = (k_pages, v_pages)
            for i in range(reps):
                pools = fn(*pools, new, new, all_slots[i])
            return pools

        write = jax.jit(many_writes, donate_argnums=(0, 1))
        k_pages, v_pages = jnp.zeros_like(pools[0]), jnp.zeros_like(pools[0])
        hlo = write.lower(k_pages, v_pages, new, all_slots).compile().as_text()
        for _ in range(3):
            k_pages, v_pages = write(k_pages, v_pages, new, all_slots)
        jax.block_until_ready(k_pages)
        samples = []
        for _ in range(20):
            start = time.perf_counter()
            k_pages, v_pages = write(k_pages, v_pages, new, all_slots)
            jax.block_until_ready(k_pages)
            samples.append((time.perf_counter() - start) / reps)
        results["kv_write"][name] = dict(s=float(np.median(samples)), aliased="input_output_alias" in hlo)
        del k_pages, v_pages


def print_table(r: dict) -> None:
    copy = r["copy_bw"]
    print(f"\n== paged attention kernels, {r['device']}, jax {r['jax']}, {r['date']}, {r['kv_dtype']} pages ==")
    print(f"copy ceiling: {copy / 1e9:.0f} GB/s (read + written)")
    print("correctness (rel err vs reference, bf16): " + ", ".join(f"{k}: {v:.2e}" if isinstance(v, float) else f"{k}: {v}" for k, v in r["correctness"].items()))
    print(f"{'decode':24s} {'ours us':>8s} {'GB/s':>7s} {'%copy':>6s} {'bundled us':>10s} {'x bundled':>9s} (best k_splits)")
    for row in r["decode"]:
        best_name = min(row["ours"], key=row["ours"].get)
        print(f"B={row['batch']:<4d} ctx={row['ctx']:<6d}       {row['best_s'] * 1e6:8.1f} {row['gbps']:7.0f} "
              f"{100 * row['frac_copy']:5.1f}% {row['best_bundled_s'] * 1e6:10.1f} {row['vs_bundled']:8.2f}x "
              f"(vs its default k_splits=16: {row['vs_bundled_default']:.2f}x)  {best_name} "
              f"(default {row['default_s'] * 1e6:.1f} us)")
    if "decode_table_2560_wide_s" in r:
        print(f"B=256 ctx=1024 with a 2560-wide page table (engine's 40k ctx): {r['decode_table_2560_wide_s'] * 1e6:.1f} us")
    p = r.get("prefill")
    if p:
        best_name = min(p["variants"], key=p["variants"].get)
        print(f"prefill causal B=4 T=2048: ours {p['best_s'] * 1e6:.1f} us {p['tflops']:.0f} TFLOP/s ({best_name}); "
              f"cuDNN {p['cudnn_s'] * 1e6:.1f} us {p['cudnn_tflops']:.0f} TFLOP/s; ours/cuDNN {100 * p['vs_cudnn']:.0f}% "
              f"(best Triton-lowered {p['triton_s'] * 1e6:.1f} us = {100 * p['cudnn_s'] / p['triton_s']:.0f}%, "
              f"best Mosaic GPU {p['mosaic_s'] * 1e6:.1f} us = {100 * p['cudnn_s'] / p['mosaic_s']:.0f}%)")
    if "prefix" in r:
        best_name = min(r["prefix"]["variants"], key=r["prefix"]["variants"].get)
        x = r["prefix"]
        print(f"prefill B=4 T=512 new + 2048 cached: {x['s'] * 1e6:.1f} us, {x['tflops']:.0f} TFLOP/s ({best_name}); "
              f"Triton-lowered {x['triton_s'] * 1e6:.1f} us, Mosaic GPU {x['mosaic_s'] * 1e6:.1f} us")
    if "bucket" in r:
        x = r["bucket"]
        print(f"prefill bucket 4 x 2048 + 252 empty sequences: Triton-lowered {x['triton_s'] * 1e6:.1f} us, "
              f"Mosaic GPU {x['mosaic_s'] * 1e6:.1f} us")
    if "cascade" in r:
        c = r["cascade"]
        best_name = min(c["variants"], key=c["variants"].get)
        print(f"decode B=256, 2048 shared + 128..256 own keys: plain {c['plain_s'] * 1e6:.1f} us "
              f"({c['kv_bytes_plain'] / c['plain_s'] / 1e9:.0f} GB/s of per-row KV), cascade {c['best_s'] * 1e6:.1f} us "
              f"({best_name}; {c['kv_bytes_cascade'] / 1e6:.0f} MB must move: {c['kv_bytes_cascade'] / c['best_s'] / 1e9:.0f} GB/s), "
              f"{c['plain_s'] / c['best_s']:.2f}x")
    if "mixed" in r:
        m = r["mixed"]
        print(f"mixed 255 decodes ctx1024 + 512 chunk: {m['mixed_s'] * 1e6:.1f} us vs separate "
              f"{m['decode_s'] * 1e6:.1f} + {m['chunk_s'] * 1e6:.1f} = {m['separate_s'] * 1e6:.1f} us; "
              f"with the Mosaic GPU prefill kernel {m['mosaic_s'] * 1e6:.1f} us")
    if "kv_write" in r:
        w = r["kv_write"]
        for name in ("reference", "unique_scatter"):
            print(f"kv write {name} (donated, {w['tokens']} tokens into a {w['pool_bytes'] / 2**30:.1f} GiB pool): "
                  f"{w[name]['s'] * 1e6:.1f} us, input_output_alias in HLO: {w[name]['aliased']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for kernels.json")
    parser.add_argument("--only", default="correctness,decode,prefill,mixed,kv_write,cascade,moe",
                        help="comma-separated parts")
    parser.add_argument("--kv-dtype", choices=sorted(KV_DTYPES), default="bf16",
                        help="the pools' dtype: fp8 times the kernels over FP8 pages (correctness,decode,cascade)")
    args = parser.parse_args()
    global kv_dtype
    kv_dtype = jnp.dtype(KV_DTYPES[args.kv_dtype])
    parts = args.only.split(",")
    os.makedirs(args.out, exist_ok=True)
    results = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
               "date": time.strftime("%Y-%m-%d"), "kv_dtype": kv_dtype.name, "correctness": {}, "decode": []}
    results["copy_bw"] = measure_copy_bandwidth()
    print(f"copy ceiling {results['copy_bw'] / 1e9:.0f} GB/s")
    steps = {"correctness": check_correctness, "decode": lambda r: bench_decode(r, r["copy_bw"]),
             "prefill": bench_prefill, "mixed": bench_mixed, "kv_write": bench_kv_write, "cascade": bench_cascade,
             "moe": lambda r: bench_moe(r, timed)}
    for part in parts:
        try:
            steps[part](results)
        except Exception:
            traceback.print_exc()
        with open(os.path.join(args.out, "kernels.json"), "w") as f:
            json.dump(results, f, indent=1, default=str)
    print_table(results)
    if "moe" in results:
        print_moe(results, results["copy_bw"])


if __name__ == "__main__":
    main()
