"""The Hopper (Mosaic GPU) prefill kernel: lowers on any machine, agrees with the reference on an H100/H200,
over pools of q's dtype and FP8 pools (float8_e4m3fn, converted in the kernel).

Mosaic GPU kernels have no CPU interpreter that covers wgmma on transposed tiles, so the numerical
checks run only where JAX sees a Hopper GPU (`benchmarks/kernel_bench.py` runs them too); CI checks
that the kernel still lowers for CUDA with this jax, and the input checks.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from paged_inputs import make_batch, rel_err

from minisgl_jax.kernels import hopper_prefill_attention, hopper_prefill_unsupported, ragged_paged_attention_reference
from minisgl_jax.kernels.reference import quantize_kv

BF16_TOL = 2e-2
FP8 = jnp.float8_e4m3fn
PAGE_SIZES = [8, 16, 64, 128, 256]


def on_hopper() -> bool:
    return jax.default_backend() == "gpu" and getattr(jax.devices()[0], "compute_capability", "") == "9.0"


needs_hopper = pytest.mark.skipif(not on_hopper(), reason="needs an sm_90 GPU")


def check(args, sm_scale: float = 0.3, pool=None) -> np.ndarray:
    """Kernel on args (with k/v swapped for `pool` when given) against the float32 reference on args."""
    run_args = args if pool is None else (args[0], *pool, *args[3:])
    out = hopper_prefill_attention(*run_args, sm_scale=sm_scale)
    wide = [a.astype(jnp.float32) if a.dtype in (jnp.bfloat16, jnp.float16) else a for a in args]
    ref = ragged_paged_attention_reference(*wide, sm_scale=sm_scale)
    assert out.dtype == args[0].dtype and out.shape == args[0].shape
    assert rel_err(out, ref) < BF16_TOL
    return np.asarray(out, np.float32)


def check_fp8(args, sm_scale: float = 0.3) -> np.ndarray:
    """The kernel over the pools as FP8 pages against the reference over those pages dequantized (scale
    1: the engine applies the per-layer scales outside the kernel). K is 3x wider so scores are not flat."""
    q, k, v, *meta = args
    k8, v8 = quantize_kv(3.0 * k, 1.0, FP8), quantize_kv(v, 1.0, FP8)
    return check((q, k8.astype(jnp.float32), v8.astype(jnp.float32), *meta), sm_scale, pool=(k8, v8))


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="the GPU tests below compile it")
def test_lowers_for_cuda_on_any_machine():
    args = make_batch(0, [300, 1, 77], [300, 50, 200], page_size=16, q_heads=16, kv_heads=8, head_dim=128,
                      dtype=jnp.bfloat16)
    fn = jax.jit(lambda *a: hopper_prefill_attention(*a, sm_scale=0.1))
    text = fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="the GPU tests below compile it")
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("page_size", PAGE_SIZES)
def test_lowers_for_cuda_over_fp8_pages(head_dim, page_size):
    # FP8 ring slots (64-byte swizzle at head_dim 64), converted into bf16 tiles before each wgmma
    q, k, v, lens, table, cu = make_batch(0, [300, 1, 77], [300, 50, 200], page_size=page_size, q_heads=16,
                                          kv_heads=8, head_dim=head_dim, dtype=jnp.bfloat16)
    fn = jax.jit(lambda *a: hopper_prefill_attention(*a, sm_scale=0.1))
    lowered = fn.trace(q, k.astype(FP8), v.astype(FP8), lens, table, cu).lower(lowering_platforms=("cuda",))
    assert "mosaic_gpu" in lowered.as_text()


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="the GPU tests below compile it")
def test_lowers_per_shard_under_shard_map():
    # tensor parallelism runs attention per shard (layers/attention.py): 8 of 16 q heads, 4 of 8 kv heads
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    args = make_batch(0, [300, 1, 77], [300, 50, 200], page_size=16, q_heads=16, kv_heads=8, head_dim=128,
                      dtype=jnp.bfloat16)
    mesh = Mesh(jax.devices()[:2], ("tp",))
    heads, pool = P(None, "tp", None), P("tp", None, None, None)
    fn = jax.shard_map(lambda *a: hopper_prefill_attention(*a, sm_scale=0.1), mesh=mesh,
                       in_specs=(heads, pool, pool, P(), P(), P()), out_specs=heads, check_vma=False)
    assert "mosaic_gpu" in jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def test_unsupported_inputs_say_why():
    assert hopper_prefill_unsupported(jnp.bfloat16, 128, 16) is None
    assert "float32" in hopper_prefill_unsupported(jnp.float32, 128, 16)
    assert "head_dim" in hopper_prefill_unsupported(jnp.bfloat16, 96, 16)
    assert "page_size" in hopper_prefill_unsupported(jnp.bfloat16, 128, 1)
    assert "page_size" in hopper_prefill_unsupported(jnp.bfloat16, 128, 24)
    assert hopper_prefill_unsupported(jnp.bfloat16, 128, 16, kv_dtype=FP8) is None
    assert hopper_prefill_unsupported(jnp.float16, 64, 16, kv_dtype=FP8) is None
    assert "kv_dtype must be bfloat16 or float8_e4m3fn" in hopper_prefill_unsupported(
        jnp.bfloat16, 128, 16, kv_dtype=jnp.float16)
    assert "float8_e5m2" in hopper_prefill_unsupported(jnp.bfloat16, 128, 16, kv_dtype=jnp.float8_e5m2)
    args = make_batch(1, [5], [5], page_size=16)  # float32
    with pytest.raises(ValueError, match="dtype must be bfloat16 or float16"):
        hopper_prefill_attention(*args, sm_scale=1.0)
    q, k, v, lens, table, cu = make_batch(1, [5], [5], page_size=16, dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match="cu_q_lens"):
        hopper_prefill_attention(q, k, v, lens, table, cu[:1], sm_scale=1.0)
    with pytest.raises(ValueError, match="kv_heads"):
        hopper_prefill_attention(q[:, :3], k, v, lens, table, cu, sm_scale=1.0)


@needs_hopper
@pytest.mark.parametrize("q_heads, kv_heads, head_dim", [(16, 8, 128), (8, 8, 64), (16, 4, 128), (8, 1, 64)])
def test_ragged_prefill_with_prefix_matches_reference(q_heads, kv_heads, head_dim):
    # q_len 2 and 1; chunks over long prefixes; lengths at, one past and one short of a 128-key block
    q_lens = [2, 1, 129, 64, 300, 65]
    kv_lens = [2, 40, 129, 1000, 427, 191]
    args = make_batch(q_heads + head_dim, q_lens, kv_lens, page_size=16, q_heads=q_heads, kv_heads=kv_heads,
                      head_dim=head_dim, dtype=jnp.bfloat16)
    check(args, sm_scale=head_dim**-0.5)


@needs_hopper
@pytest.mark.parametrize("page_size", PAGE_SIZES)
def test_page_sizes(page_size):
    args = make_batch(page_size, [1, 200, 7], [33, 700, 7], page_size=page_size, q_heads=4, kv_heads=2,
                      head_dim=128, dtype=jnp.bfloat16)
    check(args)


@needs_hopper
@pytest.mark.parametrize("q_heads, kv_heads, head_dim, dtype",
                         [(16, 8, 128, jnp.bfloat16), (8, 1, 64, jnp.bfloat16), (8, 2, 128, jnp.float16)])
def test_fp8_pages_match_the_reference_over_them_dequantized(q_heads, kv_heads, head_dim, dtype):
    # the ragged prefix batch above; float16 q converts e4m3 straight to f16
    q_lens = [2, 1, 129, 64, 300, 65]
    kv_lens = [2, 40, 129, 1000, 427, 191]
    args = make_batch(q_heads + head_dim, q_lens, kv_lens, page_size=16, q_heads=q_heads, kv_heads=kv_heads,
                      head_dim=head_dim, dtype=dtype)
    check_fp8(args, sm_scale=head_dim**-0.5)


@needs_hopper
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("page_size", PAGE_SIZES)
def test_fp8_page_sizes(page_size, head_dim):
    args = make_batch(page_size, [1, 200, 7], [33, 700, 7], page_size=page_size, q_heads=4, kv_heads=2,
                      head_dim=head_dim, dtype=jnp.bfloat16)
    check_fp8(args)


@needs_hopper
def test_padding_rows_come_out_zero_and_nan_scratch_stays_out():
    # page 0 and spare pages hold NaN (the tails of last pages must hold finite values: module doc)
    q_lens, kv_lens = [1, 70, 3], [20, 70, 37]
    q, k, v, lens, table, cu = make_batch(4, q_lens, kv_lens, page_size=16, q_heads=4, kv_heads=2, head_dim=64,
                                          dtype=jnp.bfloat16, pad_rows=61, pad_seqs=2)
    live_or_tail = np.zeros(k.shape[1], bool)
    live_or_tail[np.asarray(table)[:3].ravel()] = True
    live_or_tail[0] = False
    nan_pages = jnp.asarray(~live_or_tail)[None, :, None, None]
    poisoned = jnp.where(nan_pages, jnp.nan, k), jnp.where(nan_pages, jnp.nan, v)
    out = check((q, k, v, lens, table, cu), pool=poisoned)
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(out[sum(q_lens):], 0.0)


@needs_hopper
def test_many_short_sequences_and_a_long_one():
    rng = np.random.default_rng(3)
    q_lens = [int(n) for n in rng.integers(2, 40, size=30)] + [1500]
    kv_lens = [n + int(p) for n, p in zip(q_lens, rng.integers(0, 300, size=31))]
    args = make_batch(5, q_lens, kv_lens, page_size=16, q_heads=16, kv_heads=8, head_dim=128, dtype=jnp.bfloat16)
    check(args, sm_scale=128**-0.5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_aligned_block_schedule_owns_every_row_once(seed):
    from minisgl_jax.kernels.paged_blocks import block_schedule

    rng = np.random.default_rng(seed)
    q_lens = [int(n) for n in rng.choice([1, 2, 3, 9, 64, 127, 128, 129, 300], size=12)] + [0, 0]
    num_tokens = sum(q_lens) + int(rng.integers(0, 40))
    cu = jnp.asarray(np.concatenate([[0], np.cumsum(q_lens)]), jnp.int32)
    block_seq, rows, used = block_schedule(cu, num_tokens, 128, align=8)
    block_seq, rows, used = np.asarray(block_seq), np.asarray(rows), int(used)
    owner = np.full(num_tokens, -1)
    for b in range(len(block_seq)):
        tile, first, last = rows[b]
        if b >= used:
            assert first == last  # unused blocks own nothing
            continue
        assert tile % 8 == 0 and tile <= first < last <= tile + 128
        assert (owner[first:last] == -1).all()
        owner[first:last] = block_seq[b]
    cu_np = np.asarray(cu)
    for i, n in enumerate(q_lens):
        rows_i = owner[cu_np[i]:cu_np[i + 1]]
        assert (rows_i == (i if n > 1 else -1)).all()  # q_len 1 rows belong to the decode kernel
    assert (owner[cu_np[-1]:] == -1).all()  # padding rows: owned by padding blocks (seq -1)
    padding_rows = sum(rows[b, 2] - rows[b, 1] for b in range(used) if block_seq[b] < 0)
    assert padding_rows == num_tokens - cu_np[-1]
