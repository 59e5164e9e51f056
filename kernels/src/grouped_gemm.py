"""Grouped GEMM over rows grouped by expert: the mixture-of-experts projections, reading only the
experts that some row is routed to.

Layout (`align_to_tiles`, in the spirit of vLLM's fused-MoE "align block size"): the pairs (token,
expert) are sorted by expert and each expert's group is padded to a multiple of `block_m` rows, so
every row tile belongs to one expert. The padded length is a static bound (`padded_rows`), so a
bucket compiles once whatever the routing. Tiles past the used ones are marked -1.

Kernel: program (row tile, column block) loads its tile's expert id, returns at once for an unused
tile, gathers its rows of x (by index, in the kernel: no padded copy of x in memory) and runs a K
loop of [block_m, block_k] x [block_k, block_n] dots over that expert's weights into a float32
accumulator. An expert that no row is routed to is never read: a decode step of T tokens reads at
most T*k experts' weights, where `lax.ragged_dot`'s default GPU lowering reads all of them
(models/moe.py). Programs are ordered in groups of `group_m` row tiles per column block, so the
tiles of one expert (prefill) find its weight block in L2 and the rows of a tile are gathered
while still in L2 for the next column block.

FP8 weights (float8_e4m3fn) convert to x's dtype after each load, so memory moves one byte per
weight. Their float32 scale is [experts, k_blocks, N]: one row per block of K / k_blocks inputs. With
one row (per-channel or per-tensor scales) it multiplies the accumulator once, after the K loop;
with block-wise scales (128 x 128 blocks of Qwen3-*-FP8, DeepSeek) every K tile lies in one block
and its partial product is multiplied by that block's row before it is added. Triton converts e4m3
on sm_89 and later (Ada, Hopper).

Every row index is in bounds: padding rows inside a used tile read row 0 of x and their outputs are
garbage nobody reads; unused tiles are not written at all. Only the rows `row_of_pair` names hold
results.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from .paged_blocks import compiler_params, resolve_interpret

FP8_DTYPE = jnp.dtype(jnp.float8_e4m3fn)
MIN_TILE = 16  # a tensor-core dot's smallest M, N and K in Triton
MAX_BLOCK_M = 128  # a prefill's tile; vLLM's tuned H100 configs of these shapes take 128 from 1,536 tokens


class TileLayout(NamedTuple):
    """Where each pair goes in the padded, expert-grouped order (all int32).

    pair_of_row:  [padded] the pair each padded row holds (0 for padding rows)
    tile_experts: [padded // block_m] the expert of each row tile, -1 for unused tiles
    row_of_pair:  [pairs] the padded row of each pair, in the pairs' own order
    """

    pair_of_row: jax.Array
    tile_experts: jax.Array
    row_of_pair: jax.Array


def padded_rows(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Static bound on the rows after padding: at most min(experts, pairs) groups are non-empty and
    each adds fewer than block_m rows."""
    return pl.cdiv(num_pairs + min(num_experts, num_pairs) * (block_m - 1), block_m) * block_m


def default_block_m(num_pairs: int, num_experts: int) -> int:
    """Rows per tile: about the mean group size (a power of two in 16..128), so small batches waste few
    padding rows and large ones reuse each weight tile over many rows."""
    return min(MAX_BLOCK_M, max(MIN_TILE, pl.next_power_of_2(pl.cdiv(num_pairs, num_experts))))


def align_to_tiles(expert_ids: jax.Array, num_experts: int, block_m: int) -> TileLayout:
    """expert_ids [pairs] int32 (each in 0..num_experts-1) -> the TileLayout of its stable sort by expert."""
    pairs = expert_ids.shape[0]
    num_tiles = padded_rows(pairs, num_experts, block_m) // block_m
    counts = jnp.bincount(expert_ids, length=num_experts).astype(jnp.int32)
    tiles_per_expert = pl.cdiv(counts, block_m)
    tile_ends = jnp.cumsum(tiles_per_expert, dtype=jnp.int32)
    group_starts = (tile_ends - tiles_per_expert) * block_m
    order = jnp.argsort(expert_ids, stable=True).astype(jnp.int32)  # pairs in expert order
    sorted_ids = expert_ids[order]
    first_sorted = jnp.cumsum(counts, dtype=jnp.int32) - counts
    rows = group_starts[sorted_ids] + jnp.arange(pairs, dtype=jnp.int32) - first_sorted[sorted_ids]
    pair_of_row = jnp.zeros((num_tiles * block_m,), jnp.int32).at[rows].set(order, unique_indices=True)
    row_of_pair = jnp.zeros((pairs,), jnp.int32).at[order].set(rows, unique_indices=True)
    tiles = jnp.arange(num_tiles, dtype=jnp.int32)
    # compare_all: one fused compare-and-sum instead of a loop of ~log2(experts) tiny launches
    expert = jnp.searchsorted(tile_ends, tiles, side="right", method="compare_all").astype(jnp.int32)
    tile_experts = jnp.where(tiles < tile_ends[-1], expert, -1)
    return TileLayout(pair_of_row, tile_experts, row_of_pair)


def fit_block(dim: int, preferred: int) -> int:
    """The largest power of two <= preferred that divides dim, so no load or store needs a mask."""
    block = 1
    while block * 2 <= preferred and dim % (block * 2) == 0:
        block *= 2
    return block


def grouped_gemm_unsupported(k: int, n: int) -> str | None:
    """Why the compiled kernel cannot take weights [experts, k, n], or None: Triton's dots need tiles
    of at least MIN_TILE that divide both dims."""
    for name, dim in (("contraction", k), ("output", n)):
        if dim % MIN_TILE:
            return f"the {name} dim ({dim}) of the expert weights is not a multiple of {MIN_TILE}"
    return None


def _program_tile(num_tiles: int, num_cols: int, group_m: int) -> tuple[jax.Array, jax.Array]:
    """(row tile, column block) of this program: group_m row tiles run down each column block in turn."""
    pid = pl.program_id(0)
    per_group = group_m * num_cols
    first = pid // per_group * group_m
    rows_in_group = jnp.minimum(num_tiles - first, group_m)
    within = pid % per_group
    return first + within % rows_in_group, within // rows_in_group


def _gemm_kernel(tile_experts_ref, *refs, block_m: int, block_n: int, block_k: int, group_m: int, gather: bool,
                 scaled: bool):
    """refs: rows_ref [padded] int32 if gather; x_ref [rows, K] (gather) or [padded, K]; w_ref
    [experts, K, N]; scale_ref [experts, k_blocks, N] f32 if scaled; out_ref [padded, N]."""
    rows_ref, refs = (refs[0], refs[1:]) if gather else (None, refs)
    x_ref, w_ref, *refs = refs
    scale_ref, out_ref = refs if scaled else (None, refs[0])
    num_tiles = tile_experts_ref.shape[0]
    tile, col = _program_tile(num_tiles, out_ref.shape[1] // block_n, group_m)
    expert = tile_experts_ref[tile]

    @pl.when(expert >= 0)
    def _():
        first_row = tile * block_m
        cols = pl.ds(col * block_n, block_n)
        rows = rows_ref[pl.ds(first_row, block_m)] if gather else None
        precision = lax.Precision.HIGHEST if x_ref.dtype == jnp.float32 else None
        k_blocks = scale_ref.shape[1] if scaled else 1
        tiles_per_block = x_ref.shape[1] // k_blocks // block_k

        def step(i, acc):
            if gather:
                k_index = i * block_k + jnp.arange(block_k, dtype=jnp.int32)
                x = x_ref[rows[:, None], k_index[None, :]]
            else:
                x = x_ref[pl.ds(first_row, block_m), pl.ds(i * block_k, block_k)]
            w = w_ref[expert, pl.ds(i * block_k, block_k), cols].astype(x.dtype)
            part = lax.dot(x, w, precision=precision, preferred_element_type=jnp.float32)
            if k_blocks > 1:
                part = part * scale_ref[expert, i // tiles_per_block, cols][None, :]
            return acc + part

        acc = lax.fori_loop(0, x_ref.shape[1] // block_k, step, jnp.zeros((block_m, block_n), jnp.float32))
        if scaled and k_blocks == 1:
            acc = acc * scale_ref[expert, 0, cols][None, :]
        out_ref[pl.ds(first_row, block_m), cols] = acc.astype(out_ref.dtype)


def check_inputs(x: jax.Array, w: jax.Array, tile_experts: jax.Array, rows: jax.Array | None,
                 scale: jax.Array | None) -> None:
    """Shapes and dtypes, each error naming its input."""
    if x.ndim != 2 or x.dtype not in (jnp.bfloat16, jnp.float16, jnp.float32):
        raise ValueError(f"x must be [rows, K] bfloat16, float16 or float32, got {x.dtype} {x.shape}")
    if w.ndim != 3 or w.shape[1] != x.shape[1]:
        raise ValueError(f"w must be [experts, K={x.shape[1]}, N], got {w.shape}")
    if w.dtype not in (x.dtype, FP8_DTYPE):
        raise ValueError(f"w must be x's dtype ({x.dtype}) or float8_e4m3fn, got {w.dtype}")
    if (scale is not None) != (w.dtype == FP8_DTYPE):
        raise ValueError(f"scale must be given exactly when w is float8_e4m3fn (w is {w.dtype})")
    if scale is not None and (scale.ndim != 3 or scale.shape[::2] != w.shape[::2] or scale.dtype != jnp.float32):
        raise ValueError(f"scale must be float32 [experts={w.shape[0]}, k_blocks, N={w.shape[2]}], "
                         f"got {scale.dtype} {scale.shape}")
    if scale is not None and w.shape[1] % scale.shape[1]:
        raise ValueError(f"scale's {scale.shape[1]} blocks (axis 1) do not split K={w.shape[1]} evenly")
    if tile_experts.ndim != 1 or tile_experts.dtype != jnp.int32:
        raise ValueError(f"tile_experts must be int32 [tiles], got {tile_experts.dtype} {tile_experts.shape}")
    if rows is not None and (rows.ndim != 1 or rows.dtype != jnp.int32):
        raise ValueError(f"rows must be int32 [padded], got {rows.dtype} {rows.shape}")
    padded = x.shape[0] if rows is None else rows.shape[0]
    if padded % tile_experts.shape[0]:
        raise ValueError(f"the padded rows ({padded}: rows' length, or x's without rows) must be a multiple of "
                         f"the {tile_experts.shape[0]} tiles")


@functools.partial(
    jax.jit, static_argnames=("out_dtype", "block_n", "block_k", "group_m", "num_warps", "num_stages", "interpret")
)
def grouped_gemm(
    x: jax.Array,
    w: jax.Array,
    tile_experts: jax.Array,
    rows: jax.Array | None = None,
    scale: jax.Array | None = None,
    *,
    out_dtype: jnp.dtype | None = None,
    block_n: int = 64,
    block_k: int = 64,
    group_m: int = 8,
    num_warps: int = 4,
    num_stages: int = 3,
    interpret: bool | None = None,
) -> jax.Array:
    """Row r of the result is x[rows[r]] @ (w[e] times its scale), e the expert of r's tile.

    x [rows_in, K]; w [experts, K, N] in x's dtype, or float8_e4m3fn with scale [experts, k_blocks, N]
    float32 (row b scales inputs b * K / k_blocks onwards; k_blocks 1 for per-channel scales, and a
    per-tensor scale broadcast over N); tile_experts [tiles] int32 (-1: unused); rows [padded] int32
    indices into x, or None when x is already in padded order ([padded, K]). block_m = padded // tiles.
    Returns [padded, N] in out_dtype (default x's); rows of unused tiles are left unwritten. block_n,
    block_k: preferred tile sizes, shrunk to powers of two that divide N and K / k_blocks (so that a K
    tile never straddles two scale blocks).
    """
    check_inputs(x, w, tile_experts, rows, scale)
    padded = x.shape[0] if rows is None else rows.shape[0]
    num_tiles = tile_experts.shape[0]
    block_m = padded // num_tiles
    _, k, n = w.shape
    k_blocks = 1 if scale is None else scale.shape[1]
    block_n, block_k = fit_block(n, block_n), fit_block(k // k_blocks, block_k)
    interpret = resolve_interpret(interpret)
    if not interpret and min(block_m, block_n, block_k) < MIN_TILE:
        per_block = f", {k // k_blocks} a scale block" if k_blocks > 1 else ""
        raise ValueError(f"grouped_gemm on the GPU needs tiles of at least {MIN_TILE} (Triton's dots), got "
                         f"block_m {block_m}, block_n {block_n} (N={n}), block_k {block_k} (K={k}{per_block})")
    kernel = functools.partial(_gemm_kernel, block_m=block_m, block_n=block_n, block_k=block_k, group_m=group_m,
                               gather=rows is not None, scaled=scale is not None)
    operands = [tile_experts, *([] if rows is None else [rows]), x, w, *([] if scale is None else [scale])]
    return pl.pallas_call(
        kernel,
        grid=(num_tiles * (n // block_n),),
        out_shape=jax.ShapeDtypeStruct((padded, n), out_dtype or x.dtype),
        compiler_params=compiler_params(num_warps, num_stages),
        interpret=interpret,
        name=f"grouped_gemm_bm{block_m}_bn{block_n}_bk{block_k}",
    )(*operands)


def grouped_gemm_reference(x: jax.Array, w: jax.Array, expert_ids: jax.Array,
                           scale: jax.Array | None = None) -> jax.Array:
    """Pure jnp, pair by pair: x [pairs, K], expert_ids [pairs], scale [experts, k_blocks, N] ->
    x[p] @ (w[e_p] * scale[e_p], each scale row repeated over its K / k_blocks inputs) [pairs, N]
    float32. The test oracle."""
    weights = w[expert_ids].astype(jnp.float32)
    if scale is not None:
        weights = weights * jnp.repeat(scale[expert_ids], w.shape[1] // scale.shape[1], axis=1)
    return jnp.einsum("pk,pkn->pn", x.astype(jnp.float32), weights, precision=lax.Precision.HIGHEST)
