"""Penalties, logit_bias and min_tokens on the device: Hugging Face's repetition penalty, a numpy
reference of the OpenAI definitions at every step, the same tokens alone and in a mixed batch (tp=1
and tp=2), and the per-slot state right through retraction, abort and prefix-cache reuse."""

import numpy as np
import pytest
import torch
import transformers

from minisgl_jax.core import FinishReason, SamplingParams
from tiny_models import full_logits, save_tiny_checkpoint, tiny_engine

pytestmark = pytest.mark.slow  # engines of its own

PROMPTS = [[5, 17, 99, 3, 250, 42, 7, 7, 7], list(range(30, 71))]
EOS = 257  # tiny_models' eos_token_id


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "qwen3"), "qwen3", seed=1)


@pytest.fixture(scope="module")
def engine(checkpoint):
    return tiny_engine(checkpoint, cache="radix", num_pages=128, page_size=16, max_running_requests=6,
                       max_prefill_tokens=64, max_logit_bias=8)


def reference(raw: np.ndarray, prompt: list[int], outputs: list[int], p: SamplingParams) -> np.ndarray:
    """The logits to sample from, by the definitions SamplingParams documents."""
    vocab = raw.shape[0]
    counts = np.bincount(np.asarray(outputs, np.int64), minlength=vocab).astype(np.float32)
    seen = (counts > 0) | np.isin(np.arange(vocab), prompt)
    r = np.float32(p.repetition_penalty)
    x = np.where(seen, np.where(raw < 0, raw * r, raw / r), raw)
    x = x - np.float32(p.frequency_penalty) * counts - np.float32(p.presence_penalty) * (counts > 0)
    for token, bias in (p.logit_bias or {}).items():
        x[token] += np.float32(bias)
    if len(outputs) < p.min_tokens:
        x[list(p.stop_token_ids) + ([] if p.ignore_eos else [EOS])] = -np.inf
    return x


def test_repetition_penalty_gives_the_tokens_of_transformers(engine, checkpoint):
    hf = transformers.Qwen3ForCausalLM.from_pretrained(checkpoint, torch_dtype=torch.float32).eval()
    plain = engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))
    ours = engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True,
                                                   repetition_penalty=1.5))
    for prompt, got, free in zip(PROMPTS, ours, plain):
        with torch.no_grad():
            want = hf.generate(torch.tensor([prompt]), max_new_tokens=24, min_new_tokens=24, do_sample=False,
                               repetition_penalty=1.5, pad_token_id=0)[0, len(prompt):].tolist()
        assert got == want
        assert got != free  # the penalty changed the text
    engine.check_kv_invariant()


CONTROLS = [
    SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, presence_penalty=1.5, frequency_penalty=0.7,
                   logprobs=2),
    SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, frequency_penalty=-0.4, repetition_penalty=0.8,
                   presence_penalty=-1.0, logit_bias={3: 2.5, 250: -100.0, 11: 0.75}, logprobs=2),
    # EOS and a stop id pushed to the top, impossible until min_tokens: the request ends right at 6
    SamplingParams(temperature=0.0, max_tokens=16, min_tokens=6, logit_bias={EOS: 100.0, 9: 90.0},
                   stop_token_ids=[9], repetition_penalty=1.3, logprobs=2),
]


@pytest.mark.parametrize("params", CONTROLS, ids=["presence-frequency", "bias-negative", "min-tokens"])
def test_every_step_matches_a_numpy_reference(engine, params):
    prompt = PROMPTS[0]
    engine.add_request("ref", prompt, params)
    outputs, logprobs, reason = [], [], None
    while engine.has_unfinished():
        for out in engine.step():
            outputs += out.new_token_ids
            logprobs += out.new_logprobs
            reason = out.finish_reason or reason
    logits = full_logits(engine, prompt + outputs)[len(prompt) - 1:]
    for k, token in enumerate(outputs):
        assert token == int(np.argmax(reference(logits[k], prompt, outputs[:k], params))), f"step {k}"
        model = logits[k] - np.logaddexp.reduce(logits[k].astype(np.float64))  # before any processing
        assert logprobs[k].logprob == pytest.approx(model[token], abs=1e-4)
        assert [t for t, _ in logprobs[k].top] == np.argsort(-model, kind="stable")[:2].tolist()
    if params.min_tokens:
        assert len(outputs) == params.min_tokens + 1 and outputs[-1] in (EOS, 9) and reason is FinishReason.STOP
    engine.check_kv_invariant()


MIXED = [
    SamplingParams(temperature=0.9, max_tokens=20, ignore_eos=True, seed=5, frequency_penalty=1.2,
                   repetition_penalty=1.4, logit_bias={7: 3.0}),
    SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True),
    SamplingParams(temperature=0.8, top_p=0.9, max_tokens=18, ignore_eos=True, seed=2, presence_penalty=2.0),
    SamplingParams(temperature=1.0, max_tokens=9, ignore_eos=True, seed=3),
    SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, repetition_penalty=2.0, min_tokens=3),
]
MIXED_PROMPTS = [PROMPTS[0], PROMPTS[1], [8, 8, 8, 9], list(range(100, 140)), [7] * 20]


@pytest.fixture(scope="module")
def alone(engine):
    """Each request by itself on the module's engine: what every other run must give."""
    return [engine.generate([prompt], params)[0] for prompt, params in zip(MIXED_PROMPTS, MIXED)]


def test_a_mixed_batch_gives_each_request_its_tokens_alone(engine, alone):
    assert engine.generate(MIXED_PROMPTS, MIXED) == alone
    assert engine.stats()["burst_steps"] > 0  # bursts count their tokens on the device too
    engine.check_kv_invariant()


def test_tensor_parallel_gives_the_same_tokens(checkpoint, alone):
    engine = tiny_engine(checkpoint, tp=2, cache="radix", num_pages=128, page_size=16, max_running_requests=6,
                         max_prefill_tokens=64, max_logit_bias=8)
    assert engine.generate(MIXED_PROMPTS, MIXED) == alone


def test_retraction_reseeds_the_slot(checkpoint, alone):
    """Retracted requests come back in other slots, their output so far counted again."""
    engine = tiny_engine(checkpoint, cache="naive", num_pages=6, page_size=16, max_running_requests=6,
                         max_prefill_tokens=64, max_logit_bias=8)
    assert engine.generate(MIXED_PROMPTS, MIXED) == alone
    assert engine.stats()["num_retractions"] > 0
    engine.check_kv_invariant()


def test_an_aborted_request_leaves_nothing_in_its_slot(engine, alone):
    """A penalized request aborted mid-way; the next one, in the same slot, penalizes only its own tokens."""
    engine.add_request("gone", MIXED_PROMPTS[4], MIXED[4])
    engine.add_request("gone2", MIXED_PROMPTS[0], MIXED[0])
    for _ in range(4):
        engine.step()
    engine.abort_request("gone")
    engine.abort_request("gone2")
    while engine.has_unfinished():
        engine.step()
    assert engine.generate([MIXED_PROMPTS[2]], MIXED[2])[0] == alone[2]
    assert engine.generate([MIXED_PROMPTS[0]], MIXED[0])[0] == alone[0]
    engine.check_kv_invariant()


def test_a_prefix_cache_hit_still_penalizes_the_whole_prompt(engine, alone):
    """The cached pages' tokens are never in a step's input: the slot's prompt comes from the host."""
    engine.flush_cache()
    engine.generate([MIXED_PROMPTS[4] + [1]], SamplingParams(temperature=0.0, max_tokens=2))  # caches [7] * 16
    hits = engine.stats()["cache_hit_tokens"]
    assert engine.generate([MIXED_PROMPTS[4]], MIXED[4])[0] == alone[4]
    assert engine.stats()["cache_hit_tokens"] > hits


def test_prompt_logprobs_cover_every_prompt_token_through_chunks_and_a_cached_prefix(engine):
    prompt = list(range(100, 190))  # 90 tokens: prefilled in two chunks (max_prefill_tokens 64)
    engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=1))  # now in the prefix cache
    engine.add_request("prompt", prompt, SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=3))
    got = None
    while engine.has_unfinished():
        for out in engine.step():
            got = out.prompt_logprobs if out.prompt_logprobs is not None else got
    logits = full_logits(engine, prompt).astype(np.float64)
    model = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    assert got[0] is None and len(got) == len(prompt)
    for i in range(1, len(prompt)):
        assert got[i].token_id == prompt[i] and got[i].logprob == pytest.approx(model[i - 1, prompt[i]], abs=1e-4)
        assert [t for t, _ in got[i].top] == np.argsort(-model[i - 1], kind="stable")[:3].tolist()
    engine.check_kv_invariant()


def test_logit_bias_entries_are_bounded_by_the_engine(engine):
    with pytest.raises(ValueError, match="max-logit-bias"):
        engine.check_request([1, 2], SamplingParams(logit_bias={i: 1.0 for i in range(9)}))
    with pytest.raises(ValueError, match="vocabulary"):
        engine.check_request([1, 2], SamplingParams(logit_bias={320: 1.0}))
