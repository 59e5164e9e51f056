"""Prefill attention over paged K/V for Hopper GPUs (sm_90), written for Pallas' Mosaic GPU backend.

Same inputs and result as `ragged_paged_attention`. The Triton-lowered block kernel there gathers
K/V row by row and runs both matmuls and the softmax in one program order; here each program
splits into three warpgroups, as FlashAttention-3 does:
- a memory warpgroup copies each block of block_kv keys page by page with TMA (one bulk copy per
  page, or per block_kv slice of a large page) into a ring of `num_stages` shared-memory slots;
- two compute warpgroups each take 64 query rows of one q head, run q @ k^T and p @ v as wgmma,
  and take turns on the tensor cores (a shared barrier), so one's softmax overlaps the other's
  matmuls.

Work items are (block of 128 query rows of one sequence, q head). A TMA tile starts on a multiple
of 8 rows, so a block's tile may begin up to 7 rows before its sequence: those rows are read,
computed and never stored. The output goes out in power-of-two row runs that add up to the rows
the block owns. Keys are read in whole pages: keys past a row's causal limit, including a last
page's unused slots, get probability 0, so those slots must hold finite values (the engine's pool
holds model K/V or zeros; the Triton kernel tolerates NaN there, this one does not). Page 0 and
pages past a sequence's last are never read.

FP8 pages (float8_e4m3fn; the per-layer scales are applied outside, `layers/attention.py`): TMA
copies the FP8 tiles into the ring (half a bf16 slot's bytes). wgmma takes its B operand (K, V)
only from shared memory in the compute dtype, so before each matmul the compute warpgroup loads
the slot into registers, converts it (e4m3 -> f16 -> q's dtype, exact) and stores it into its own
swizzled tile, `kv_wide[wg]`, then frees the slot; K and then V of a step share that tile, each
written only after the wgmma that read it has been waited on. Shared memory stays at a bf16 pool's
(two half-size ring slots per stage plus the two wide tiles: 192 KiB at head_dim 128).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from .device import multiprocessor_count
from .hopper_tiles import TILE_ROWS, WG_ROWS, convert_tile, smem_tiles, store_row_runs
from .paged_blocks import LOG2E, block_schedule, check_inputs
from .paged_decode_attention import paged_decode_attention

COMPUTE_WGS = 2
# Programs per multiprocessor (one runs at a time: ~190 KiB of shared memory each); 8 beat 1, 2, 4 and
# 16 (RESULTS.md, "Prefill on Hopper: a Mosaic GPU kernel at 80-90% of cuDNN").
PROGRAMS_PER_SM = 8
SUPPORTED_DTYPES = (jnp.bfloat16, jnp.float16)
FP8_KV_DTYPE = jnp.float8_e4m3fn  # the engine's FP8 KV cache


def hopper_prefill_unsupported(
    dtype, head_dim: int, page_size: int, block_kv: int = 128, kv_dtype=None
) -> str | None:
    """Why these inputs cannot run on this kernel, or None when they can. kv_dtype: the pool's
    (None: dtype): the model's dtype, or float8_e4m3fn (an FP8 KV cache, converted in the kernel:
    module doc)."""
    if jnp.dtype(dtype) not in map(jnp.dtype, SUPPORTED_DTYPES):
        return f"dtype must be bfloat16 or float16, got {jnp.dtype(dtype).name}"
    if kv_dtype is not None and jnp.dtype(kv_dtype) not in (jnp.dtype(dtype), jnp.dtype(FP8_KV_DTYPE)):
        return f"kv_dtype must be {jnp.dtype(dtype).name} or float8_e4m3fn, got {jnp.dtype(kv_dtype).name}"
    if head_dim not in (64, 128):
        return f"head_dim must be 64 or 128, got {head_dim}"
    chunk = min(page_size, block_kv)
    if chunk % TILE_ROWS or max(page_size, block_kv) % chunk:
        return f"page_size must be a multiple of {TILE_ROWS} that divides or is divided by {block_kv}, got {page_size}"
    return None


def _attention_kernel(
    num_blocks_ref,
    block_seq_ref,
    block_rows_ref,
    kv_lens_ref,
    cu_q_lens_ref,
    table_ref,
    q_ref,
    k_ref,
    v_ref,
    out_ref,
    scoped,
    *,
    scale_log2: float,
    page_size: int,
    pages_per_seq: int,
    group: int,
    block_kv: int,
    num_stages: int,
    num_programs: int,
):
    """q_ref, out_ref: [tokens, q_heads, d]; k_ref, v_ref: [kv_heads, pages, page_size, d], q's dtype or
    FP8 (GMEM; scoped holds kv_wide, the compute warpgroups' tiles, only for FP8).

    num_blocks_ref: [1] blocks in use; block_seq_ref: [blocks] sequence of each block (-1: padding
    rows, stored as zeros); block_rows_ref: [blocks, 3] first row (a multiple of TILE_ROWS), first
    and one-past-last owned row (`block_schedule`). out_ref is written in place, owned rows only.

    Persistent over a capped grid: program p works through items (block, q head) p, then
    2N - 1 - p, 2N + p, ... (N programs; a snake, so that long and short blocks even out). A
    bucket's static block count is mostly empty blocks (it must allow a block per sequence), and
    a program per block would cost a launch each. The ring of
    K/V slots runs on across items: `base` counts the ring steps before the item, in every warpgroup.
    """
    (q_smem, o_smem, k_smem, v_smem, *kv_wide), (k_ready, v_ready, q_ready), (k_free, v_free), turn = scoped
    program, wg = lax.axis_index("program"), lax.axis_index("wg")
    num_q_heads = q_ref.shape[1]
    num_items = num_blocks_ref[0] * num_q_heads
    num_rounds = pl.cdiv(num_items, num_programs)

    def item_at(round_):
        """The round's (block, head, sequence, ...) for this program; an item past the end is empty."""
        lane = jnp.where(lax.rem(round_, 2) == 0, program, num_programs - 1 - program)
        item = round_ * num_programs + lane
        in_use = item < num_items
        item = jnp.minimum(item, num_items - 1)
        block, head = lax.div(item, num_q_heads), lax.rem(item, num_q_heads)
        seq_or_pad = block_seq_ref[block]
        seq = jnp.maximum(seq_or_pad, 0)
        q_begin, kv_len = cu_q_lens_ref[seq], kv_lens_ref[seq]
        prefix = kv_len - (cu_q_lens_ref[seq + 1] - q_begin)
        owned_end = jnp.where(in_use, block_rows_ref[block, 2], 0)
        return dict(
            head=head,
            is_real=in_use & (seq_or_pad >= 0),
            seq=seq,
            kv_len=kv_len,
            prefix=prefix,
            q_begin=q_begin,
            tile_begin=block_rows_ref[block, 0],
            owned_begin=jnp.where(in_use, block_rows_ref[block, 1], 0),
            owned_end=owned_end,
            # keys the last row of the block sees: ring steps of this item, in every warpgroup
            steps=jnp.where(in_use & (seq_or_pad >= 0), pl.cdiv(prefix + owned_end - q_begin, block_kv), 0),
        )

    def slot_of(ring_step):
        return lax.rem(ring_step, jnp.int32(num_stages))

    def take_turn():
        plgpu.barrier_arrive(turn)
        plgpu.barrier_wait(turn)

    kv_fp8 = bool(kv_wide)  # FP8 pages: each step's K, then its V, converted into kv_wide[0][wg] first

    @pl.when(wg < COMPUTE_WGS)
    def _compute():
        plgpu.set_max_registers(232, action="increase")
        q_tile, o_tile = q_smem.at[wg], o_smem.at[wg]

        def operand(ring, free, slot):
            """The slot as wgmma's B operand: itself, or its FP8 tile converted (the slot freed at once)."""
            if not kv_fp8:
                return ring.at[slot]
            wide = kv_wide[0].at[wg]
            convert_tile(ring.at[slot], wide)
            plgpu.barrier_arrive(free.at[slot])
            return wide

        def run_item(round_, base):
            it = item_at(round_)
            wg_row = pl.multiple_of(it["tile_begin"] + wg * WG_ROWS, TILE_ROWS)
            lo = jnp.clip(it["owned_begin"] - wg_row, 0, WG_ROWS)  # this warpgroup owns tile rows lo:hi
            hi = jnp.clip(it["owned_end"] - wg_row, lo, WG_ROWS)
            tile_pos = it["prefix"] + wg_row - it["q_begin"]  # key position of tile row 0 (< 0: foreign row)
            kv_steps = jnp.where(it["is_real"] & (hi > lo), pl.cdiv(tile_pos + hi, block_kv), 0)
            # Steps whose keys every owned row sees whole: no mask (foreign rows are never stored).
            full_steps = jnp.clip(lax.div(tile_pos + lo + 1, jnp.int32(block_kv)), 0, kv_steps)

            @pl.when(kv_steps > 0)
            def _load_q():
                plgpu.copy_gmem_to_smem(q_ref.at[pl.ds(wg_row, WG_ROWS), it["head"]], q_tile, q_ready.at[wg])
                plgpu.barrier_wait(q_ready.at[wg])
                plgpu.barrier_wait(k_ready.at[slot_of(base)])

            rows_layout = plgpu.Layout.WGMMA.reduce(1)
            m = plgpu.layout_cast(jnp.full((WG_ROWS,), -jnp.inf, jnp.float32), rows_layout)
            l = plgpu.layout_cast(jnp.full((WG_ROWS,), 0.0, jnp.float32), rows_layout)
            acc = plgpu.layout_cast(jnp.full((WG_ROWS, q_tile.shape[-1]), 0.0, jnp.float32), plgpu.Layout.WGMMA)

            pl.when(wg == 1)(take_turn)  # warpgroup 0 goes first on the tensor cores

            def kv_step(step, carry, masked: bool):
                acc, m, l = carry
                slot = slot_of(base + step)

                k_tile = operand(k_smem, k_free, slot)

                def scores_of(scores_ref):
                    plgpu.wgmma(scores_ref, q_tile, plgpu.transpose_ref(k_tile, (1, 0)))
                    take_turn()
                    return scores_ref[...]

                s = pl.run_scoped(scores_of, plgpu.ACC((WG_ROWS, block_kv), jnp.float32))
                if not kv_fp8:
                    plgpu.barrier_arrive(k_free.at[slot])
                if masked:
                    shape = (WG_ROWS, block_kv)
                    rows = plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=plgpu.Layout.WGMMA)
                    keys = plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=plgpu.Layout.WGMMA)
                    s = jnp.where(tile_pos + rows >= step * block_kv + keys, s, -jnp.inf)
                m_next = jnp.maximum(m, s.max(axis=1) * scale_log2)
                alpha = jnp.exp2(m - m_next)
                p = jnp.exp2(s * scale_log2 - lax.broadcast_in_dim(m_next, s.shape, [0]))
                acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                l = l * alpha + p.sum(axis=1)
                p = p.astype(q_tile.dtype)
                acc, l, m_next, p = lax.optimization_barrier((acc, l, m_next, p))
                plgpu.barrier_arrive(turn)  # softmax done: the other warpgroup may issue its matmul
                plgpu.barrier_wait(v_ready.at[slot])
                v_tile = operand(v_smem, v_free, slot)  # FP8: converted while the other warpgroup multiplies
                plgpu.barrier_wait(turn)  # the tensor cores are ours again

                def accumulate(acc_ref):
                    plgpu.wgmma(acc_ref, p, v_tile)

                    @pl.when(step + 1 < kv_steps)
                    def _wait_next_keys():
                        plgpu.barrier_wait(k_ready.at[slot_of(base + step + 1)])

                acc = pl.run_state(accumulate)(plgpu.ACC.init(acc))
                if not kv_fp8:
                    plgpu.barrier_arrive(v_free.at[slot])
                return acc, m_next, l

            def release_step(step, _):
                # A step past this warpgroup's last row: observe the slot's fill (each barrier's
                # phase is tracked per thread, so no fill may go unwaited), free it, keep the turns.
                slot = slot_of(base + step)
                plgpu.barrier_wait(k_ready.at[slot])
                plgpu.barrier_arrive(k_free.at[slot])
                take_turn()
                plgpu.barrier_wait(v_ready.at[slot])
                plgpu.barrier_arrive(v_free.at[slot])
                take_turn()

            carry = lax.fori_loop(0, full_steps, functools.partial(kv_step, masked=False), (acc, m, l))
            acc, m, l = lax.fori_loop(full_steps, kv_steps, functools.partial(kv_step, masked=True), carry)
            lax.fori_loop(kv_steps, it["steps"], release_step, None)
            pl.when(wg == 0)(take_turn)

            # l >= 1 for every owned row (its running maximum adds exp2(0)); padding rows have acc = 0.
            out = acc / lax.broadcast_in_dim(jnp.maximum(l, 1.0), acc.shape, [0])
            o_tile[...] = out.astype(o_tile.dtype)
            plgpu.commit_smem()
            store_row_runs(o_tile, out_ref, wg_row, lo, hi - lo, it["head"])
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # o_tile is free for the next item
            return base + it["steps"]

        lax.fori_loop(0, num_rounds, run_item, jnp.int32(0))
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == COMPUTE_WGS)
    def _memory():
        plgpu.set_max_registers(40, action="decrease")
        chunk = min(page_size, block_kv)

        def fill_item(round_, base):
            it = item_at(round_)
            kv_head = lax.div(it["head"], jnp.int32(group))
            last_page = lax.div(jnp.maximum(it["kv_len"] - 1, 0), jnp.int32(page_size))
            table_base = it["seq"] * pages_per_seq

            def copy_block(step, slot, src_ref, dst_smem, ready):
                for j in range(block_kv // chunk):
                    key = step * block_kv + j * chunk
                    page = table_ref[table_base + jnp.minimum(lax.div(key, jnp.int32(page_size)), last_page)]
                    offset = 0 if chunk == page_size else pl.multiple_of(lax.rem(key, jnp.int32(page_size)), chunk)
                    plgpu.copy_gmem_to_smem(
                        src_ref.at[kv_head, page, pl.ds(offset, chunk)],
                        dst_smem.at[slot, pl.ds(j * chunk, chunk)],
                        ready.at[slot],
                    )

            @pl.loop(0, it["steps"])
            def _fill(step):
                ring_step = base + step
                slot = slot_of(ring_step)

                @pl.when(ring_step >= num_stages)
                def _wait_k_slot():
                    plgpu.barrier_wait(k_free.at[slot])

                copy_block(step, slot, k_ref, k_smem, k_ready)

                @pl.when(ring_step >= num_stages)
                def _wait_v_slot():
                    plgpu.barrier_wait(v_free.at[slot])

                copy_block(step, slot, v_ref, v_smem, v_ready)

            return base + it["steps"]

        lax.fori_loop(0, num_rounds, fill_item, jnp.int32(0))


@functools.partial(jax.jit, static_argnames=("sm_scale", "block_kv", "num_stages", "num_programs"))
def hopper_prefill_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    kv_lens: jax.Array,
    page_table: jax.Array,
    cu_q_lens: jax.Array,
    *,
    sm_scale: float,
    block_kv: int = 128,
    num_stages: int = 2,
    num_programs: int | None = None,
) -> jax.Array:
    """Attention of ragged new tokens over paged K/V (layouts and semantics: `reference.py`).

    q: [tokens, q_heads, head_dim]; k_pages, v_pages: [kv_heads, pages, page_size, head_dim];
    kv_lens: [seqs]; page_table: [seqs, pages_per_seq]; cu_q_lens: [seqs + 1] (all int32).
    Rows of q_len == 1 sequences go to the decode kernel; this kernel writes the others and zeroes
    padding rows. Needs a Hopper GPU, bf16/fp16 q, pages of q's dtype or float8_e4m3fn, head_dim 64
    or 128, and a page size that is a multiple of 8 dividing or divided by block_kv
    (`hopper_prefill_unsupported` says why not).
    """
    check_inputs(q, k_pages, v_pages, kv_lens, page_table, cu_q_lens)
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads, _, page_size, _ = k_pages.shape
    if reason := hopper_prefill_unsupported(q.dtype, head_dim, page_size, block_kv, k_pages.dtype):
        raise ValueError(f"hopper_prefill_attention: {reason}")
    if block_kv % 64 or num_stages < 2:
        raise ValueError(f"block_kv must be a multiple of 64 and num_stages >= 2, got {block_kv}, {num_stages}")
    decoded = paged_decode_attention(
        q, k_pages, v_pages, kv_lens, page_table, cu_q_lens,
        sm_scale=sm_scale, rows_are_seqs=False, num_splits=1, interpret=False,
    )
    block_seq, block_rows, num_blocks = block_schedule(cu_q_lens, num_tokens, COMPUTE_WGS * WG_ROWS, align=TILE_ROWS)
    # TMA tiles q's token axis by TILE_ROWS: pad odd sizes (engine buckets are multiples of 64).
    padded_tokens = pl.cdiv(num_tokens, TILE_ROWS) * TILE_ROWS
    if padded_tokens != num_tokens:
        q = jnp.pad(q, ((0, padded_tokens - num_tokens), (0, 0), (0, 0)))
        decoded = jnp.pad(decoded, ((0, padded_tokens - num_tokens), (0, 0), (0, 0)))
    dtype, kv_dtype = q.dtype, k_pages.dtype
    tiles, kv_tiles = smem_tiles(dtype, head_dim), smem_tiles(kv_dtype, head_dim)
    # FP8 pages: one tile of the compute dtype per compute warpgroup, for the K, then the V, of a step
    kv_wide = [] if kv_dtype == dtype else [plgpu.SMEM((COMPUTE_WGS, block_kv, head_dim), dtype, transforms=tiles)]
    scratch = (
        (
            plgpu.SMEM((COMPUTE_WGS, WG_ROWS, head_dim), dtype, transforms=tiles),
            plgpu.SMEM((COMPUTE_WGS, WG_ROWS, head_dim), dtype),  # untiled: stored in runs of any row count
            plgpu.SMEM((num_stages, block_kv, head_dim), kv_dtype, transforms=kv_tiles),
            plgpu.SMEM((num_stages, block_kv, head_dim), kv_dtype, transforms=kv_tiles),
            *kv_wide,
        ),
        (
            plgpu.Barrier(num_arrivals=block_kv // min(page_size, block_kv), num_barriers=num_stages),
            plgpu.Barrier(num_arrivals=block_kv // min(page_size, block_kv), num_barriers=num_stages),
            plgpu.Barrier(num_barriers=COMPUTE_WGS),
        ),
        (plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=num_stages),) * 2,
        plgpu.Barrier(num_arrivals=COMPUTE_WGS),
    )
    if num_programs is None:
        num_programs = PROGRAMS_PER_SM * multiprocessor_count()
    body = functools.partial(
        _attention_kernel,
        scale_log2=sm_scale * LOG2E,
        page_size=page_size,
        pages_per_seq=page_table.shape[1],
        group=num_q_heads // num_kv_heads,
        block_kv=block_kv,
        num_stages=num_stages,
        num_programs=num_programs,
    )

    def entry(*refs):
        pl.run_scoped(lambda *scoped: body(*refs, scoped), *scratch, collective_axes="wg")

    mesh = plgpu.Mesh(
        grid=(num_programs,),
        grid_names=("program",),
        num_threads=COMPUTE_WGS + 1,
        thread_name="wg",
    )
    kernel = pl.kernel(
        entry, out_type=(), mesh=mesh, compiler_params=plgpu.CompilerParams(approx_math=True), name="hopper_prefill"
    )
    out = jax.new_ref(decoded)
    # Mosaic GPU requires 256-byte aligned operands. The engine's metadata arrays are slices of one
    # packed int32 step input (and num_blocks an element of a cumsum), which XLA passes as views at
    # arbitrary offsets; max(x, 0), a no-op on these non-negative ints that XLA cannot prove away,
    # gives each its own aligned buffer. block_seq is -1 for padding: max would change it, so it
    # and block_rows, gathered into fresh buffers already, pass as they are.
    own = [jnp.maximum(x, 0) for x in (num_blocks.reshape(1), kv_lens, cu_q_lens, page_table.reshape(-1))]
    kernel(own[0], block_seq, block_rows, *own[1:], q, k_pages, v_pages, out)
    return jax.freeze(out)[:num_tokens]
