"""SamplingParams.validate refuses, naming the field, every value the engine's arrays cannot hold."""

import math

import pytest

from minisgl_jax.core import INT32_MAX, MAX_LOGPROBS, SamplingParams


@pytest.mark.parametrize("field,value", [
    ("temperature", math.nan), ("temperature", math.inf), ("temperature", -1e-9), ("temperature", 100.5),
    ("top_p", math.nan), ("top_p", 0.0), ("top_p", math.inf),
    ("min_p", math.nan), ("min_p", -math.inf), ("min_p", 1.5),
    ("top_k", 0), ("top_k", -2), ("top_k", INT32_MAX + 1), ("top_k", 2**63), ("top_k", -(2**63)),
    ("max_tokens", 0), ("max_tokens", INT32_MAX + 1), ("max_tokens", 2**64),
    ("logprobs", -1), ("logprobs", MAX_LOGPROBS + 1), ("logprobs", 2**63),
    ("seed", -1), ("seed", 2**63), ("seed", 2**64),
    ("stop_token_ids", [5, -1]), ("stop_token_ids", [INT32_MAX + 1]), ("stop_token_ids", [2**64]),
    ("stop", [""]), ("stop", [7]),
    ("presence_penalty", math.nan), ("presence_penalty", 2.01), ("frequency_penalty", -math.inf),
    ("frequency_penalty", -2.5), ("repetition_penalty", 0.0), ("repetition_penalty", math.nan),
    ("repetition_penalty", 100.5), ("logit_bias", {5: math.nan}), ("logit_bias", {5: 100.01}),
    ("logit_bias", {-1: 1.0}), ("logit_bias", {INT32_MAX + 1: 1.0}), ("logit_bias", {"5": 1.0}),
    ("logit_bias", {5: "1"}), ("min_tokens", -1), ("min_tokens", INT32_MAX + 1), ("min_tokens", 17),
    ("prompt_logprobs", -1), ("prompt_logprobs", MAX_LOGPROBS + 1),
])
def test_each_field_out_of_range_is_a_value_error_naming_it(field, value):
    with pytest.raises(ValueError, match=f"^{field} "):
        SamplingParams(**{field: value}).validate()


@pytest.mark.parametrize("field,value", [
    ("temperature", 0.0), ("temperature", 100.0), ("top_p", 1e-300), ("min_p", 1.0), ("top_k", -1),
    ("top_k", INT32_MAX), ("max_tokens", INT32_MAX), ("seed", 0), ("seed", 2**63 - 1),
    ("stop_token_ids", [0, INT32_MAX]), ("logprobs", MAX_LOGPROBS), ("presence_penalty", -2.0),
    ("frequency_penalty", 2.0), ("repetition_penalty", 1e-30), ("repetition_penalty", 100.0),
    ("logit_bias", {0: -100.0, INT32_MAX: 100}), ("min_tokens", 16), ("prompt_logprobs", 0),
])
def test_the_limits_themselves_are_valid(field, value):
    SamplingParams(**{field: value}).validate()


def test_a_temperature_too_small_for_float32_logits_is_greedy():
    """logits / 1e-30 overflow float32 to inf; below 1e-5 sampling is greedy, as in vLLM."""
    assert SamplingParams(temperature=1e-30).greedy and SamplingParams(temperature=0.0).greedy
    assert not SamplingParams(temperature=1e-5).greedy


def test_logit_bias_arrives_from_the_workers_as_pairs():
    """msgpack maps carry string keys only: the server sends [[id, bias], ...], read back as a dict."""
    assert SamplingParams(logit_bias=[[5, 1.5], [7, -2]]).logit_bias == {5: 1.5, 7: -2.0}


def test_processes_logits_only_when_a_control_is_on():
    assert not SamplingParams().processes_logits
    assert not SamplingParams(logit_bias={}).processes_logits
    for on in (dict(presence_penalty=0.1), dict(frequency_penalty=-0.1), dict(repetition_penalty=1.01),
               dict(logit_bias={3: 0.0}), dict(min_tokens=1)):
        assert SamplingParams(**on).processes_logits
