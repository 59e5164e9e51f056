"""The grouped GEMM in interpret mode against its per-pair reference: ragged groups, an expert with no
rows, every row on one expert, pair counts off the tile size, bf16/f32 and FP8 weights with per-channel
and block-wise scales; the tile layout's contract."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minisgl_jax.kernels.grouped_gemm import (
    align_to_tiles,
    grouped_gemm,
    grouped_gemm_reference,
    padded_rows,
)
from minisgl_jax.models.quantization import dequantize

EXPERTS, K, N, BLOCK_M = 6, 64, 48, 16


def ragged_ids(seed: int, pairs: int, empty: int) -> np.ndarray:
    """Expert ids of `pairs` pairs with uneven groups (one over a tile) and expert `empty` never chosen."""
    rng = np.random.default_rng(seed)
    choices = [e for e in range(EXPERTS) if e != empty]
    ids = rng.choice(choices, size=pairs, p=np.array([6, 1, 2, 1, 1])[: len(choices)] / 11)
    return ids.astype(np.int32)


def check_against_reference(x, w, ids, scale=None, tokens_per_pair: int = 1, padded_too: bool = False,
                            block_k: int = 16) -> None:
    """The kernel's row of each pair (x gathered in the kernel; with padded_too also x given in padded
    order) equals the reference. Pair p reads x row p // tokens_per_pair."""
    layout = align_to_tiles(jnp.asarray(ids), EXPERTS, BLOCK_M)
    kw = dict(out_dtype=jnp.float32, block_n=16, block_k=block_k)  # several column blocks and K steps
    rows = layout.pair_of_row // tokens_per_pair
    want = grouped_gemm_reference(x[np.arange(len(ids)) // tokens_per_pair], w, jnp.asarray(ids), scale)
    got = grouped_gemm(x, w, layout.tile_experts, rows, scale, **kw)[layout.row_of_pair]
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    if padded_too:
        got = grouped_gemm(x[rows], w, layout.tile_experts, None, scale, **kw)[layout.row_of_pair]
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def inputs(seed: int, dtype) -> tuple[jax.Array, jax.Array]:
    """x [19 tokens, K] and w [experts, K, N]: the same shapes in every test, so the kernel compiles
    once per dtype and path."""
    key_x, key_w = jax.random.split(jax.random.key(seed))
    return jax.random.normal(key_x, (19, K), dtype), jax.random.normal(key_w, (EXPERTS, K, N), dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: jnp.dtype(d).name)
def test_ragged_groups_with_an_empty_expert_equal_the_reference(dtype):
    """37 pairs (not a multiple of the tile) from 19 tokens x top-2 (the last token's second slot cut),
    expert 2 idle, expert 0 over two tiles."""
    ids = ragged_ids(0, 37, empty=2)
    assert np.bincount(ids, minlength=EXPERTS)[2] == 0 and np.bincount(ids).max() > BLOCK_M
    check_against_reference(*inputs(0, dtype), ids, tokens_per_pair=2, padded_too=dtype == jnp.float32)


def test_every_row_on_one_expert():
    """37 pairs in three tiles of the last expert; the other tiles of the static bound unused."""
    check_against_reference(*inputs(1, jnp.float32), np.full(37, EXPERTS - 1, np.int32), tokens_per_pair=2,
                            padded_too=True)


@pytest.mark.parametrize("k_blocks,block_k", [(1, 16), (2, 16), (4, 16), (4, 64)])
def test_fp8_weights_with_scales_equal_the_dequantized_weights(k_blocks, block_k):
    """float8_e4m3fn weights, bf16 activations and a float32 scale per (expert, block of K / k_blocks
    inputs, output column): one row (per channel), two K tiles a block, one K tile a block, and a
    preferred block_k (64) over the block (16), shrunk to it."""
    ids = ragged_ids(2, 37, empty=4)
    x, w = inputs(2, jnp.bfloat16)
    w = (w.astype(jnp.float32) * 50).astype(jnp.float8_e4m3fn)
    scale = jax.random.uniform(jax.random.key(3), (EXPERTS, k_blocks, N), jnp.float32, 0.001, 0.02)
    check_against_reference(x, w, ids, scale, tokens_per_pair=2, block_k=block_k)
    # the reference's scales are the dequantization's (models/quantization.py's, as the experts' weights)
    pairs_x = x[np.arange(37) // 2]
    np.testing.assert_allclose(grouped_gemm_reference(pairs_x, w, jnp.asarray(ids), scale),
                               grouped_gemm_reference(pairs_x, dequantize(w, scale, jnp.float32), jnp.asarray(ids)),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("pairs", [1, 8, 37, 100])
def test_tile_layout_groups_each_expert_in_whole_tiles(pairs):
    ids = ragged_ids(pairs, pairs, empty=3)
    layout = jax.jit(align_to_tiles, static_argnums=(1, 2))(jnp.asarray(ids), EXPERTS, BLOCK_M)
    pair_of_row, tile_experts, row_of_pair = map(np.asarray, layout)
    assert len(pair_of_row) == padded_rows(pairs, EXPERTS, BLOCK_M) == len(tile_experts) * BLOCK_M
    assert (pair_of_row[row_of_pair] == np.arange(pairs)).all()
    assert (tile_experts[row_of_pair // BLOCK_M] == ids).all()  # each pair in a tile of its expert
    used = tile_experts >= 0
    counts = np.bincount(ids, minlength=EXPERTS)
    assert used.sum() == (-(-counts // BLOCK_M)).sum() and not used[used.sum():].any()  # unused tiles last
    assert (np.diff(tile_experts[used]) >= 0).all() and 3 not in tile_experts
    for e in np.flatnonzero(counts):  # a group's pairs keep their order (a stable sort)
        assert (np.diff(row_of_pair[ids == e]) == 1).all()


def test_inputs_are_checked_by_name():
    x, w = jnp.zeros((8, 16), jnp.bfloat16), jnp.zeros((2, 16, 16), jnp.float8_e4m3fn)
    tiles, rows = jnp.zeros((1,), jnp.int32), jnp.zeros((16,), jnp.int32)
    with pytest.raises(ValueError, match="scale must be given exactly when w is float8_e4m3fn"):
        grouped_gemm(x, w, tiles, rows)
    with pytest.raises(ValueError, match=r"scale must be float32 \[experts=2, k_blocks, N=16\]"):
        grouped_gemm(x, w, tiles, rows, jnp.ones((2, 1, 8), jnp.float32))
    with pytest.raises(ValueError, match=r"scale's 3 blocks \(axis 1\) do not split K=16 evenly"):
        grouped_gemm(x, w, tiles, rows, jnp.ones((2, 3, 16), jnp.float32))
    with pytest.raises(ValueError, match=r"tiles of at least 16 .* block_k 8 \(K=16, 8 a scale block\)"):
        grouped_gemm(x, w, tiles, rows, jnp.ones((2, 2, 16), jnp.float32), interpret=False)
    with pytest.raises(ValueError, match="w must be x's dtype"):
        grouped_gemm(x, w.astype(jnp.float32), tiles, rows)
    with pytest.raises(ValueError, match="multiple of the 3 tiles"):
        grouped_gemm(x, w.astype(jnp.bfloat16), jnp.zeros((3,), jnp.int32), rows)
    with pytest.raises(ValueError, match=r"tiles of at least 16 .* block_k 8 \(K=8\)"):
        grouped_gemm(x[:, :8], w[:, :8].astype(jnp.bfloat16), tiles, rows, interpret=False)
