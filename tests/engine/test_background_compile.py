"""Step programs compiled once, whichever thread asks first; the background compiler waits for an
idle engine and stops on demand."""

import threading
import time

import pytest

from minisgl_jax.core import MAX_LOGPROBS, SamplingParams
from minisgl_jax.engine import warmup
from minisgl_jax.engine.programs import StepPrograms
from minisgl_jax.engine.sampler import SAMPLE_FILTERED
from tiny_models import save_tiny_checkpoint, tiny_engine

pytestmark = pytest.mark.slow  # engines of its own


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "llama"), "llama", seed=2)


def small_engine(path: str, **args):
    return tiny_engine(path, num_pages=64, page_size=4, max_running_requests=2, max_prefill_tokens=32, **args)


def test_two_threads_wanting_one_program_compile_it_once(checkpoint):
    engine = small_engine(checkpoint)
    key, packed = warmup.step_programs(engine, SAMPLE_FILTERED, 0)[0]
    lowered = []
    programs = StepPrograms(lambda *args: lowered.append(args) or engine.runner.lower(*args))
    both_ready = threading.Barrier(2)
    results = []

    def want():
        both_ready.wait()
        results.append(programs.get(key, packed))

    threads = [threading.Thread(target=want) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(lowered) == 1
    assert results[0] is results[1] is programs.compiled[key]


def test_a_failed_compile_raises_in_its_caller_and_is_tried_again(checkpoint):
    engine = small_engine(checkpoint)
    key, packed = warmup.step_programs(engine, SAMPLE_FILTERED, 0)[0]
    broken = [True]

    def lower(*args):
        if broken[0]:
            raise RuntimeError("compiler ran out of memory")
        return engine.runner.lower(*args)

    programs = StepPrograms(lower)
    with pytest.raises(RuntimeError, match="out of memory"):
        programs.get(key, packed)
    broken[0] = False
    assert programs.get(key, packed) is programs.compiled[key]


def test_the_background_compiler_waits_for_an_idle_engine(checkpoint):
    """Tracing holds the GIL the engine's host work needs, so nothing is traced while requests run;
    once they finish, the programs compile, and the engine then serves them without compiling. One
    variant (filtered sampling with logprobs, what the last request needs) stands for all of them:
    compiling all eight took 45 s here."""
    engine = small_engine(checkpoint, warmup=True, background_compile=False)
    compiled = len(engine.runner.programs.compiled)
    engine.add_request("busy", [1, 2, 3], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    variants = warmup.step_programs(engine, SAMPLE_FILTERED, MAX_LOGPROBS)
    compiler = warmup.BackgroundCompiler(engine, variants, workers=1)
    time.sleep(5 * compiler.POLL_S)
    assert compiler.thread.is_alive() and len(engine.runner.programs.compiled) == compiled
    while engine.has_unfinished():
        engine.step()
    compiler.thread.join()
    assert len(engine.runner.programs.compiled) == compiled + len(variants)
    params = SamplingParams(temperature=0.9, top_p=0.8, max_tokens=5, ignore_eos=True, seed=1, logprobs=1)
    assert len(engine.generate([[5, 6, 7]], params)[0]) == 5
    assert len(engine.runner.programs.compiled) == compiled + len(variants)


def test_stopping_the_background_compiler_leaves_serving_whole(checkpoint):
    """Stopped (by Engine.shutdown, or at exit), the compiler ends after the programs under way; a
    request whose program it never reached compiles it when first needed and runs."""
    engine = small_engine(checkpoint, warmup=True)
    engine.shutdown()
    assert not engine.background_compiler.thread.is_alive()
    outputs = engine.generate(
        [[5, 6, 7, 8, 9]], SamplingParams(temperature=0.9, top_p=0.8, max_tokens=5, ignore_eos=True, seed=1)
    )
    assert len(outputs[0]) == 5
    assert any(k.step.sample_mode == SAMPLE_FILTERED and not k.step.is_decode for k in engine.runner.programs.compiled)
    engine.check_kv_invariant()
