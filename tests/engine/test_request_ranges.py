"""The Python API is as safe as HTTP: Engine.add_request refuses, naming the field, every value the
step's arrays or the model cannot take, before anything is queued; the extreme valid values fit."""

import math

import pytest

from minisgl_jax.core import INT32_MAX, SamplingParams
from minisgl_jax.engine.batch import BatchConstants, ScheduledBatch, ScheduledRow, build_step_batch
from minisgl_jax.engine.request import Req
from tiny_models import TINY_SIZES, save_tiny_checkpoint, tiny_engine

VOCAB = TINY_SIZES["vocab_size"]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """Built without warm-up: checking and queueing a request compiles nothing."""
    path = save_tiny_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "qwen3"), "qwen3")
    return tiny_engine(path, num_pages=64, page_size=16, max_running_requests=2, max_prefill_tokens=64)


@pytest.mark.parametrize("prompt,params,words", [
    ([1, VOCAB], SamplingParams(), f"prompt token ids must be in [0, {VOCAB})"),
    ([-1], SamplingParams(), "prompt token ids"),
    ([2**64], SamplingParams(), "prompt token ids"),
    ([1], SamplingParams(stop_token_ids=[VOCAB]), f"stop_token_ids must be in [0, {VOCAB})"),
    ([1], SamplingParams(stop_token_ids=[2**64]), "stop_token_ids"),
    ([1], SamplingParams(top_k=2**63), "top_k"),
    ([1], SamplingParams(temperature=math.nan), "temperature"),
    ([1], SamplingParams(top_p=math.inf), "top_p"),
    ([1], SamplingParams(seed=2**63), "seed"),
    ([1], SamplingParams(max_tokens=INT32_MAX + 1), "max_tokens"),
    ([1], SamplingParams(max_tokens=TINY_SIZES["max_position_embeddings"]), "max_tokens"),
])
def test_add_request_refuses_out_of_range_values_naming_the_field(engine, prompt, params, words):
    with pytest.raises(ValueError) as refused:
        engine.add_request("r", prompt, params)
    assert words in str(refused.value)
    assert "r" not in engine.requests and not engine.has_unfinished()


def test_extreme_valid_values_fill_the_step_arrays():
    """top_k past the vocabulary keeps every token; a temperature too small for float32 runs greedy."""
    params = SamplingParams(temperature=1e-30, top_k=INT32_MAX, top_p=1e-300, seed=2**63 - 1)
    req = Req("r", [1, 2, 3], params, params.seed, max_new_tokens=4, arrival=0, slot=1, pages=[1])
    row = ScheduledRow(req, start=0, num_tokens=3, samples=True, token_index=0)
    constants = BatchConstants(page_size=16, pages_per_seq=4, scratch_slot=0, vocab_size=VOCAB)
    step = build_step_batch(ScheduledBatch([row], is_decode=False), token_bucket=8, seq_bucket=2, constants=constants)
    sampling = step.sampling
    assert sampling.top_k[0] == INT32_MAX and sampling.temperature[0] == 0.0
    assert int(sampling.seed_hi[0]) << 32 | int(sampling.seed_lo[0]) == 2**63 - 1
