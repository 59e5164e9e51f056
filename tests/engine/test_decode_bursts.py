"""Decode bursts (several decode steps per launch) give the tokens single steps give, and keep pages whole."""

import gc
import weakref

import numpy as np
import pytest

from minisgl_jax.config import EngineArgs
from minisgl_jax.core import FinishReason, SamplingParams
from minisgl_jax.engine import Engine, warmup
from minisgl_jax.engine.buckets import BURST_MAX_ROWS
from tiny_models import save_tiny_checkpoint, tiny_engine

pytestmark = pytest.mark.slow  # engines of its own


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "qwen3"), "qwen3", seed=5)


def make_engine(path: str, **overrides) -> Engine:
    args = dict(cache="radix", num_pages=256, page_size=4, max_running_requests=4, max_prefill_tokens=128)
    return tiny_engine(path, **{**args, **overrides})


def prompts(count: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=int(n)).tolist() for n in rng.integers(5, 40, size=count)]


def run(engine: Engine, ids: list[str], params: list[SamplingParams], prompt_list=None) -> dict:
    """Every request's tokens, logprobs and finish reason, added at once and run to the end."""
    for rid, prompt, p in zip(ids, prompt_list or prompts(len(ids)), params):
        engine.add_request(rid, prompt, p)
    tokens = {rid: [] for rid in ids}
    logprobs, reasons = {rid: [] for rid in ids}, {}
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
            logprobs[out.request_id] += [(lp.token_id, round(lp.logprob, 4)) for lp in out.new_logprobs]
            if out.finished:
                reasons[out.request_id] = out.finish_reason
    engine.check_kv_invariant()
    return dict(tokens=tokens, logprobs=logprobs, reasons=reasons)


def request_mix(stop_token: int) -> list[SamplingParams]:
    return [
        SamplingParams(temperature=0.0, max_tokens=19, ignore_eos=True),
        SamplingParams(temperature=0.8, top_p=0.9, max_tokens=14, ignore_eos=True, seed=11, logprobs=3),
        SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, stop_token_ids=[stop_token]),
        SamplingParams(temperature=1.0, max_tokens=9, ignore_eos=True, seed=7),
    ]


def test_bursts_give_the_tokens_of_single_steps(checkpoint):
    single = make_engine(checkpoint, decode_steps=1)
    ids = ["a", "b", "c", "d"]
    # A stop token the greedy request meets mid-way: its 6th token, so a burst overshoots it.
    probe = run(single, ["probe"], [SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)], prompts(4)[2:3])
    stop = probe["tokens"]["probe"][5]
    expected = run(single, ids, request_mix(stop))
    assert single.stats()["burst_steps"] == 0

    burst = make_engine(checkpoint, decode_steps=4)
    got = run(burst, ids, request_mix(stop))
    assert got == expected
    assert got["reasons"]["c"] is FinishReason.STOP and len(got["tokens"]["c"]) <= 6
    assert burst.stats()["burst_steps"] > 0
    # a burst of 4 yields 4 tokens per launch: fewer launches for the same tokens
    assert burst.stats()["steps"] < single.stats()["steps"] - 3
    assert burst.allocator.num_free + burst.cache.num_cached_pages == burst.allocator.num_usable


def test_no_burst_while_requests_wait_or_tokens_run_short(checkpoint):
    engine = make_engine(checkpoint, decode_steps=4, max_running_requests=1)
    engine.add_request("first", prompts(1)[0], SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True))
    engine.add_request("second", prompts(2)[1], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))
    sizes = []
    while engine.has_unfinished():
        batch = engine.scheduler.schedule()
        if batch is None:
            break
        if batch.is_decode:
            sizes.append((len(engine.scheduler.waiting), batch.num_steps))
        engine._in_flight = (batch, engine._dispatch(batch, []))
        for out in engine._process(*engine._in_flight):
            if out.finished:
                engine.requests.pop(out.request_id)
        engine._in_flight = None
    # "second" waits while "first" decodes: single steps; then "second" alone bursts while 4 tokens
    # remain (1 from prefill + 4), then single steps for the last one.
    assert all(steps == 1 for waiting, steps in sizes if waiting)
    assert [steps for waiting, steps in sizes if not waiting] == [4, 1]
    engine.check_kv_invariant()


def test_a_row_near_max_tokens_takes_a_shorter_burst(checkpoint):
    params = {"short": SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True),
              "long": SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)}
    expected = run(make_engine(checkpoint, decode_steps=1), list(params), list(params.values()))["tokens"]
    engine = make_engine(checkpoint, decode_steps=4, overlap=False)
    for (rid, p), prompt in zip(params.items(), prompts(2)):
        engine.add_request(rid, prompt, p)
    engine.step()  # the prefill of both: one token each
    batch = engine.scheduler.schedule()
    assert batch.num_steps == 4 and [r.steps for r in batch.rows] == [2, 4]
    engine._in_flight = (batch, engine._dispatch(batch, []))
    tokens = {rid: [] for rid in params}
    for out in engine._process(*engine._in_flight):
        tokens[out.request_id] += out.new_token_ids
        if out.finished:
            engine.requests.pop(out.request_id)
    engine._in_flight = None
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
    assert tokens == {rid: expected[rid][1:] for rid in params}  # the first token came from the prefill
    engine.check_kv_invariant()


def test_burst_batches_are_small_on_one_device_unless_asked(checkpoint):
    rows = dict(decode_steps=4, max_running_requests=BURST_MAX_ROWS + 1, num_pages=1024)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    ids = [f"r{i}" for i in range(BURST_MAX_ROWS + 1)]
    engine = make_engine(checkpoint, **rows)
    result = run(engine, ids, [params] * len(ids))
    assert engine.stats()["burst_steps"] == 0  # every decode batch had BURST_MAX_ROWS + 1 rows
    assert all(len(t) == 8 for t in result["tokens"].values())

    wide = make_engine(checkpoint, **rows, burst_max_rows=BURST_MAX_ROWS + 1)
    assert run(wide, ids, [params] * len(ids))["tokens"] == result["tokens"]
    assert wide.stats()["burst_steps"] > 0


def test_tensor_parallel_engines_burst_at_every_batch_size(checkpoint):
    """With tp > 1 the host's launch and bookkeeping of a step take about the device's time, so
    every decode bucket gets a burst program by default."""
    engine = make_engine(checkpoint, tp=2, max_running_requests=BURST_MAX_ROWS + 8, num_pages=1024)
    assert engine.buckets.burst_max_rows == BURST_MAX_ROWS + 8
    assert engine.buckets.burst_buckets() == sorted(engine.buckets.decode)
    assert make_engine(checkpoint, tp=2, burst_max_rows=0).buckets.burst_buckets() == []


def test_decode_steps_is_validated():
    with pytest.raises(ValueError, match="decode_steps"):
        EngineArgs(model="m", decode_steps=0).validate()
    with pytest.raises(ValueError, match="burst_max_rows"):
        EngineArgs(model="m", burst_max_rows=-1).validate()


def test_warmup_compiles_every_program_serving_runs(checkpoint):
    """Start-up compiles the plain programs, the background compiler their top-k/top-p/min-p,
    logprobs and logits-processing variants; after it, prefill, single decode steps and bursts with every kind of
    sampling run precompiled programs (serving never waits on a compile)."""
    gc.unfreeze()  # whatever an earlier test froze
    engine = make_engine(checkpoint, decode_steps=4, warmup=True, cache="naive", max_prefill_tokens=64)
    assert gc.get_freeze_count() > 0  # start-up's objects are out of the collector's way
    plain = len(engine.buckets.decode) + len(engine.buckets.burst_buckets()) + len(engine.buckets.prefill)
    assert len(engine.runner.programs.compiled) >= plain
    engine.background_compiler.thread.join()
    assert len(engine.runner.programs.compiled) == plain + len(warmup.variant_programs(engine))
    params = [
        SamplingParams(temperature=0.0, max_tokens=19, ignore_eos=True),
        SamplingParams(temperature=0.8, top_p=0.9, max_tokens=14, ignore_eos=True, seed=11, logprobs=3),
        SamplingParams(temperature=0.7, min_p=0.1, top_k=5, max_tokens=12, ignore_eos=True, seed=3),
        SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=2),
        SamplingParams(temperature=1.0, max_tokens=9, ignore_eos=True, seed=7),
        SamplingParams(temperature=0.9, top_p=0.8, max_tokens=11, ignore_eos=True, seed=5, repetition_penalty=1.2),
    ]
    result = run(engine, list("abcdef"), params)
    assert [len(t) for t in result["tokens"].values()] == [19, 14, 12, 6, 9, 11]
    assert engine.stats()["burst_steps"] > 0
    # nothing compiled while serving
    assert len(engine.runner.programs.compiled) == plain + len(warmup.variant_programs(engine))
    # Dropped, the engine thaws what it froze, and its device arrays (in reference cycles) are freed.
    kv_pages = weakref.ref(engine.runner.kv_pool[0][0])
    del engine
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert kv_pages() is None


def test_collector_paused_restores_the_collector():
    """Compiles run with Python's automatic collections off, and the collector comes back as it
    was, also when the compile raises."""
    assert gc.isenabled()
    with warmup.collector_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(RuntimeError, match="compile failed"), warmup.collector_paused():
        raise RuntimeError("compile failed")
    assert gc.isenabled()
    gc.disable()
    try:
        with warmup.collector_paused():
            pass
        assert not gc.isenabled()  # a caller's choice to keep it off is kept
    finally:
        gc.enable()
