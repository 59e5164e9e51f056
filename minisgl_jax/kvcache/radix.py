"""Radix tree over token ids at page granularity: shared prefixes, reference counts, LRU eviction.

A node's key is a run of whole pages' tokens and its value their page ids; children are keyed by
the tokens of their first page. A path is locked while requests use it (lock counts on every node
from the root), and only unlocked leaves are evicted, least recently used first.
"""

from __future__ import annotations

import heapq
import itertools
from typing import Any

from .allocator import PageAllocator
from .prefix_cache import PrefixCache, PrefixMatch


class Node:
    __slots__ = ("key", "pages", "children", "parent", "lock_count", "last_access")

    def __init__(self, key: tuple[int, ...], pages: list[int], parent: "Node | None") -> None:
        self.key = key
        self.pages = pages
        self.children: dict[tuple[int, ...], Node] = {}
        self.parent = parent
        self.lock_count = 0
        self.last_access = 0


class RadixCache(PrefixCache):
    def __init__(self, allocator: PageAllocator, page_size: int) -> None:
        super().__init__(allocator, page_size)
        self.root = Node((), [], None)
        self.root.lock_count = 1  # never evicted
        self._clock = itertools.count(1)
        self._num_pages = 0
        self._num_evictable = 0
        self.num_evicted_pages = 0

    # ---- walking ----------------------------------------------------------------------------

    def _page_key(self, tokens: list[int] | tuple[int, ...], page: int) -> tuple[int, ...]:
        return tuple(tokens[page * self.page_size : (page + 1) * self.page_size])

    def _walk(self, tokens: list[int], num_pages: int) -> tuple[Node, list[int]]:
        """Deepest node matching whole pages of tokens (splitting a node matched part-way), and its path's pages."""
        node, pages, page, now = self.root, [], 0, next(self._clock)
        node.last_access = now
        while page < num_pages:
            child = node.children.get(self._page_key(tokens, page))
            if child is None:
                break
            child_pages = len(child.pages)
            # One comparison of the whole key first: page by page is slow in Python, and the
            # scheduler matches every waiting request on every admission.
            whole = page + child_pages <= num_pages and child.key == tuple(
                tokens[page * self.page_size : (page + child_pages) * self.page_size]
            )
            matched = child_pages if whole else 1
            while matched < child_pages and page + matched < num_pages and self._page_key(
                child.key, matched
            ) == self._page_key(tokens, page + matched):
                matched += 1
            if matched < child_pages:
                child = self._split(child, matched)
            child.last_access = now
            pages += child.pages
            page += matched
            node = child
        return node, pages

    def _split(self, node: Node, num_pages: int) -> Node:
        """Cut `node` after `num_pages` pages; returns the new upper part."""
        cut = num_pages * self.page_size
        upper = Node(node.key[:cut], node.pages[:num_pages], node.parent)
        upper.lock_count, upper.last_access = node.lock_count, node.last_access
        node.parent.children[self._page_key(upper.key, 0)] = upper
        node.key, node.pages, node.parent = node.key[cut:], node.pages[num_pages:], upper
        upper.children[self._page_key(node.key, 0)] = node
        return upper

    # ---- the PrefixCache interface ----------------------------------------------------------

    def match(self, token_ids: list[int]) -> PrefixMatch:
        node, pages = self._walk(token_ids, len(token_ids) // self.page_size)
        return PrefixMatch(pages=pages, handle=None if node is self.root else node)

    def insert(self, token_ids: list[int], pages: list[int]) -> PrefixMatch:
        num_pages = len(token_ids) // self.page_size
        if len(pages) != num_pages:
            raise ValueError(f"insert needs {num_pages} pages for {len(token_ids)} tokens, got {len(pages)}")
        node, cached = self._walk(token_ids, num_pages)
        duplicates = [mine for mine, theirs in zip(pages, cached) if mine != theirs]
        if duplicates:
            self.allocator.free(duplicates)
        if len(cached) < num_pages:
            rest = pages[len(cached) :]
            leaf = Node(tuple(token_ids[len(cached) * self.page_size : num_pages * self.page_size]), list(rest), node)
            leaf.last_access = node.last_access
            node.children[self._page_key(leaf.key, 0)] = leaf
            self._num_pages += len(rest)
            self._num_evictable += len(rest)
            node, cached = leaf, cached + rest
        return PrefixMatch(pages=cached, handle=None if node is self.root else node)

    def lock(self, handle: Any) -> None:
        if handle is not None and not self._attached(handle):
            raise RuntimeError("radix cache: lock of a path that was evicted; lock a match before evicting")
        node = handle
        while node is not None and node is not self.root:
            if node.lock_count == 0:
                self._num_evictable -= len(node.pages)
            node.lock_count += 1
            node = node.parent

    def unlock(self, handle: Any) -> None:
        node = handle
        while node is not None and node is not self.root:
            if node.lock_count <= 0:
                raise RuntimeError("radix cache: unlock of a path that is not locked")
            node.lock_count -= 1
            if node.lock_count == 0:
                self._num_evictable += len(node.pages)
            node = node.parent

    def evict(self, num_pages: int) -> int:
        leaves = [(n.last_access, id(n), n) for n in self._nodes() if not n.children and n.lock_count == 0]
        heapq.heapify(leaves)
        freed = 0
        while leaves and freed < num_pages:
            _, _, node = heapq.heappop(leaves)
            parent = node.parent
            del parent.children[self._page_key(node.key, 0)]
            node.parent = None
            self.allocator.free(node.pages)
            freed += len(node.pages)
            if parent is not self.root and not parent.children and parent.lock_count == 0:
                heapq.heappush(leaves, (parent.last_access, id(parent), parent))
        self._num_pages -= freed
        self._num_evictable -= freed
        self.num_evicted_pages += freed
        return freed

    def flush(self) -> int:
        return self.evict(self._num_evictable)

    @property
    def num_cached_pages(self) -> int:
        return self._num_pages

    @property
    def num_evictable_pages(self) -> int:
        return self._num_evictable

    def _attached(self, node: Node) -> bool:
        while node.parent is not None:
            node = node.parent
        return node is self.root

    def _nodes(self):
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            stack.extend(node.children.values())
            yield node
