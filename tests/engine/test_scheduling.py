"""Batching, chunking, paging and retraction never change greedy outputs; aborts free pages at once."""

import numpy as np
import pytest

from minisgl_jax.core import FinishReason, SamplingParams
from minisgl_jax.engine import Engine
from tiny_models import save_tiny_checkpoint, tiny_engine

pytestmark = pytest.mark.slow  # engines of its own

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "qwen3"), "qwen3", seed=3)


def make_engine(path: str, **overrides) -> Engine:
    args = dict(cache="naive", num_pages=512, page_size=16, max_running_requests=8, max_prefill_tokens=256)
    return tiny_engine(path, **{**args, **overrides})


def mixed_prompts(count: int = 8, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=int(n)).tolist() for n in rng.integers(3, 90, size=count)]


@pytest.fixture(scope="module")
def alone(checkpoint):
    """Each prompt run by itself: the expected output of every other configuration."""
    engine = make_engine(checkpoint)
    return [engine.generate([p], GREEDY)[0] for p in mixed_prompts()]


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),  # the batch of 8 at once
        dict(max_prefill_tokens=16),  # chunked prefill
        dict(page_size=1, num_pages=4096),
        dict(page_size=64, num_pages=64),
        dict(overlap=False),
    ],
    ids=["batch8", "chunk16", "page1", "page64", "no-overlap"],
)
def test_batched_output_equals_alone(checkpoint, alone, overrides):
    engine = make_engine(checkpoint, **overrides)
    assert engine.generate(mixed_prompts(), GREEDY) == alone
    engine.check_kv_invariant()


def test_retraction_under_tiny_pool_keeps_outputs(checkpoint, alone):
    engine = make_engine(checkpoint, num_pages=14, max_prefill_tokens=64)
    assert engine.generate(mixed_prompts(), GREEDY) == alone
    assert engine.stats()["num_retractions"] > 0
    engine.check_kv_invariant()


def test_abort_frees_pages_at_once(checkpoint):
    engine = make_engine(checkpoint)
    free_at_start = engine.allocator.num_free
    for i, prompt in enumerate(mixed_prompts(4)):
        engine.add_request(f"r{i}", prompt, SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True))
    for _ in range(4):
        engine.step()
    assert engine.allocator.num_free < free_at_start
    for i in range(4):
        engine.abort_request(f"r{i}")
    assert engine.allocator.num_free == free_at_start
    engine.check_kv_invariant()
    finals = []
    while engine.has_unfinished():
        finals += [o for o in engine.step() if o.finished]
    assert sorted(o.request_id for o in finals) == ["r0", "r1", "r2", "r3"]
    assert all(o.finish_reason is FinishReason.ABORT for o in finals)
    engine.check_kv_invariant()


def test_seed_reproducible_and_distinct(checkpoint):
    engine = make_engine(checkpoint)
    prompt = mixed_prompts(1)[0]

    def run(seed: int, **kw) -> list[int]:
        return engine.generate([prompt], SamplingParams(temperature=1.0, max_tokens=16, seed=seed, ignore_eos=True, **kw))[0]

    assert run(7) == run(7)
    assert run(7) != run(8)
    assert run(5, top_k=5, top_p=0.9) == run(5, top_k=5, top_p=0.9)
    # The same seed gives the same sample whatever shares the batch.
    batch = engine.generate(
        [prompt, mixed_prompts(2)[1]],
        [SamplingParams(temperature=1.0, max_tokens=16, seed=7, ignore_eos=True), GREEDY],
    )
    assert batch[0] == run(7)
    engine.check_kv_invariant()


def test_stop_conditions(checkpoint):
    engine = make_engine(checkpoint)
    prompt = mixed_prompts(1)[0]
    free = engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))[0]
    stop_token = free[5]
    first = free.index(stop_token)
    stopped = engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=12, stop_token_ids=[stop_token]))[0]
    assert stopped == free[: first + 1]
    with pytest.raises(ValueError, match="context length"):
        engine.add_request("long", prompt, SamplingParams(max_tokens=engine.max_model_len))
    with pytest.raises(ValueError, match="top_p"):
        engine.add_request("bad", prompt, SamplingParams(top_p=0.0))
    engine.check_kv_invariant()


def test_requests_larger_than_the_pool_are_refused_or_capped(checkpoint):
    engine = make_engine(checkpoint, num_pages=5)  # 4 usable pages: 64 tokens
    with pytest.raises(ValueError, match="whole KV cache"):
        engine.add_request("big", list(range(50)), SamplingParams(max_tokens=30))
    with pytest.raises(ValueError, match="whole KV cache"):
        engine.add_request("huge", list(range(70)) * 1, SamplingParams(max_tokens=None))
    out = engine.generate([list(range(50))], SamplingParams(temperature=0.0, max_tokens=None, ignore_eos=True))
    assert len(out[0]) == 64 - 50  # without max_tokens: as far as the pool goes
    engine.check_kv_invariant()


def test_step_timing_splits_host_time(checkpoint):
    engine = make_engine(checkpoint)
    engine.generate(mixed_prompts(4), GREEDY)
    t = engine.timing
    assert t["launch_s"] > 0 and t["wait_s"] >= 0
    assert t["launch_s"] + t["wait_s"] <= t["step_s"]


def test_full_batch_skips_prefix_ordering_of_the_queue(checkpoint):
    """Ordering the queue matches every waiting request against the tree: a step that can admit no
    one (every slot taken) must not pay for it."""
    engine = make_engine(checkpoint, cache="radix", max_running_requests=2, lpm_min_queue=1)
    matched = []
    match = engine.scheduler.cache.match
    engine.scheduler.cache.match = lambda ids: matched.append(len(ids)) or match(ids)
    for i, prompt in enumerate(mixed_prompts(6)):
        engine.add_request(f"r{i}", prompt, SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True))
    for _ in range(3):
        engine.step()  # two admitted and past their prefill; four wait for a slot
    assert len(engine.scheduler.running) == 2 and len(engine.scheduler.waiting) == 4
    matched.clear()
    for _ in range(5):
        engine.step()
    assert matched == []
    while engine.has_unfinished():
        engine.step()
    engine.check_kv_invariant()


def test_prefix_ordering_is_bounded_by_its_window(checkpoint):
    """However long the queue, one step matches at most LPM_WINDOW waiting requests to order them,
    plus the ones it admits; and the longest cached prefix still goes first within the window."""
    from minisgl_jax.engine.scheduler import LPM_WINDOW

    engine = make_engine(checkpoint, cache="radix", max_running_requests=2, lpm_min_queue=1)
    params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    shared = list(range(1, 49))  # three pages
    engine.generate([shared + [60]], params)  # its prompt's pages are cached now
    for i in range(LPM_WINDOW + 40):
        engine.add_request(f"cold{i}", [100 + i % 50, 7, 8, 9], params)
    engine.add_request("warm", shared + [61], params)  # arrived last, but inside the window below
    engine.scheduler.waiting.rotate(LPM_WINDOW // 2)  # move it into the first LPM_WINDOW
    matched = []
    match = engine.scheduler.cache.match
    engine.scheduler.cache.match = lambda ids: matched.append(len(ids)) or match(ids)
    engine.step()
    assert LPM_WINDOW <= len(matched) <= LPM_WINDOW + 2
    assert "warm" in {r.request_id for r in engine.scheduler.running}
    while engine.has_unfinished():
        engine.step()
    engine.check_kv_invariant()
