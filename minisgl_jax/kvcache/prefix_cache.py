"""The interface between the scheduler and a prefix cache, and the `naive` cache that shares nothing.

Page ownership: a page is free (in the allocator), held by the cache (a node of the tree), or held
by exactly one running request that has not yet handed it to the cache. The scheduler hands a
request's whole computed pages to the cache with `insert` and keeps the returned path locked
while the request runs; `unlock` lets the cache evict that path later.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from .allocator import PageAllocator


@dataclass
class PrefixMatch:
    """Whole pages of a cached prefix, in order, and the handle that locks them."""

    pages: list[int]
    handle: Any

    @property
    def num_pages(self) -> int:
        return len(self.pages)


class PrefixCache(ABC):
    shares = True  # whether requests can reuse each other's pages

    def __init__(self, allocator: PageAllocator, page_size: int) -> None:
        self.allocator = allocator
        self.page_size = page_size

    @abstractmethod
    def match(self, token_ids: list[int]) -> PrefixMatch:
        """Longest cached prefix of whole pages of `token_ids`; marks it recently used. Not locked."""

    @abstractmethod
    def insert(self, token_ids: list[int], pages: list[int]) -> PrefixMatch:
        """Offer `pages` (len(token_ids) // page_size of them, in order) as the KV of that prefix.

        Returns the cached path for the prefix, not locked: its pages are the cache's from then on.
        Where the cache already held a different page for a position, the offered page is a
        duplicate and goes back to the allocator; the match lists the cache's page instead. Where
        the offered page is the one the cache holds already, nothing changes. A cache may keep
        fewer pages than offered (`naive` keeps none): the offered pages past `match.num_pages`
        stay the caller's to free.
        """

    @abstractmethod
    def lock(self, handle: Any) -> None:
        """Protect the path of `handle` from eviction (reference counted)."""

    @abstractmethod
    def unlock(self, handle: Any) -> None:
        """Undo one `lock`; an unlocked path may be evicted."""

    @abstractmethod
    def evict(self, num_pages: int) -> int:
        """Free up to `num_pages` pages of unlocked, least recently used entries; returns how many."""

    @abstractmethod
    def flush(self) -> int:
        """Drop every unlocked entry; returns the pages freed."""

    @property
    @abstractmethod
    def num_cached_pages(self) -> int:
        """Pages the cache holds, locked or not."""

    @property
    @abstractmethod
    def num_evictable_pages(self) -> int:
        """Pages `evict` could free now."""


class NaiveCache(PrefixCache):
    """`--cache naive`: nothing is shared; every request keeps and frees its own pages."""

    shares = False

    def match(self, token_ids: list[int]) -> PrefixMatch:
        return PrefixMatch(pages=[], handle=None)

    def insert(self, token_ids: list[int], pages: list[int]) -> PrefixMatch:
        return PrefixMatch(pages=[], handle=None)

    def lock(self, handle: Any) -> None:
        pass

    def unlock(self, handle: Any) -> None:
        pass

    def evict(self, num_pages: int) -> int:
        return 0

    def flush(self) -> int:
        return 0

    @property
    def num_cached_pages(self) -> int:
        return 0

    @property
    def num_evictable_pages(self) -> int:
        return 0
