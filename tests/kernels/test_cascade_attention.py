"""Cascade decode attention (shared prefix read once per group) agrees with the reference."""

import jax.numpy as jnp
import numpy as np
import pytest
from paged_inputs import make_batch, poison_unused_slots, rel_err

from minisgl_jax.kernels import cascade_decode_attention, ragged_paged_attention_reference

F32_TOL = 1e-5
BF16_TOL = 2e-2


def make_cascade_batch(seed, groups, lone_lens, *, page_size, max_groups=4, pad_seqs=1, **kw):
    """Decode rows where each group's rows share their first prefix_pages pages.

    groups: [(prefix_pages, [total kv_len of each row])]; rows of a group are contiguous, then the
    lone rows, then pad_seqs padding sequences. Returns (args, prefix_lens, groups array); the
    pools' slots that hold no live key (among them the pages the groups' later rows no longer use)
    are NaN in args[1:3], clean in args[6:8] for the reference.
    """
    kv_lens = [n for _, lens in groups for n in lens] + list(lone_lens)
    args = make_batch(seed, [1] * len(kv_lens), kv_lens, page_size=page_size, pad_seqs=pad_seqs, pad_rows=pad_seqs, **kw)
    q, k_pages, v_pages, lens, table, cu = args
    table = np.asarray(table).copy()
    prefix_lens = np.zeros(len(kv_lens) + pad_seqs, np.int32)
    rows = np.zeros((max_groups, 3), np.int32)
    first = 0
    for g, (prefix_pages, group_lens) in enumerate(groups):
        end = first + len(group_lens)
        assert all(n >= prefix_pages * page_size for n in group_lens)
        table[first:end, :prefix_pages] = table[first, :prefix_pages]
        prefix_lens[first:end] = prefix_pages * page_size
        rows[g] = (first, end, prefix_pages * page_size)
        first = end
    table = jnp.asarray(table)
    poisoned_k = poison_unused_slots(k_pages, lens, table)
    poisoned_v = poison_unused_slots(v_pages, lens, table)
    args = (q, poisoned_k, poisoned_v, lens, table, cu, k_pages, v_pages)
    return args, jnp.asarray(prefix_lens), jnp.asarray(rows)


def check(args, prefix_lens, groups, tol, **kwargs):
    q, k_poisoned, v_poisoned, lens, table, cu, k_pages, v_pages = args
    out = cascade_decode_attention(
        q, k_poisoned, v_poisoned, lens, table, cu, prefix_lens, groups, sm_scale=0.25, interpret=True, **kwargs
    )
    ref = ragged_paged_attention_reference(q, k_pages, v_pages, lens, table, cu, sm_scale=0.25)
    real = int(args[5][-1])
    assert out.dtype == args[0].dtype
    assert rel_err(out[:real], ref[:real]) < tol
    np.testing.assert_array_equal(np.asarray(out[real:], np.float32), 0.0)


@pytest.mark.parametrize("prefix_splits", [1, 3])
def test_groups_lone_rows_and_padding_match_reference(prefix_splits):
    # a group with rows one past, exactly at and far past the prefix; a row whose keys are all
    # prefix (empty suffix); a second group; rows in no group
    groups = [(2, [33, 32, 80, 47]), (1, [16, 20])]
    args, prefix_lens, rows = make_cascade_batch(1, groups, [50, 1], page_size=16)
    check(args, prefix_lens, rows, F32_TOL, prefix_splits=prefix_splits)


@pytest.mark.parametrize("page_size, q_heads, kv_heads", [(1, 2, 2), (16, 8, 1), (64, 4, 1)])
def test_page_sizes_and_gqa_ratios(page_size, q_heads, kv_heads):
    prefix_pages = max(1, 40 // page_size)
    shared = prefix_pages * page_size
    groups = [(prefix_pages, [shared + 1, shared + 9, shared + page_size + 3])]
    args, prefix_lens, rows = make_cascade_batch(
        page_size + q_heads, groups, [7], page_size=page_size, q_heads=q_heads, kv_heads=kv_heads
    )
    check(args, prefix_lens, rows, F32_TOL)


def test_group_larger_than_a_row_block_bf16():
    # block_m 16 rows over a group of 2 q heads per kv head: 8 rows per block, so 11 rows span two
    groups = [(3, [48 + i * 5 for i in range(11)])]
    args, prefix_lens, rows = make_cascade_batch(
        4, groups, [], page_size=16, q_heads=4, kv_heads=2, head_dim=128, dtype=jnp.bfloat16
    )
    check(args, prefix_lens, rows, BF16_TOL, block_m=16, block_k=16)


def test_no_groups_is_plain_decode():
    args, prefix_lens, rows = make_cascade_batch(5, [], [3, 40, 17], page_size=16)
    check(args, prefix_lens, rows, F32_TOL)


def test_bad_group_arrays_name_the_argument():
    args, prefix_lens, rows = make_cascade_batch(6, [(1, [20, 30])], [], page_size=16)
    with pytest.raises(ValueError, match="groups"):
        cascade_decode_attention(*args[:6], prefix_lens, rows[:, :2], sm_scale=0.25, interpret=True)
    with pytest.raises(ValueError, match="prefix_lens"):
        cascade_decode_attention(*args[:6], prefix_lens[:1], rows, sm_scale=0.25, interpret=True)
