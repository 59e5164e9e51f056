"""The radix cache changes no output: same greedy tokens as `naive`, with prefill saved and counted."""

import numpy as np
import pytest

from minisgl_jax.core import SamplingParams
from minisgl_jax.engine import Engine
from tiny_models import save_tiny_checkpoint, tiny_engine

pytestmark = pytest.mark.slow  # engines of its own

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
PAGE = 16


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "qwen3"), "qwen3", seed=8)


def make_engine(path: str, cache: str, **overrides) -> Engine:
    args = dict(cache=cache, num_pages=256, page_size=PAGE, max_running_requests=8, max_prefill_tokens=64)
    return tiny_engine(path, **{**args, **overrides})


def shared_prefix_prompts() -> list[list[int]]:
    rng = np.random.default_rng(1)
    system = rng.integers(0, 256, 3 * PAGE + 5).tolist()
    return [
        system[:PAGE] + [1, 2, 3],  # exactly one shared page
        system[: PAGE + 1] + [4, 5],  # one token past a page
        system,  # the whole prompt ...
        system,  # ... repeated
        system + rng.integers(0, 256, 20).tolist(),
        rng.integers(0, 256, 40).tolist(),  # nothing shared
    ]


def run_one_by_one(engine: Engine, prompts: list[list[int]]) -> list[list[int]]:
    return [engine.generate([p], GREEDY)[0] for p in prompts]


def test_radix_matches_naive_and_saves_prefill(checkpoint):
    prompts = shared_prefix_prompts()
    naive = make_engine(checkpoint, "naive")
    radix = make_engine(checkpoint, "radix")
    want = run_one_by_one(naive, prompts)
    assert run_one_by_one(radix, prompts) == want
    assert radix.generate(prompts, GREEDY) == want  # all at once as well
    assert radix.stats()["cache_hit_tokens"] > 0
    assert radix.stats()["prefill_tokens"] < naive.stats()["prefill_tokens"]
    radix.check_kv_invariant()
    assert radix.flush_cache() > 0 and radix.cache.num_cached_pages == 0
    radix.check_kv_invariant()


def test_multi_turn_chat_reuses_the_previous_turn(checkpoint):
    engine = make_engine(checkpoint, "radix")
    history = list(range(50))
    for _ in range(3):
        hits = engine.stats()["cache_hit_tokens"]
        answer = engine.generate([history], GREEDY)[0]
        history = history + answer + list(range(100, 110))
        engine.check_kv_invariant()
    # the third turn found the first turns' pages: at least the whole pages of the first prompt
    assert engine.stats()["cache_hit_tokens"] - hits >= (50 // PAGE) * PAGE


def test_eviction_under_a_tiny_pool_keeps_outputs(checkpoint):
    prompts = shared_prefix_prompts() * 2
    want = make_engine(checkpoint, "naive").generate(prompts, GREEDY)
    engine = make_engine(checkpoint, "radix", num_pages=10)
    assert engine.generate(prompts, GREEDY) == want
    assert engine.stats()["num_evicted_pages"] > 0
    engine.check_kv_invariant()


def test_requests_arriving_together_compute_a_shared_prefix_once(checkpoint):
    rng = np.random.default_rng(2)
    system = rng.integers(0, 256, 3 * PAGE).tolist()
    prompts = [system + rng.integers(0, 256, 5).tolist() for _ in range(6)]
    engine = make_engine(checkpoint, "radix")
    assert engine.generate(prompts, GREEDY) == make_engine(checkpoint, "naive").generate(prompts, GREEDY)
    assert engine.stats()["cache_hit_tokens"] == 5 * 3 * PAGE  # all but the first reuse its pages
    engine.check_kv_invariant()
