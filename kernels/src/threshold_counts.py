"""Tokens and probability mass above each of a few cut points, per row of logits: one pass of the
sampler's threshold search (top-k / top-p without sorting the vocabulary).

Why a kernel: XLA made "for each of 16 cuts, count the logits above it" over a [rows, vocab] array
a reduction over a middle axis, and the search slower than the sort it replaces (RESULTS.md,
"Filtered sampling without a vocabulary sort"). Here program (row, part) streams its part of the
row once, `block` logits per loop step, each cut keeping a count and a mass per lane in registers;
a small XLA reduction adds the parts. Rows are split into parts so that few rows still give every
SM a program. At many rows the compares, not the reads, bound it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from .device import multiprocessor_count
from .paged_blocks import compiler_params, resolve_interpret

BLOCK = 512  # logits per loop step: 2 per thread of 8 warps, each with a count and a mass per cut in registers
NUM_WARPS = 8
PROGRAMS_PER_SM = 2


def _counts_kernel(x_ref, top_ref, cuts_ref, counts_ref, masses_ref, *, vocab: int, chunk: int, block: int):
    """x_ref [rows, vocab]; top_ref [rows]; cuts_ref [rows, cuts] -> counts_ref / masses_ref [rows, parts, cuts].

    Each cut keeps a count and a mass per lane, summed across the program once at the end: summing
    across warps in every loop step (shared memory and a barrier) made the search twice as slow."""
    row, part = pl.program_id(0), pl.program_id(1)
    num_cuts = cuts_ref.shape[1]
    cuts = [cuts_ref[row, c] for c in range(num_cuts)]
    top = top_ref[row]
    start = part * chunk
    end = jnp.minimum(start + chunk, vocab)

    def step(i, carry):
        counts, masses = carry
        tokens = start + i * block + jnp.arange(block, dtype=jnp.int32)
        x = x_ref[row, jnp.minimum(tokens, vocab - 1)]  # clamped: every load in bounds
        x = jnp.where(tokens < end, x, -jnp.inf)
        weight = jnp.exp(x - top)
        above = [(x > cut).astype(jnp.float32) for cut in cuts]  # float counts: an add and an FMA per cut
        return (tuple(n + a for n, a in zip(counts, above)), tuple(m + a * weight for m, a in zip(masses, above)))

    zeros = tuple(tuple(jnp.zeros((block,), jnp.float32) for _ in cuts) for _ in range(2))
    counts, masses = lax.fori_loop(0, chunk // block, step, zeros)  # a lane counts at most chunk / block
    ways = jnp.arange(num_cuts, dtype=jnp.int32)
    count = jnp.zeros((num_cuts,), jnp.int32)
    mass = jnp.zeros((num_cuts,), jnp.float32)
    for c in range(num_cuts):
        count = jnp.where(ways == c, jnp.sum(counts[c].astype(jnp.int32)), count)
        mass = jnp.where(ways == c, jnp.sum(masses[c]), mass)
    plgpu.store(counts_ref.at[row, part, ways], count)
    plgpu.store(masses_ref.at[row, part, ways], mass)


def _parts(rows: int, vocab: int, block: int) -> tuple[int, int]:
    """(parts per row, logits per part): enough programs to fill the GPU, whole blocks each."""
    blocks = pl.cdiv(vocab, block)
    parts = max(1, min(blocks, PROGRAMS_PER_SM * multiprocessor_count() // max(rows, 1)))
    chunk = pl.cdiv(blocks, parts) * block
    return pl.cdiv(vocab, chunk), chunk


def check_inputs(x: jax.Array, top: jax.Array, cuts: jax.Array) -> None:
    """Shapes and dtypes, each error naming its input."""
    if x.ndim != 2 or x.dtype != jnp.float32:
        raise ValueError(f"x must be float32 [rows, vocab], got {x.dtype} {x.shape}")
    if top.shape != (x.shape[0],) or top.dtype != jnp.float32:
        raise ValueError(f"top must be float32 [{x.shape[0]}], got {top.dtype} {top.shape}")
    if cuts.ndim != 2 or cuts.shape[0] != x.shape[0] or cuts.dtype != jnp.float32:
        raise ValueError(f"cuts must be float32 [{x.shape[0]}, cuts], got {cuts.dtype} {cuts.shape}")
    if cuts.shape[1] & (cuts.shape[1] - 1):
        raise ValueError(f"the number of cuts must be a power of two (Triton ranges), got {cuts.shape[1]}")


@functools.partial(jax.jit, static_argnames=("block", "num_warps", "interpret"))
def threshold_counts(
    x: jax.Array, top: jax.Array, cuts: jax.Array, *, block: int = BLOCK, num_warps: int = NUM_WARPS,
    interpret: bool | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Per row r and cut c: how many x[r] lie above cuts[r, c], and the sum of their exp(x - top[r]).

    x [rows, vocab] float32 (-inf entries count nowhere); top [rows] float32, at least each row's
    maximum so no weight overflows; cuts [rows, cuts] float32. Returns counts int32 and masses
    float32, each [rows, cuts]; equal to `threshold_counts_reference` up to float32 summation order.
    """
    check_inputs(x, top, cuts)
    rows, vocab = x.shape
    parts, chunk = _parts(rows, vocab, block)
    shape = (rows, parts, cuts.shape[1])
    counts, masses = pl.pallas_call(
        functools.partial(_counts_kernel, vocab=vocab, chunk=chunk, block=block),
        grid=(rows, parts),
        out_shape=[jax.ShapeDtypeStruct(shape, jnp.int32), jax.ShapeDtypeStruct(shape, jnp.float32)],
        compiler_params=compiler_params(num_warps=num_warps, num_stages=2),
        interpret=resolve_interpret(interpret),
        name="threshold_counts",
    )(x, top, cuts)
    return jnp.sum(counts, axis=1), jnp.sum(masses, axis=1)


def threshold_counts_reference(x: jax.Array, top: jax.Array, cuts: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Pure-jnp `threshold_counts` (one [rows, vocab, cuts] comparison): the CPU's way and the kernel's oracle."""
    check_inputs(x, top, cuts)
    above = x[:, :, None] > cuts[:, None, :]
    weight = jnp.exp(x - top[:, None])
    return (jnp.sum(above, axis=1, dtype=jnp.int32),
            jnp.sum(jnp.where(above, weight[:, :, None], 0.0), axis=1))
