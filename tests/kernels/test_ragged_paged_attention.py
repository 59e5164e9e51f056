"""The Pallas paged-attention kernels (interpret mode on CPU) agree with the pure-jnp reference."""

import importlib

import jax.numpy as jnp
import numpy as np
import pytest
from paged_inputs import make_batch, poison_unused_slots, rel_err

from minisgl_jax.kernels import paged_decode_attention, ragged_paged_attention, ragged_paged_attention_reference
from minisgl_jax.kernels.paged_decode_attention import default_block_k, default_num_splits

# The module itself: the package exports its function under the same name.
paged_decode_attention_module = importlib.import_module("minisgl_jax.kernels.paged_decode_attention")

F32_TOL = 1e-5
BF16_TOL = 2e-2


def run_both(args, sm_scale: float = 0.3, **kwargs):
    out = ragged_paged_attention(*args, sm_scale=sm_scale, interpret=True, **kwargs)
    ref = ragged_paged_attention_reference(*args, sm_scale=sm_scale)
    return out, ref


@pytest.mark.parametrize(
    "page_size, q_heads, kv_heads, head_dim",
    [(1, 2, 2, 64), (16, 4, 2, 128), (16, 8, 1, 64), (64, 4, 1, 64)],
)
def test_decode_bucket_matches_reference(page_size, q_heads, kv_heads, head_dim):
    lens = [1, page_size, page_size + 1, 3 * page_size - 1, 70]
    args = make_batch(page_size + q_heads, [1] * 5, lens, page_size=page_size, q_heads=q_heads,
                      kv_heads=kv_heads, head_dim=head_dim, pad_rows=2, pad_seqs=2)
    out, ref = run_both(args, max_q_len=1)
    assert rel_err(out[:5], ref[:5]) < F32_TOL
    np.testing.assert_array_equal(np.asarray(out[5:]), 0.0)


@pytest.mark.parametrize("num_splits", [2, 5])
def test_decode_split_k_matches_reference(num_splits):
    args = make_batch(3, [1] * 4, [1, 17, 40, 129], page_size=16, q_heads=4, kv_heads=1, pad_rows=1, pad_seqs=1)
    out = paged_decode_attention(*args, sm_scale=0.2, num_splits=num_splits, block_k=16, interpret=True)
    ref = ragged_paged_attention_reference(*args, sm_scale=0.2)
    assert rel_err(out[:4], ref[:4]) < F32_TOL
    np.testing.assert_array_equal(np.asarray(out[4:]), 0.0)


def test_decode_32_token_blocks_match_reference():
    # the tiling the default picks for many programs: blocks of 32 keys over pages of 16, ragged lengths
    args = make_batch(4, [1] * 4, [1, 31, 33, 100], page_size=16, q_heads=8, kv_heads=2, pad_rows=1, pad_seqs=1)
    out = paged_decode_attention(*args, sm_scale=0.2, num_splits=1, block_k=32, interpret=True)
    ref = ragged_paged_attention_reference(*args, sm_scale=0.2)
    assert rel_err(out[:4], ref[:4]) < F32_TOL


def test_default_tiling_follows_the_program_count(monkeypatch):
    # seqs x kv heads: few programs split the keys, many take smaller blocks (H200 measurements, 132 SMs)
    monkeypatch.setattr(paged_decode_attention_module, "multiprocessor_count", lambda: 132)
    assert default_num_splits(8, 8, 2048, 64) == 4
    assert default_num_splits(32, 4, 2048, 64) == 2
    assert default_num_splits(32, 8, 2048, 64) == 1
    assert default_num_splits(8, 8, 512, 64) == 1  # a table of 512 keys is too short to split
    assert default_block_k(32, 8) == 64
    assert default_block_k(128, 4) == 32
    monkeypatch.setattr(paged_decode_attention_module, "multiprocessor_count", lambda: 66)
    assert default_num_splits(8, 8, 2048, 64) == 2  # half the multiprocessors, half the splits


@pytest.mark.parametrize("q_heads, kv_heads", [(2, 2), (4, 2), (8, 2), (8, 1)])
def test_prefill_with_cached_prefix_matches_reference(q_heads, kv_heads):
    # ragged q_len incl. 1 and 2; prefixes >> q_len; a chunk ending one past a page boundary
    q_lens = [7, 1, 2, 40]
    kv_lens = [7, 33, 100, 65]
    args = make_batch(q_heads * 10 + kv_heads, q_lens, kv_lens, page_size=16, q_heads=q_heads, kv_heads=kv_heads)
    out, ref = run_both(args)
    assert rel_err(out, ref) < F32_TOL


def test_mixed_decode_and_prefill_bf16():
    q_lens = [1, 30, 1, 1, 9]
    kv_lens = [50, 30, 16, 1, 200]
    args = make_batch(5, q_lens, kv_lens, page_size=16, q_heads=8, kv_heads=2, head_dim=128, dtype=jnp.bfloat16)
    out, ref = run_both(args, sm_scale=128**-0.5)
    assert out.dtype == jnp.bfloat16
    assert rel_err(out, ref) < BF16_TOL


@pytest.mark.parametrize("page_size", [1, 64])
def test_page_sizes_small_and_larger_than_a_key_block(page_size):
    # page 64 > block_k 32: a key block is part of one page; page 1: every key its own page
    args = make_batch(6, [1, 20, 3], [9, 75, 64], page_size=page_size, q_heads=4, kv_heads=2)
    out, ref = run_both(args, block_m=32, block_k=32)
    assert rel_err(out, ref) < F32_TOL


def test_padding_rows_and_sequences_leave_real_rows_unchanged():
    q_lens, kv_lens = [1, 12, 5], [20, 12, 37]
    bare = make_batch(7, q_lens, kv_lens, page_size=16)
    q, k, v, lens, table, cu = bare
    junk = jnp.full((6, *q.shape[1:]), 1e4, q.dtype)  # padding rows' q is garbage, not NaN
    padded = (
        jnp.concatenate([q, junk]),
        k,
        v,
        jnp.concatenate([lens, jnp.zeros(3, jnp.int32)]),
        jnp.concatenate([table, jnp.zeros((3, table.shape[1]), jnp.int32)]),
        jnp.concatenate([cu, jnp.full(3, cu[-1], jnp.int32)]),
    )
    out_bare = ragged_paged_attention(*bare, sm_scale=0.3, interpret=True)
    out_padded = ragged_paged_attention(*padded, sm_scale=0.3, interpret=True)
    np.testing.assert_allclose(np.asarray(out_padded[:18]), np.asarray(out_bare), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(out_padded[18:]), 0.0)


def test_nan_in_unused_slots_never_reaches_real_rows():
    # page 0 (scratch), spare pages and the tails of last pages hold NaN; table rows end in 0s
    q_lens, kv_lens = [1, 6, 1], [18, 6, 33]
    q, k, v, lens, table, cu = make_batch(8, q_lens, kv_lens, page_size=16, pad_rows=2, pad_seqs=1)
    ref = ragged_paged_attention_reference(q, k, v, lens, table, cu, sm_scale=0.3)
    k_bad, v_bad = poison_unused_slots(k, lens, table), poison_unused_slots(v, lens, table)
    out = ragged_paged_attention(q, k_bad, v_bad, lens, table, cu, sm_scale=0.3, interpret=True)
    assert np.isfinite(np.asarray(out)).all()
    assert rel_err(out[:8], ref[:8]) < F32_TOL
    # the same two decodes as a padded decode bucket: rows 0 and 7 above, one padding row
    pick = jnp.array([0, 2, 3])
    bucket = (q[jnp.array([0, 7, 8])], k_bad, v_bad, lens[pick], table[pick], jnp.array([0, 1, 2, 2], jnp.int32))
    out = ragged_paged_attention(*bucket, sm_scale=0.3, max_q_len=1, interpret=True)
    assert np.isfinite(np.asarray(out)).all()
    assert rel_err(out[:2], ref[jnp.array([0, 7])]) < F32_TOL


def test_bad_inputs_name_the_argument():
    q, k, v, lens, table, cu = make_batch(9, [2], [5], page_size=16)
    with pytest.raises(ValueError, match="kv_heads"):
        ragged_paged_attention(q[:, :3], k, v, lens, table, cu, sm_scale=1.0, interpret=True)
    with pytest.raises(ValueError, match="cu_q_lens"):
        ragged_paged_attention(q, k, v, lens, table, cu[:1], sm_scale=1.0, interpret=True)
    with pytest.raises(ValueError, match="page_table must be int32"):
        ragged_paged_attention(q, k, v, lens, table.astype(jnp.int16), cu, sm_scale=1.0, interpret=True)
    with pytest.raises(ValueError, match="head_dim must be a power of two"):
        ragged_paged_attention(q[..., :48], k[..., :48], v[..., :48], lens, table, cu, sm_scale=1.0, interpret=True)
    with pytest.raises(ValueError, match="rows_are_seqs"):
        ragged_paged_attention(q, k, v, lens, table, cu, sm_scale=1.0, max_q_len=1, interpret=True)
