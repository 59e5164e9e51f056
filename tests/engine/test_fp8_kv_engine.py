"""The engine over an FP8 KV pool: radix reuse, retraction, abort and tp=2 change nothing but what e4m3
rounds; the checkpoint's scales reach the pool; greedy agreement with a float pool is reported."""

import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from minisgl_jax.core import FinishReason, SamplingParams
from minisgl_jax.engine import Engine, setup
from minisgl_jax.layers.attention import KVScales
from tiny_models import save_tiny_checkpoint, tiny_engine

pytestmark = pytest.mark.slow  # engines of its own

FP8 = "fp8_e4m3"
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
PARITY_PROMPTS = [[5, 17, 99, 3, 250, 42, 7], list(range(30, 71))]  # test_parity.py's
# Greedy agreement of FP8 vs float KV on random tiny models. Their logits are nearly flat, so one
# near-tie flipped by e4m3's ~3% rounding changes every later token: the floor only says the FP8 run
# follows the float run for a while (its first tokens agree), it is no quality claim.
AGREEMENT_FLOOR = 0.25


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "qwen3"), "qwen3", seed=8)


def fp8_engine(path: str, **overrides) -> Engine:
    args = dict(kv_cache_dtype=FP8, cache="naive", num_pages=256, page_size=16, max_running_requests=8,
                max_prefill_tokens=32)
    return tiny_engine(path, **{**args, **overrides})


@pytest.fixture(scope="module")
def naive(checkpoint):
    """The plain FP8 engine: every other configuration's expected tokens."""
    return fp8_engine(checkpoint)


def test_pool_is_fp8_and_sized_at_one_byte_an_element(checkpoint, monkeypatch):
    itemsizes = []
    plan = setup.plan_kv_pages
    monkeypatch.setattr(setup, "plan_kv_pages", lambda *a, **kw: itemsizes.append(a[4]) or plan(*a, **kw))
    fp8, bf16 = (fp8_engine(checkpoint, dtype="bfloat16", kv_cache_dtype=kv) for kv in (FP8, "auto"))
    assert itemsizes == [1, 2]  # so free memory holds twice the pages (tests/engine/test_kv_budget.py)
    assert fp8.runner.kv_pool[0][0].dtype == jnp.float8_e4m3fn
    assert fp8.runner.kv_pool[0][0].nbytes * 2 == bf16.runner.kv_pool[0][0].nbytes


def test_radix_reuse_gives_the_tokens_of_no_reuse(checkpoint, naive):
    rng = np.random.default_rng(1)
    system = rng.integers(0, 256, 3 * 16 + 5).tolist()
    prompts = [system[:16] + [1, 2, 3], system[:17] + [4, 5], system, system, system + [9] * 20]
    radix = fp8_engine(checkpoint, cache="radix")
    want = [naive.generate([p], GREEDY)[0] for p in prompts]
    assert [radix.generate([p], GREEDY)[0] for p in prompts] == want  # chunked prefill (32) over cached pages
    assert radix.generate(prompts, GREEDY) == want
    assert radix.stats()["cache_hit_tokens"] > 0
    assert radix.stats()["burst_steps"] > 0  # decode bursts over the FP8 pool too
    radix.check_kv_invariant()


def test_retraction_and_abort_leave_no_pages_behind(checkpoint, naive):
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 256, size=int(n)).tolist() for n in rng.integers(3, 90, size=4)]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    engine = fp8_engine(checkpoint, num_pages=9, max_prefill_tokens=64)
    assert engine.generate(prompts, params) == naive.generate(prompts, params)
    assert engine.stats()["num_retractions"] > 0
    engine.check_kv_invariant()

    free_at_start = engine.allocator.num_free
    for i, prompt in enumerate(prompts[:3]):
        engine.add_request(f"r{i}", prompt, SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True))
    for _ in range(3):
        engine.step()
    assert engine.allocator.num_free < free_at_start
    for i in range(3):
        engine.abort_request(f"r{i}")
    finals = []
    while engine.has_unfinished():
        finals += [o for o in engine.step() if o.finished]
    assert all(o.finish_reason is FinishReason.ABORT for o in finals)
    assert engine.allocator.num_free == free_at_start
    engine.check_kv_invariant()


def run_with_prompt_logprobs(engine: Engine) -> tuple[list[list[int]], np.ndarray]:
    """Greedy tokens of the parity prompts, and every prompt token's logprob (sorted)."""
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, prompt_logprobs=1)
    for i, prompt in enumerate(PARITY_PROMPTS):
        engine.add_request(f"r{i}", prompt, params)
    tokens, prompt_logprobs = [[] for _ in PARITY_PROMPTS], []
    while engine.has_unfinished():
        for out in engine.step():
            tokens[int(out.request_id[1:])] += out.new_token_ids
            if out.prompt_logprobs is not None:
                prompt_logprobs += [lp.logprob for lp in out.prompt_logprobs[1:]]
    engine.check_kv_invariant()
    return tokens, np.sort(prompt_logprobs)


def test_tp2_equals_tp1(checkpoint, naive):
    tokens1, prompt1 = run_with_prompt_logprobs(naive)
    tokens2, prompt2 = run_with_prompt_logprobs(fp8_engine(checkpoint, tp=2))
    assert tokens2 == tokens1
    assert len(prompt1) == sum(len(p) - 1 for p in PARITY_PROMPTS)
    np.testing.assert_allclose(prompt2, prompt1, rtol=1e-4, atol=1e-4)


def test_checkpoint_scales_reach_the_layers_and_divide_what_the_pool_stores(checkpoint, tmp_path):
    prompt = list(range(40, 90))
    one = fp8_engine(checkpoint)
    one.generate([prompt], SamplingParams(temperature=0.0, max_tokens=1))
    path = str(shutil.copytree(checkpoint, tmp_path / "scaled"))
    scale_file = os.path.join(path, "kv_scales.safetensors")  # the loader reads every safetensors file
    save_file({"model.layers.0.self_attn.k_scale": np.array(4.0, np.float32),
               "model.layers.0.self_attn.v_scale": np.array([0.5], np.float32),
               "model.layers.1.self_attn.k_proj.k_scale": np.array(0.25, np.float32)}, scale_file)
    scaled = fp8_engine(path)
    model = nnx.merge(scaled.runner.graphdef, scaled.runner.param_state())
    assert [layer.attn.kv_scales for layer in model.layers] == [KVScales(4.0, 0.5), KVScales(0.25, 1.0)]
    scaled.generate([prompt], SamplingParams(temperature=0.0, max_tokens=1))
    (k1, v1), (k4, v05) = (np.asarray(pool[0], np.float32) for pool in (one.runner.kv_pool, scaled.runner.kv_pool))
    live = np.abs(k1) > 2.0**-5  # away from e4m3's subnormals, where / 4 rounds coarser
    assert live.sum() > 100
    # layer 0 stores k / 4 and v / 0.5: within e4m3's rounding of the unit-scale pool's values
    np.testing.assert_allclose(k4[live], k1[live] / 4.0, rtol=2**-3)
    np.testing.assert_allclose(v05, v1 * 2.0, rtol=2**-3, atol=2**-8)
    assert not np.allclose(k4, k1)

    save_file({"model.layers.1.self_attn.v_scale": np.array(-2.0, np.float32)}, scale_file)
    with pytest.raises(ValueError, match=r"'model\.layers\.1\.self_attn\.v_scale' must be finite and > 0"):
        fp8_engine(path)


def test_greedy_agreement_with_a_float32_pool(checkpoint, naive):
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    runs = {"auto": fp8_engine(checkpoint, kv_cache_dtype="auto").generate(PARITY_PROMPTS, params),
            FP8: naive.generate(PARITY_PROMPTS, params)}
    same = sum(a == b for want, got in zip(runs["auto"], runs[FP8]) for a, b in zip(want, got))
    prefix = [next((i for i, (a, b) in enumerate(zip(w, g)) if a != b), len(w)) for w, g in zip(runs["auto"], runs[FP8])]
    total = sum(len(w) for w in runs["auto"])
    print(f"\nqwen3: FP8 vs float32 KV greedy agreement {same}/{total} tokens ({same / total:.0%}), "
          f"first divergence at tokens {prefix} of {params.max_tokens}")
    assert same / total >= AGREEMENT_FLOOR
    assert min(prefix) >= 1
