"""The scheduler on the host alone: a page allocator and a prefix cache, no engine, no device.

Each scheduled batch is "run" by `complete`, which does what the engine does when it reads a step's
tokens back: the rows are no longer in flight and each sampling row appends a token."""

from __future__ import annotations

from minisgl_jax.core import FinishReason, SamplingParams
from minisgl_jax.engine.batch import ScheduledBatch
from minisgl_jax.engine.request import Phase, Req
from minisgl_jax.engine.buckets import Buckets
from minisgl_jax.engine.scheduler import Scheduler, SchedulerConfig
from minisgl_jax.kvcache.allocator import PageAllocator
from minisgl_jax.kvcache.radix import RadixCache

PAGE = 4
SAMPLED_TOKEN = 7


def make_scheduler(num_pages: int = 64, max_running: int = 4, max_prefill_tokens: int = 64,
                   lpm_min_queue: int = 1_000_000) -> Scheduler:
    allocator = PageAllocator(num_pages)
    buckets = Buckets(decode=(max_running,), prefill=(max_prefill_tokens,), max_running=max_running,
                      decode_steps=1, burst_max_rows=0, cascade=False)
    return Scheduler(allocator, RadixCache(allocator, PAGE), SchedulerConfig(PAGE, max_prefill_tokens, lpm_min_queue,
                                                                              buckets))


def request(name: str, prompt: list[int], max_new_tokens: int = 8, arrival: int = 0) -> Req:
    return Req(name, prompt, SamplingParams(max_tokens=max_new_tokens), seed=0, max_new_tokens=max_new_tokens,
               arrival=arrival)


def complete(scheduler: Scheduler, batch: ScheduledBatch) -> None:
    """Read the batch's tokens back, finishing rows that reach max_tokens, as Engine._process does."""
    for row in batch.rows:
        row.req.in_flight -= 1
        if not row.samples or row.req.finished:
            continue
        row.req.output_ids += [SAMPLED_TOKEN] * row.steps
        if len(row.req.output_ids) >= row.req.max_new_tokens:
            scheduler.finish(row.req, FinishReason.LENGTH)


def assert_pages_balance(scheduler: Scheduler) -> None:
    free, cached = scheduler.allocator.num_free, scheduler.cache.num_cached_pages
    assert free + cached + scheduler.pages_held_by_requests() == scheduler.allocator.num_usable


def run_to_end(scheduler: Scheduler, max_steps: int = 1000) -> list[ScheduledBatch]:
    batches = []
    while scheduler.has_work() and len(batches) < max_steps:
        batch = scheduler.schedule()
        assert batch is not None, "work left but nothing schedulable"
        complete(scheduler, batch)
        assert_pages_balance(scheduler)
        batches.append(batch)
    assert not scheduler.has_work()
    return batches


def test_admission_stops_at_free_slots_and_keeps_the_queue_order():
    scheduler = make_scheduler(max_running=2)
    reqs = [request(f"r{i}", list(range(10 * i, 10 * i + 6)), arrival=i) for i in range(3)]
    for req in reqs:
        scheduler.add(req)
    batch = scheduler.schedule()
    assert not batch.is_decode and [row.req for row in batch.rows] == reqs[:2]
    assert list(scheduler.waiting) == [reqs[2]] and reqs[2].phase is Phase.WAITING
    assert_pages_balance(scheduler)


def test_admission_reserves_a_page_per_running_request():
    """A prompt whose pages would leave a running request no page for its next token waits."""
    scheduler = make_scheduler(num_pages=4)  # 3 usable pages
    first, second = request("first", [1, 2, 3, 4, 5]), request("second", [9, 8, 7, 6, 5])
    scheduler.add(first)
    complete(scheduler, scheduler.schedule())  # first holds 2 pages, 1 free
    scheduler.add(second)
    batch = scheduler.schedule()
    assert batch.is_decode and [row.req for row in batch.rows] == [first]
    assert list(scheduler.waiting) == [second]


def test_a_long_prompt_is_prefilled_in_chunks_of_the_token_budget():
    scheduler = make_scheduler(max_prefill_tokens=8)
    req = request("long", list(range(1, 21)), max_new_tokens=2)
    scheduler.add(req)
    chunks = []
    for _ in range(3):
        batch = scheduler.schedule()
        assert not batch.is_decode
        chunks.append((batch.rows[0].start, batch.rows[0].num_tokens, batch.rows[0].samples))
        complete(scheduler, batch)
    assert chunks == [(0, 8, False), (8, 8, False), (16, 4, True)]
    assert req.phase is Phase.DECODE and req.output_ids == [SAMPLED_TOKEN]
    run_to_end(scheduler)
    assert req.finish_reason is FinishReason.LENGTH


def test_decode_out_of_pages_retracts_the_newest_request_and_recomputes_it():
    scheduler = make_scheduler(num_pages=5, max_prefill_tokens=64)  # 4 usable pages; each request needs 3
    old, new = request("old", [1, 2, 3], max_new_tokens=10, arrival=0), request("new", [4, 5, 6], 10, arrival=1)
    scheduler.add(old)
    scheduler.add(new)
    batches = run_to_end(scheduler)
    assert scheduler.num_retractions >= 1
    retracted_at = next(i for i, b in enumerate(batches) if i > 0 and not b.is_decode)
    assert [row.req for row in batches[retracted_at].rows] == [new]  # the newest went back and is recomputed
    assert old.output_ids == new.output_ids == [SAMPLED_TOKEN] * 10
    assert_pages_balance(scheduler)


def test_finishing_a_waiting_or_running_request_gives_its_pages_back_at_once():
    scheduler = make_scheduler(max_running=1)
    running, waiting = request("running", list(range(1, 10))), request("waiting", [3, 3, 3])
    scheduler.add(running)
    scheduler.add(waiting)
    complete(scheduler, scheduler.schedule())
    assert running.pages and running.phase is Phase.DECODE
    scheduler.finish(waiting, FinishReason.ABORT)
    scheduler.finish(running, FinishReason.ABORT)
    assert not scheduler.has_work() and running.pages == [] and running.slot is None
    assert scheduler.cache.num_cached_pages == 2  # the prompt's whole pages stay cached for reuse
    assert_pages_balance(scheduler)


def test_longest_cached_prefix_is_admitted_first():
    """With the queue at lpm_min_queue, a later request that reuses cached pages goes before an earlier one."""
    scheduler = make_scheduler(max_running=1, lpm_min_queue=2)
    shared = list(range(1, 13))  # three whole pages
    scheduler.add(request("warm-up", shared + [50], max_new_tokens=1))
    run_to_end(scheduler)
    cold = request("cold", [90, 91, 92, 93, 94], max_new_tokens=1, arrival=1)
    hit = request("hit", shared + [60], max_new_tokens=1, arrival=2)
    scheduler.add(cold)
    scheduler.add(hit)
    batch = scheduler.schedule()
    assert [row.req for row in batch.rows] == [hit] and hit.cached_tokens == 12
