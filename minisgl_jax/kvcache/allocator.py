"""Host-side page allocator: a free list of page ids over the device KV pool."""

from __future__ import annotations

from collections import deque

from minisgl_jax.utils import cdiv


def pages_for(num_tokens: int, page_size: int) -> int:
    """Pages that hold num_tokens tokens."""
    return cdiv(num_tokens, page_size)


class OutOfPagesError(RuntimeError):
    """Raised when more pages are asked for than are free."""


class PageAllocator:
    """Hands out page ids 1..num_pages-1; page 0 is the scratch page padding rows write into."""

    SCRATCH_PAGE = 0

    def __init__(self, num_pages: int) -> None:
        if num_pages < 2:
            raise ValueError(f"the KV pool needs at least 2 pages (one is scratch), got {num_pages}")
        self.num_pages = num_pages
        self._free: deque[int] = deque(range(1, num_pages))
        self._is_free = [False] + [True] * (num_pages - 1)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_usable(self) -> int:
        """Pages that requests can ever hold (all but the scratch page)."""
        return self.num_pages - 1

    def allocate(self, count: int) -> list[int]:
        if count > len(self._free):
            raise OutOfPagesError(f"asked for {count} KV pages, only {len(self._free)} free")
        pages = [self._free.popleft() for _ in range(count)]
        for page in pages:
            self._is_free[page] = False
        return pages

    def free(self, pages: list[int]) -> None:
        for page in pages:
            if page == self.SCRATCH_PAGE or not 0 < page < self.num_pages:
                raise ValueError(f"page id {page} is not an allocatable page")
            if self._is_free[page]:
                raise ValueError(f"page {page} freed twice")
            self._is_free[page] = True
            self._free.append(page)
