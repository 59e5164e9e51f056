"""Continuous batching: admission by free pages, chunked prefill before decode, retraction, abort.

The scheduler decides each step's rows on the host and keeps every page accounted for:
free (allocator) + held by the prefix cache + held by running requests = all usable pages.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass

from minisgl_jax.core import FinishReason
from minisgl_jax.engine.batch import ScheduledBatch, ScheduledRow
from minisgl_jax.engine.buckets import Buckets
from minisgl_jax.engine.request import Phase, Req
from minisgl_jax.kvcache.allocator import PageAllocator, pages_for
from minisgl_jax.kvcache.prefix_cache import PrefixCache, PrefixMatch

logger = logging.getLogger(__name__)

# Prefix ordering matches each waiting request against the tree, so it orders only the first
# LPM_WINDOW of the queue: a step's cost stays bounded however long the queue grows.
LPM_WINDOW = 128


@dataclass(frozen=True)
class SchedulerConfig:
    page_size: int
    max_prefill_tokens: int  # tokens per prefill step; longer prompts are chunked
    lpm_min_queue: int  # queue length from which the longest cached prefix goes first
    buckets: Buckets  # the running-request limit, and which decode batches may burst


class Scheduler:
    def __init__(self, allocator: PageAllocator, cache: PrefixCache, config: SchedulerConfig) -> None:
        self.allocator = allocator
        self.cache = cache
        self.config = config
        self.page_size = config.page_size
        self.max_running = config.buckets.max_running
        self.max_prefill_tokens = config.max_prefill_tokens
        self.lpm_min_queue = config.lpm_min_queue
        self.waiting: deque[Req] = deque()
        self.running: list[Req] = []  # admitted, in admission order (newest last)
        self.free_slots: list[int] = list(range(self.max_running - 1, -1, -1))
        self.num_retractions = 0
        self.cache_hit_tokens = 0
        self.prefill_tokens = 0

    # ---- queue ----------------------------------------------------------------------------

    def add(self, req: Req) -> None:
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- page bookkeeping -------------------------------------------------------------------

    def _obtain_pages(self, count: int) -> list[int] | None:
        """`count` free pages, evicting from the prefix cache if needed; None if impossible."""
        short = count - self.allocator.num_free
        if short > 0:
            self.cache.evict(short)
        if self.allocator.num_free < count:
            return None
        return self.allocator.allocate(count)

    def _pages_needed(self, req: Req, new_len: int) -> int:
        return max(0, pages_for(new_len, self.page_size) - len(req.pages))

    def _cache_computed(self, req: Req) -> None:
        """Hand the request's whole computed pages to the prefix cache and lock that path."""
        known = min(req.kv_len, len(req.all_ids))
        num_pages = known // self.page_size
        if num_pages == 0:
            return
        match = self.cache.insert(req.all_ids[: num_pages * self.page_size], req.pages[:num_pages])
        self.cache.lock(match.handle)
        self.cache.unlock(req.cache_handle)
        req.cache_handle = match.handle
        req.pages[: match.num_pages] = match.pages
        req.num_cache_pages = match.num_pages

    def release(self, req: Req) -> None:
        """Give back a request's pages (whole computed ones to the cache) and its slot."""
        self._cache_computed(req)
        self.cache.unlock(req.cache_handle)
        self.allocator.free(req.pages[req.num_cache_pages :])
        req.pages, req.num_cache_pages, req.cache_handle = [], 0, None
        if req.slot is not None:
            self.free_slots.append(req.slot)
            req.slot = None
            req.processing_seeded = False
        if req in self.running:
            self.running.remove(req)

    def pages_held_by_requests(self) -> int:
        return sum(len(r.pages) - r.num_cache_pages for r in self.running)

    def check_kv_invariant(self) -> None:
        """free + cached + held by requests == all usable pages, or a RuntimeError naming the numbers."""
        free, cached, held = self.allocator.num_free, self.cache.num_cached_pages, self.pages_held_by_requests()
        if free + cached + held != self.allocator.num_usable:
            raise RuntimeError(
                f"KV page leak: free {free} + cached {cached} + held {held} != {self.allocator.num_usable}"
            )

    def stats(self) -> dict[str, int]:
        """The queue, the KV pages and the prefix cache's work, for the engine's stats."""
        return dict(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            kv_pages_total=self.allocator.num_usable,
            kv_pages_free=self.allocator.num_free,
            kv_pages_cached=self.cache.num_cached_pages,
            cache_hit_tokens=self.cache_hit_tokens,
            prefill_tokens=self.prefill_tokens,
            num_retractions=self.num_retractions,
            num_evicted_pages=getattr(self.cache, "num_evicted_pages", 0),
        )

    # ---- finishing ---------------------------------------------------------------------------

    def finish(self, req: Req, reason: FinishReason) -> None:
        if req.finished:
            return
        if req.phase is Phase.WAITING:
            self.waiting.remove(req)
        else:
            self.release(req)
        req.phase, req.finish_reason = Phase.FINISHED, reason

    def retract(self, req: Req) -> None:
        """Free a running request's pages and requeue it at the front, to recompute later."""
        self.release(req)
        req.phase, req.kv_len, req.prompt_cached = Phase.WAITING, 0, False
        self.waiting.appendleft(req)
        self.num_retractions += 1
        logger.info("retracted request %s (KV pool full); it will be recomputed", req.request_id)

    # ---- scheduling --------------------------------------------------------------------------

    def schedule(self) -> ScheduledBatch | None:
        """Prefill if any request needs it and fits, else decode every running request."""
        for req in self.running:
            if req.phase is Phase.DECODE and not req.prompt_cached:
                self._cache_computed(req)  # its whole prompt is written: others may reuse it now
                req.prompt_cached = True
        return self._schedule_prefill() or self._schedule_decode()

    def _order_waiting(self) -> None:
        """Longest cached prefix first (SGLang's LPM), within the queue's first LPM_WINDOW requests."""
        if len(self.waiting) < self.lpm_min_queue:
            return
        head = [self.waiting.popleft() for _ in range(min(LPM_WINDOW, len(self.waiting)))]
        hits = {id(r): self.cache.match(r.all_ids[:-1]).num_pages for r in head}
        head.sort(key=lambda r: (-hits[id(r)], r.arrival))
        self.waiting.extendleft(reversed(head))

    def _page_key(self, req: Req, start: int) -> tuple[int, ...]:
        return tuple(req.all_ids[start : start + self.page_size])

    def _schedule_prefill(self) -> ScheduledBatch | None:
        """The next chunks of the prompts under way, then new requests, while the token budget, the
        request slots and the pages last."""
        computing: set[tuple[int, ...]] = set()  # first page each prefill of this step computes
        rows = self._continue_prefills(computing)
        budget = self.max_prefill_tokens - sum(r.num_tokens for r in rows)
        if budget > 0 and self.free_slots:
            self._order_waiting()  # it matches the queue's head against the tree: only when one can be admitted
        reserve = len(self.running)  # keep a page per running request for its next decode token
        for req in list(self.waiting):
            if budget <= 0 or not self.free_slots:
                break
            if req.in_flight:
                continue  # its last tokens are still on the device; admit it once they are read
            # Prompt logprobs come from the prefill's logits: such a request computes its whole prompt.
            match = self.cache.match(req.all_ids[:-1] if req.params.prompt_logprobs is None else [])
            start = match.num_pages * self.page_size
            key = self._page_key(req, start)
            if self.cache.shares and len(key) == self.page_size and key in computing:
                continue  # another request computes this prefix now: wait, then reuse its pages
            first_chunk = min(req.target_len - start, budget)
            need = pages_for(start + first_chunk, self.page_size) - match.num_pages
            if self.allocator.num_free + self.cache.num_evictable_pages < need + reserve:
                break
            row = self._admit(req, match, budget)
            if row is None:
                break
            computing.add(key)
            rows.append(row)
            budget -= row.num_tokens
            reserve += 1
        if not rows:
            return None
        self.prefill_tokens += sum(r.num_tokens for r in rows)
        return ScheduledBatch(rows=rows, is_decode=False)

    def _continue_prefills(self, computing: set[tuple[int, ...]]) -> list[ScheduledRow]:
        """The next chunk of each admitted prompt, within the token budget."""
        rows: list[ScheduledRow] = []
        budget = self.max_prefill_tokens
        for req in self.running:
            if req.phase is Phase.PREFILL and budget > 0:
                # Share the chunks computed so far; the chunk about to run stays private until
                # it is written, so no step writes into a page another request may read.
                self._cache_computed(req)
                computing.add(self._page_key(req, req.kv_len))
                row = self._prefill_row(req, budget)
                if row is None:
                    break
                rows.append(row)
                budget -= row.num_tokens
        return rows

    def _admit(self, req: Req, match: PrefixMatch, budget: int) -> ScheduledRow | None:
        """Move a waiting request to the running set on its cached prefix and schedule its first chunk.
        When eviction cannot deliver the pages after all, undo: it goes back to the queue's head."""
        self.waiting.remove(req)
        self.cache.lock(match.handle)
        req.cache_handle, req.pages = match.handle, list(match.pages)
        req.num_cache_pages = match.num_pages
        req.kv_len = req.cached_tokens = match.num_pages * self.page_size
        req.slot = self.free_slots.pop()
        req.phase = Phase.PREFILL
        self.running.append(req)
        row = self._prefill_row(req, budget)
        if row is None:
            self.release(req)
            req.phase, req.kv_len = Phase.WAITING, 0
            self.waiting.appendleft(req)
            return None
        self.cache_hit_tokens += req.cached_tokens
        return row

    def _prefill_row(self, req: Req, budget: int) -> ScheduledRow | None:
        num_tokens = min(req.target_len - req.kv_len, budget)
        pages = self._obtain_pages(self._pages_needed(req, req.kv_len + num_tokens))
        if pages is None:
            return None
        req.pages += pages
        start = req.kv_len
        req.kv_len += num_tokens
        samples = req.kv_len == req.target_len
        row = ScheduledRow(req, start, num_tokens, samples=samples, token_index=req.num_sampled)
        if samples:
            req.num_sampled += 1
            req.phase = Phase.DECODE
        req.in_flight += 1
        return row

    def _burst_steps(self, candidates: list[Req]) -> int:
        """Decode steps of this batch: the buckets' decode_steps when they let a batch of this size
        burst, nobody waits to be admitted (a burst would delay them), some row has more than one
        token left, and the free pages cover the burst (no eviction or retraction inside one); else 1."""
        steps = self.config.buckets.decode_steps
        if self.waiting or not self.config.buckets.may_burst(len(candidates)):
            return 1
        if any(r.grammar is not None for r in candidates):
            return 1  # a grammar's next mask needs the host to see each token
        if all(self._row_steps(r, steps) == 1 for r in candidates):
            return 1
        need = sum(self._pages_needed(r, r.kv_len + self._row_steps(r, steps)) for r in candidates)
        return steps if need <= self.allocator.num_free else 1

    @staticmethod
    def _row_steps(req: Req, burst: int) -> int:
        """Tokens a row samples in a burst: the burst, or fewer when max_tokens comes first."""
        return min(burst, req.max_new_tokens - req.num_sampled)

    def _schedule_decode(self) -> ScheduledBatch | None:
        rows: list[ScheduledRow] = []
        candidates = [r for r in self.running if r.phase is Phase.DECODE and r.num_sampled < r.max_new_tokens]
        steps = self._burst_steps(candidates)
        for req in candidates:
            if req.phase is not Phase.DECODE:
                continue  # retracted while making room for an earlier row
            row_steps = self._row_steps(req, steps)
            need = self._pages_needed(req, req.kv_len + row_steps)
            if need:  # these tokens open new pages
                pages = self._obtain_pages(need)
                while pages is None:
                    victim = self.running[-1]
                    self.retract(victim)
                    if victim is req:
                        break
                    pages = self._obtain_pages(need)
                if pages is None:
                    continue
                req.pages += pages
            rows.append(ScheduledRow(req, req.kv_len, 1, samples=True, token_index=req.num_sampled, steps=row_steps))
            req.kv_len += row_steps
            req.num_sampled += row_steps
            req.in_flight += 1
        return ScheduledBatch(rows=rows, is_decode=True, num_steps=steps) if rows else None
