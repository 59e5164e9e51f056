"""Which decode rows share a cached prefix: the groups of cascade attention (kernels/src/cascade_attention.py).

Pages are shared only through the radix cache, and a shared page is full and never written
again, so two rows whose page tables begin with the same page ids hold the same keys there. The
engine groups a decode batch's rows by their first page, takes each group's longest common run of
page ids, and reorders the rows so that each group is one contiguous range.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from minisgl_jax.engine.batch import ScheduledRow
from minisgl_jax.kvcache.allocator import pages_for

MAX_GROUPS = 8  # groups per step: a static shape of the compiled step
MIN_SHARED_TOKENS = 256  # below this, reading the prefix once per row costs less than the extra pass
MIN_GROUP_ROWS = 2


@dataclass
class CascadePlan:
    """rows: the batch's rows reordered, each group contiguous, groups first.

    prefix_lens [len(rows)]: keys each row shares with its group (0: none); groups [MAX_GROUPS, 3]:
    (first row, one past the last row, shared keys) per group, unused entries all zero.
    """

    rows: list[ScheduledRow]
    prefix_lens: np.ndarray
    groups: np.ndarray


def _common_pages(page_lists: list[list[int]]) -> int:
    """Length of the longest run of page ids at the start of every list."""
    first = page_lists[0]
    n = min(len(pages) for pages in page_lists)
    for pages in page_lists[1:]:
        if pages[:n] != first[:n]:
            n = next(i for i in range(n) if pages[i] != first[i])
    return n


def plan_cascade(rows: list[ScheduledRow], page_size: int) -> CascadePlan | None:
    """The groups of one decode batch, or None when no group is worth a prefix pass."""
    by_first_page: dict[int, list[ScheduledRow]] = {}
    min_pages = pages_for(MIN_SHARED_TOKENS, page_size)
    for row in rows:
        pages = row.req.pages
        if len(pages) > min_pages:
            by_first_page.setdefault(pages[0], []).append(row)
    groups: list[tuple[int, list[ScheduledRow]]] = []
    for members in by_first_page.values():
        if len(members) < MIN_GROUP_ROWS:
            continue
        # A row's page holding its newest token is its own; only pages wholly before it are shared.
        shared = min(_common_pages([r.req.pages for r in members]), min((r.start // page_size) for r in members))
        if shared >= min_pages:
            groups.append((shared * page_size, members))
    if not groups:
        return None
    groups.sort(key=lambda g: g[0] * len(g[1]), reverse=True)
    groups = groups[:MAX_GROUPS]

    ordered: list[ScheduledRow] = []
    prefix_lens = np.zeros(len(rows), np.int32)
    table = np.zeros((MAX_GROUPS, 3), np.int32)
    for g, (shared, members) in enumerate(groups):
        table[g] = (len(ordered), len(ordered) + len(members), shared)
        prefix_lens[len(ordered):len(ordered) + len(members)] = shared
        ordered += members
    grouped = {id(r) for r in ordered}
    ordered += [r for r in rows if id(r) not in grouped]
    return CascadePlan(ordered, prefix_lens, table)
