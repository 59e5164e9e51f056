"""Cascade attention in the engine: rows sharing cached prefix pages are grouped, and greedy text is unchanged."""

import pytest

from minisgl_jax.config import EngineArgs
from minisgl_jax.core import SamplingParams
from minisgl_jax.engine import Engine
from minisgl_jax.engine.batch import ScheduledRow
from minisgl_jax.engine.cascade import MAX_GROUPS, MIN_SHARED_TOKENS, plan_cascade
from minisgl_jax.engine.request import Req
from tiny_models import save_tiny_checkpoint

pytestmark = pytest.mark.slow  # engines of its own

PAGE = 16
SHARED = [(7 * i) % 300 + 1 for i in range(300)]  # 300 tokens: 18 whole pages, above MIN_SHARED_TOKENS


def test_rows_sharing_pages_are_grouped_contiguously():
    def row(pages, kv_len):
        req = Req("r", [0] * kv_len, SamplingParams(max_tokens=1), seed=0, max_new_tokens=1, arrival=0)
        req.pages = pages
        return ScheduledRow(req, kv_len - 1, 1, samples=True, token_index=0)

    common = list(range(100, 120))  # 20 pages = 320 keys
    rows = [
        row(common + [1, 2], 340),
        row([500] + list(range(501, 530)), 470),  # alone
        row(common[:18] + [3, 4, 5], 330),  # shares 18 pages with the others
        row(common + [6], 321),  # newest token on page 21, so all 20 common pages are whole
        row(list(range(600, 602)), 20),  # too short to matter
    ]
    plan = plan_cascade(rows, PAGE)
    assert plan is not None
    assert [r.req.pages[0] for r in plan.rows[:3]] == [100, 100, 100]
    assert sorted(id(r) for r in plan.rows) == sorted(id(r) for r in rows)
    assert plan.groups[0].tolist() == [0, 3, 18 * PAGE]
    assert plan.groups[1:].tolist() == [[0, 0, 0]] * (MAX_GROUPS - 1)
    assert plan.prefix_lens.tolist() == [18 * PAGE] * 3 + [0, 0]
    # the page holding a row's newest token is never part of the shared prefix
    assert plan_cascade([row(common, 320), row(common, 320)], PAGE).groups[0, 2] == 19 * PAGE
    assert 19 * PAGE >= MIN_SHARED_TOKENS
    assert plan_cascade([rows[1], rows[4]], PAGE) is None


def test_cascade_gives_the_same_greedy_tokens(tmp_path):
    path = save_tiny_checkpoint(
        str(tmp_path / "qwen3"), "qwen3", hidden_size=128, num_attention_heads=4, num_key_value_heads=2
    )
    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    suffixes = [[310 + i, 7, 9 + i] for i in range(10)]
    outputs, cascade_steps = [], []
    for cascade, tp in ((True, 1), (False, 1), (True, 2)):  # tp=2: the kernel per KV-head shard
        engine = Engine(EngineArgs(
            model=path, dtype="float32", attention_backend="pallas", cache="radix", num_pages=256, page_size=PAGE,
            max_running_requests=16, max_prefill_tokens=512, decode_buckets=[16], compile_cache_dir=None,
            warmup=False, cascade_attention=cascade, tp=tp, decode_steps=1,  # bursts take small batches
        ))
        engine.generate([SHARED], params)  # puts the shared pages in the radix tree
        outputs.append(engine.generate([SHARED + s for s in suffixes], params))
        cascade_steps.append(engine.stats()["cascade_steps"])
        assert engine.stats()["cache_hit_tokens"] >= 10 * 288
        engine.check_kv_invariant()
    assert cascade_steps[0] >= 4 and cascade_steps[1] == 0 and cascade_steps[2] == cascade_steps[0]
    assert outputs[0] == outputs[1] == outputs[2]
