"""Every Triton-lowered kernel lowers for the GPU from this CPU (`lowering_platforms=("cuda",)`): the
interpreter runs the kernels' jnp semantics but never our own lowering rules or Triton's, so a rule
that builds bad IR (the peer all-reduce's ticket once took a literal operand) shows only here or on a
GPU. Each pool dtype the engine can make, bfloat16 and FP8 pages included; the experts' grouped GEMM
with bfloat16 and FP8 weights (per-channel and 128-block scales). The Mosaic GPU prefill kernel's
lowering, over both pool dtypes, is in `test_hopper_prefill_attention.py`."""

import functools

import jax
import jax.numpy as jnp
import pytest
from paged_inputs import make_batch
from test_cascade_attention import make_cascade_batch

from minisgl_jax.kernels import cascade_decode_attention, paged_decode_attention, ragged_paged_attention
from minisgl_jax.kernels.grouped_gemm import align_to_tiles, grouped_gemm
from minisgl_jax.kernels.peer_allreduce import PeerLayout, peer_all_gather, peer_all_reduce

POOL_DTYPES = [jnp.bfloat16, jnp.float8_e4m3fn]


def lowers_for_gpu(fn, *args) -> None:
    jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))


@pytest.mark.parametrize("pool_dtype", POOL_DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_attention_kernels_lower_for_the_gpu(pool_dtype):
    q, k, v, lens, table, cu = make_batch(4, [1, 2, 9], [33, 18, 41], page_size=16, q_heads=4, kv_heads=2,
                                          pad_rows=3, pad_seqs=1)
    q, k, v = q.astype(jnp.bfloat16), k.astype(pool_dtype), v.astype(pool_dtype)
    lowers_for_gpu(functools.partial(ragged_paged_attention, sm_scale=0.3, interpret=False), q, k, v, lens, table, cu)
    q, k, v, lens, table, cu = make_batch(5, [1, 1, 1], [33, 18, 41], page_size=16, q_heads=4, kv_heads=2)
    q, k, v = q.astype(jnp.bfloat16), k.astype(pool_dtype), v.astype(pool_dtype)
    lowers_for_gpu(functools.partial(paged_decode_attention, sm_scale=0.3, num_splits=2, block_k=16, interpret=False),
                   q, k, v, lens, table, cu)
    args, prefix_lens, rows = make_cascade_batch(6, [(2, [33, 40]), (1, [16, 20])], [21], page_size=16)
    q, _, _, lens, table, cu, k, v = args
    q, k, v = q.astype(jnp.bfloat16), k.astype(pool_dtype), v.astype(pool_dtype)
    lowers_for_gpu(functools.partial(cascade_decode_attention, sm_scale=0.3, interpret=False),
                   q, k, v, lens, table, cu, prefix_lens, rows)


@pytest.mark.parametrize("weights", ["bfloat16", "fp8-channel", "fp8-block"])
def test_grouped_gemm_lowers_for_the_gpu(weights):
    """Both projections' calls (x gathered in the kernel; x in padded order), Qwen3-30B-A3B's expert
    shapes at tp=2 for a decode step of 4 tokens x top-8; FP8 weights with a scale per output column,
    or per column and block of 128 inputs (Qwen3-30B-A3B-FP8's: 16 blocks of gate/up, 3 of down's slice)."""
    experts, hidden, inter = 128, 2048, 384
    layout = align_to_tiles(jnp.arange(32, dtype=jnp.int32) % experts, experts, 16)
    x = jnp.zeros((4, hidden), jnp.bfloat16)
    act = jnp.zeros((layout.pair_of_row.shape[0], inter), jnp.bfloat16)
    for x_in, rows, k, n in ((x, layout.pair_of_row // 8, hidden, 2 * inter), (act, None, inter, hidden)):
        w = jnp.zeros((experts, k, n), jnp.bfloat16 if weights == "bfloat16" else jnp.float8_e4m3fn)
        k_blocks = k // 128 if weights == "fp8-block" else 1
        scale = None if weights == "bfloat16" else jnp.ones((experts, k_blocks, n), jnp.float32)
        lowers_for_gpu(functools.partial(grouped_gemm, interpret=False), x_in, w, layout.tile_experts, rows, scale)


@pytest.mark.parametrize("num_devices", [1, 2])
def test_peer_all_reduce_and_gather_lower_for_the_gpu(num_devices):
    layout = PeerLayout(num_devices=num_devices, capacity_words=1 << 16, max_programs=132)
    table, seq = jnp.zeros((1, num_devices, 5), jnp.int32), jnp.ones((1,), jnp.int32)
    for fn, x in ((peer_all_reduce, jnp.zeros((64, 1024), jnp.bfloat16)),  # wider than 132 programs' blocks
                  (peer_all_reduce, jnp.zeros((4096,), jnp.float32)),
                  (peer_all_gather, jnp.zeros((77,), jnp.int32))):
        lowers_for_gpu(functools.partial(fn, layout=layout), x, table, seq)
