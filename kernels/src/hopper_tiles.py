"""Shared-memory tiles of the Hopper prefill kernel: their layout for TMA and wgmma, FP8 tiles converted
into the compute dtype, and a tile's rows stored in power-of-two runs."""

from __future__ import annotations

import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

WG_ROWS = 64  # query rows per compute warpgroup: one wgmma M tile
TILE_ROWS = 8  # rows of a shared-memory tile: a TMA copy into one starts on a multiple of it


def smem_tiles(dtype, head_dim: int) -> tuple:
    """Shared-memory transforms of a [rows, head_dim] tile for TMA and wgmma: 8-row tiles, each row
    swizzled by the widest swizzle that fits it (128 bytes; 64 for FP8 with head_dim 64)."""
    bits = jnp.dtype(dtype).itemsize * 8
    swizzle = plgpu.find_swizzle(head_dim * bits)
    return plgpu.TilingTransform((TILE_ROWS, swizzle * 8 // bits)), plgpu.SwizzleTransform(swizzle)


def convert_tile(src, dst) -> None:
    """Copy the FP8 [rows, d] tile src into dst (the compute dtype, same shape), WG_ROWS rows a time
    through registers, then fence and sync the warpgroup so that a wgmma (the async proxy) reads it.

    Each store first syncs the warpgroup (Pallas' automatic barrier), so every warp's wgmma that read
    dst before has been waited on. e4m3 -> f16 is one conversion instruction on sm_89+, and f16 ->
    bf16 is exact for every e4m3 value (the direct e4m3 -> bf16 needs a newer ptxas than we can assume).
    """
    for row in range(0, src.shape[0], WG_ROWS):
        piece = src.at[pl.ds(row, WG_ROWS)][...]
        dst.at[pl.ds(row, WG_ROWS)][...] = piece.astype(jnp.float16).astype(dst.dtype)
    plgpu.commit_smem()


def store_row_runs(o_tile, out_ref, tile_row, first, num_rows, head) -> None:
    """TMA-store o_tile rows first:first + num_rows (dynamic) to out_ref[tile_row + first:, head].

    A TMA copy has a static shape, so the rows go out as runs of 64, 32, ..., 1 rows: one run per
    set bit of num_rows, each only when that bit is set. The tile's other rows belong to the
    neighbouring sequences (or do not exist) and are never written.
    """
    start = first
    run = WG_ROWS
    while run >= 1:
        @pl.when(num_rows & run != 0)
        def _store(start=start, run=run):
            plgpu.copy_smem_to_gmem(o_tile.at[pl.ds(start, run)], out_ref.at[pl.ds(tile_row + start, run), head])

        start = start + (num_rows & run)
        run //= 2
