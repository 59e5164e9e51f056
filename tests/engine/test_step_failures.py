"""A step that fails ends its own requests with an error, and the engine serves the others; a device
error, or MAX_FAILED_STEPS failed steps in a row, break the engine (EngineBroken).

Faults are injected by monkeypatching: building a step's batch (before anything runs), the host's
bookkeeping of a step's tokens (after it ran), or reading a step's tokens from the device.
"""

import jax
import numpy as np
import pytest

from minisgl_jax.core import FinishReason, SamplingParams
from minisgl_jax.engine import engine as engine_module
from minisgl_jax.engine import outputs as outputs_module
from minisgl_jax.engine.step_failures import MAX_FAILED_STEPS, EngineBroken, is_device_error
from minisgl_jax.engine.batch import StepKey, StepOutput
from minisgl_jax.engine.programs import CompileError, ProgramKey, StepPrograms
from tiny_models import save_tiny_checkpoint, tiny_engine

GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
PAGE = 4


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "qwen3"), "qwen3", seed=5)


def make_engine(checkpoint: str):
    return tiny_engine(checkpoint, cache="radix", num_pages=128, page_size=PAGE, max_running_requests=4,
                       max_prefill_tokens=16)


@pytest.fixture(scope="module")
def engine(checkpoint):
    """One engine for the tests whose faults it survives: each leaves it idle, every page back."""
    return make_engine(checkpoint)


def prompts() -> dict[str, list[int]]:
    rng = np.random.default_rng(1)
    return {name: rng.integers(0, 256, size=n).tolist() for name, n in (("a", 9), ("b", 13), ("c", 7), ("long", 40))}


@pytest.fixture(scope="module")
def alone(engine):
    """Each prompt's greedy tokens, run by itself with no fault."""
    outputs = {name: engine.generate([prompt], GREEDY)[0] for name, prompt in prompts().items()}
    engine.flush_cache()
    return outputs


def fail_building(monkeypatch, when) -> None:
    """Building the batch of every step for which `when(batch)` holds raises (nothing runs)."""
    build = engine_module.build_step_batch

    def failing(batch, *args):
        if when(batch):
            raise ValueError("injected fault")
        return build(batch, *args)

    monkeypatch.setattr(engine_module, "build_step_batch", failing)


def fail_bookkeeping(monkeypatch, engine, request_id: str) -> None:
    """The host's bookkeeping of a step's tokens raises on the tokens of `request_id` (the step ran)."""
    finish_reason = outputs_module.finish_reason

    def failing(req, token, eos_token_ids):
        if req.request_id == request_id:
            raise ValueError("injected fault")
        return finish_reason(req, token, eos_token_ids)

    monkeypatch.setattr(outputs_module, "finish_reason", failing)


def has(request_id: str):
    return lambda batch: any(row.req.request_id == request_id for row in batch.rows)


def run(engine, added: dict[str, list[int]] | None = None) -> dict[str, list]:
    """Step until idle, adding `added` once the requests already in are decoding; each request's outputs."""
    outputs: dict[str, list] = {}
    for _ in range(2):  # their prefill, then their first decode step, are launched
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
    for name, prompt in (added or {}).items():
        engine.add_request(name, prompt, GREEDY)
    while engine.has_unfinished():
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
    return outputs


def tokens(outputs: list) -> list[int]:
    return [t for out in outputs for t in out.new_token_ids]


def assert_failed(outputs: list) -> None:
    """The request ended once, with an error naming the fault."""
    assert [out.finished for out in outputs].count(True) == 1 and outputs[-1].finished
    assert outputs[-1].finish_reason is FinishReason.ERROR
    assert outputs[-1].error == "ValueError: injected fault"


@pytest.mark.slow  # an engine of its own
@pytest.mark.parametrize("where", ["building", "bookkeeping"])
def test_a_failed_step_ends_its_requests_with_an_error_and_the_others_complete(engine, alone, monkeypatch, where):
    if where == "building":
        fail_building(monkeypatch, has("bad"))
    else:
        fail_bookkeeping(monkeypatch, engine, "bad")
    p = prompts()
    engine.add_request("a", p["a"], GREEDY)
    outputs = run(engine, added={"bad": p["b"]})  # "bad" arrives while "a" decodes: its prefill is a step of its own
    assert_failed(outputs["bad"])
    assert tokens(outputs["a"]) == alone["a"] and outputs["a"][-1].finish_reason is FinishReason.LENGTH
    engine.check_kv_invariant()
    monkeypatch.undo()
    assert engine.generate([p["b"]], GREEDY)[0] == alone["b"]  # the engine serves it once the fault is gone
    engine.check_kv_invariant()


@pytest.mark.slow  # an engine of its own
def test_a_failed_decode_step_ends_every_request_in_it(engine, alone, monkeypatch):
    """With overlap, the failed step's requests are also in the step still in flight (a burst of
    decode steps here); a request with one of their prompts then reads only pages the device wrote."""
    launched = []

    def second_decode(batch) -> bool:
        launched.append(batch.is_decode)
        return batch.is_decode and launched.count(True) == 2

    fail_building(monkeypatch, second_decode)
    p = prompts()
    engine.add_request("a", p["a"], GREEDY)
    engine.add_request("b", p["b"], GREEDY)
    outputs = run(engine)
    assert_failed(outputs["a"])
    assert_failed(outputs["b"])
    assert 0 < len(tokens(outputs["a"])) < len(alone["a"])
    engine.check_kv_invariant()
    monkeypatch.undo()
    assert engine.generate([p["a"], p["b"], p["c"]], GREEDY) == [alone["a"], alone["b"], alone["c"]]
    engine.check_kv_invariant()


@pytest.mark.slow  # an engine of its own
def test_a_failed_prefill_chunk_leaves_only_the_chunks_before_it_in_the_cache(engine, alone, monkeypatch):
    engine.flush_cache()

    def second_chunk(batch) -> bool:
        return any(row.req.request_id == "long" and row.start == 16 for row in batch.rows)

    fail_building(monkeypatch, second_chunk)
    engine.add_request("long", prompts()["long"], GREEDY)
    outputs = run(engine)
    assert_failed(outputs["long"])
    assert engine.cache.num_cached_pages == 16 // PAGE  # the first chunk; the failed one never ran
    engine.check_kv_invariant()
    monkeypatch.undo()
    assert engine.generate([prompts()["long"]], GREEDY)[0] == alone["long"]
    engine.check_kv_invariant()


@pytest.mark.slow  # an engine of its own
def test_a_served_step_resets_the_count_of_failed_steps(engine, alone, monkeypatch):
    fail_building(monkeypatch, lambda batch: any(row.req.request_id.startswith("bad") for row in batch.rows))
    p = prompts()
    for round_ in range(2):
        for i in range(MAX_FAILED_STEPS - 1):
            engine.add_request(f"bad{round_}{i}", p["b"], GREEDY)
            assert_failed(run(engine)[f"bad{round_}{i}"])
        assert engine.generate([p["c"]], GREEDY)[0] == alone["c"]
    engine.check_kv_invariant()


@pytest.mark.slow  # an engine of its own
def test_failed_steps_in_a_row_break_the_engine(checkpoint, monkeypatch):
    engine = make_engine(checkpoint)
    fail_building(monkeypatch, lambda batch: True)
    for i in range(MAX_FAILED_STEPS - 1):
        engine.add_request(f"r{i}", prompts()["a"], GREEDY)
        assert_failed(run(engine)[f"r{i}"])
    engine.add_request("last", prompts()["a"], GREEDY)
    with pytest.raises(EngineBroken, match=f"{MAX_FAILED_STEPS} steps failed in a row.*ValueError: injected fault"):
        engine.step()


class LaunchedStep:
    """A launched step whose tokens are still on the device (nothing compiles or runs)."""

    ids = logprob = top_ids = top_logprobs = None

    def start_copy(self) -> None:
        pass


@pytest.mark.slow  # an engine of its own
def test_a_device_error_breaks_the_engine_at_once(checkpoint, monkeypatch):
    """The device reports a launched step's failure when its tokens are read, one step later."""
    engine = make_engine(checkpoint)
    monkeypatch.setattr(engine.runner, "run", lambda *args, **kwargs: LaunchedStep())

    def read(array):
        raise jax.errors.JaxRuntimeError("INTERNAL: an illegal memory access was encountered")

    monkeypatch.setattr(StepOutput, "to_host", staticmethod(read))
    engine.add_request("a", prompts()["a"], GREEDY)
    assert engine.step() == []  # launched
    with pytest.raises(EngineBroken, match="device error in a prefill step: INTERNAL: an illegal memory access"):
        engine.step()


def test_a_step_that_waits_for_a_compile_says_so_and_a_failed_compile_is_a_step_error():
    """The scheduler reports a step that waits for a compile as compiling, not as hung; a program
    that fails to compile (even with jax's runtime error) never ran, so it is no device error."""
    seen = []

    class Lowered:
        def compile(self):
            seen.append(programs.compiling)
            raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: out of memory while compiling")

    programs = StepPrograms(lambda key, packed: Lowered())
    key = ProgramKey(layout=None, step=StepKey(is_decode=True))
    with pytest.raises(CompileError, match="compiling the decode program .* failed: JaxRuntimeError") as failure:
        programs.get(key, np.zeros(1, np.int32))
    assert seen == [True] and not programs.compiling
    assert not is_device_error(failure.value)
    assert is_device_error(jax.errors.JaxRuntimeError("INTERNAL: an illegal memory access was encountered"))
