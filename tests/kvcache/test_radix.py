"""The radix prefix cache: match, insert, split, lock, evict, flush; checked against a brute-force model."""

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from minisgl_jax.kvcache.allocator import PageAllocator
from minisgl_jax.kvcache.radix import RadixCache


def make(num_pages: int = 64, page_size: int = 2) -> tuple[PageAllocator, RadixCache]:
    allocator = PageAllocator(num_pages)
    return allocator, RadixCache(allocator, page_size)


def test_match_insert_split_and_duplicates():
    allocator, cache = make()
    a = [1, 2, 3, 4, 5, 6]
    pages_a = allocator.allocate(3)
    m = cache.insert(a, pages_a)
    assert m.pages == pages_a and cache.num_cached_pages == 3
    assert cache.match(a + [7]).pages == pages_a
    assert cache.match([1, 2, 3, 9]).pages == pages_a[:1]  # diverges inside the second page
    # A second request computed the same first two pages itself, then diverged.
    b = [1, 2, 3, 4, 8, 8]
    pages_b = allocator.allocate(3)
    free_before = allocator.num_free
    m = cache.insert(b, pages_b)
    assert m.pages == pages_a[:2] + pages_b[2:]
    assert allocator.num_free == free_before + 2  # its duplicates of the shared pages went back
    assert cache.num_cached_pages == 4
    assert cache.match(b).pages == m.pages and cache.match(a).pages == pages_a


def test_partial_last_page_is_not_cached():
    allocator, cache = make(page_size=4)
    pages = allocator.allocate(1)
    cache.insert([1, 2, 3, 4, 5, 6][:4], pages)
    assert cache.match([1, 2, 3]).pages == []
    assert cache.match([1, 2, 3, 4, 5]).pages == pages


def test_locked_paths_survive_eviction_and_lru_order():
    allocator, cache = make(num_pages=9, page_size=1)
    cache.insert([1, 2], allocator.allocate(2))  # least recently used: evicted first
    locked = cache.insert([3, 4], allocator.allocate(2))
    new = cache.insert([5, 6], allocator.allocate(2))
    cache.lock(locked.handle)
    assert cache.num_evictable_pages == 4
    assert cache.evict(2) == 2
    assert cache.match([1, 2]).pages == [] and cache.match([5, 6]).pages == new.pages
    assert cache.flush() == 2
    assert cache.match([3, 4]).pages == locked.pages
    cache.unlock(locked.handle)
    assert cache.flush() == 2 and cache.num_cached_pages == 0
    assert allocator.num_free == allocator.num_usable
    with pytest.raises(RuntimeError, match="not locked"):
        cache.unlock(locked.handle)


class RadixModel(RuleBasedStateMachine):
    """Random requests that match, compute, insert, lock and finish, with random evictions.

    Each page is modelled by the tokens it was written for: whatever the cache returns for a
    prefix must hold exactly that prefix's tokens, and every page is free, cached or held.
    """

    @initialize(page_size=st.sampled_from([1, 2, 4]))
    def setup(self, page_size):
        self.page_size = page_size
        self.allocator = PageAllocator(48)
        self.cache = RadixCache(self.allocator, page_size)
        self.content: dict[int, tuple[int, ...]] = {}  # page -> tokens it holds
        self.requests: list[dict] = []

    @rule(tokens=st.lists(st.integers(0, 2), min_size=1, max_size=12))
    def start(self, tokens):
        m = self.cache.match(tokens)
        ps = self.page_size
        for i, page in enumerate(m.pages):
            assert self.content[page] == tuple(tokens[i * ps : (i + 1) * ps])
        self.cache.lock(m.handle)  # as the scheduler does: lock the match before evicting for the rest
        need = len(tokens) // ps - m.num_pages
        if need > self.allocator.num_free:
            self.cache.evict(need - self.allocator.num_free)
        if need > self.allocator.num_free:
            self.cache.unlock(m.handle)
            return
        own = self.allocator.allocate(need)
        for i, page in enumerate(own):
            j = m.num_pages + i
            self.content[page] = tuple(tokens[j * ps : (j + 1) * ps])
        self.requests.append(dict(tokens=tokens, pages=m.pages + own, cached=m.num_pages, handle=m.handle))

    @precondition(lambda self: self.requests)
    @rule(index=st.integers(0, 100), keep=st.booleans())
    def finish(self, index, keep):
        req = self.requests.pop(index % len(self.requests))
        n = len(req["tokens"]) // self.page_size
        if keep:
            m = self.cache.insert(req["tokens"][: n * self.page_size], req["pages"])
            self.cache.unlock(req["handle"])
            assert len(m.pages) == n
        else:
            self.cache.unlock(req["handle"])
            self.allocator.free(req["pages"][req["cached"] :])

    @rule(count=st.integers(0, 10))
    def evict(self, count):
        evictable = self.cache.num_evictable_pages
        freed = self.cache.evict(count)
        assert freed <= evictable and (freed >= min(count, evictable) or freed == evictable)

    @invariant()
    def pages_accounted(self):
        held = sum(len(r["pages"]) - r["cached"] for r in self.requests)
        assert self.allocator.num_free + self.cache.num_cached_pages + held == self.allocator.num_usable
        assert 0 <= self.cache.num_evictable_pages <= self.cache.num_cached_pages


RadixModel.TestCase.settings = settings(max_examples=200, stateful_step_count=50, deadline=None, derandomize=True)
test_radix_against_model = RadixModel.TestCase


def test_locking_an_evicted_path_is_an_error():
    allocator, cache = make(num_pages=8, page_size=1)
    cache.insert([1, 2], allocator.allocate(2))
    m = cache.match([1, 2])
    cache.evict(2)
    with pytest.raises(RuntimeError, match="evicted"):
        cache.lock(m.handle)
