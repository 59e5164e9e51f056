"""Structured outputs through the engine: a random-weight model's text, masked in the step by its
grammar, always parses and validates, in mixed batches (free, greedy, penalized, constrained), with
a grammar that fails, an abort while compiling, max_tokens inside the JSON and tp=2."""

import json
import re

import jsonschema
import pytest

from minisgl_jax.core import FinishReason, SamplingParams
from minisgl_jax.grammar import CompilerConfig, GrammarCompiler, GrammarVocab
from tiny_models import save_tiny_checkpoint, tiny_engine

pytestmark = pytest.mark.slow  # engines of its own

SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 1, "maxItems": 3},
    {"type": "object", "properties": {"ok": {"type": "boolean"}, "tags": {"type": "array", "maxItems": 2,
                                      "items": {"type": "string", "pattern": "^[a-z]{1,4}$"}}},
     "required": ["ok", "tags"], "additionalProperties": False},
    {"anyOf": [{"type": "integer", "minimum": -5, "maximum": 5}, {"type": "null"}]},
]
REGEX = r"(yes|no)-[0-9]{2}"
# A loaded 2-core machine can take seconds for a first compilation: a limit no test should meet.
ENGINE = dict(cache="radix", num_pages=192, page_size=16, max_running_requests=8, max_prefill_tokens=64,
              grammar_timeout_s=300.0)
EBNF = 'root ::= "<" item ("," item)? ">"\nitem ::= [a-c] [0-9]'


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "qwen3"), "qwen3", seed=2)


@pytest.fixture(scope="module")
def engine(checkpoint):
    return tiny_engine(checkpoint, **ENGINE)


def constrained_params() -> list[SamplingParams]:
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=80, json_schema=json.dumps(s))
              for i, s in enumerate(SCHEMAS)]
    params.append(SamplingParams(temperature=1.0, seed=7, max_tokens=20, regex=REGEX, frequency_penalty=0.5))
    params.append(SamplingParams(temperature=0.0, max_tokens=20, ebnf=EBNF))
    return params


def check(text: str, params: SamplingParams) -> None:
    if params.json_schema is not None:
        jsonschema.validate(json.loads(text), json.loads(params.json_schema))
    elif params.regex is not None:
        assert re.fullmatch(params.regex, text), text
    else:
        assert re.fullmatch(r"<[a-c][0-9](,[a-c][0-9])?>", text), text


def test_every_output_follows_its_grammar_alone_and_in_a_mixed_batch(engine):
    params = constrained_params()
    prompts = [[5, 6, 7, 8 + i] for i in range(len(params))]
    alone = [engine.generate([prompt], p)[0] for prompt, p in zip(prompts, params)]
    for ids, p in zip(alone, params):
        check(engine.tokenizer.decode(ids), p)
    free = [SamplingParams(temperature=1.0, seed=3, max_tokens=12, ignore_eos=True),
            SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True, repetition_penalty=1.2)]
    mixed = engine.generate(prompts + [[9, 9], [10, 11]], params + free)
    assert mixed[: len(params)] == alone  # same seeds, same tokens, whatever shares the batch
    assert [len(ids) for ids in mixed[len(params):]] == [12, 9]
    engine.check_kv_invariant()


def test_a_bad_grammar_is_refused_and_a_running_one_can_end_or_be_aborted(engine):
    with pytest.raises(ValueError, match="^json_schema"):
        engine.check_request([1, 2], SamplingParams(json_schema="{not json"))
    with pytest.raises(ValueError, match="^regex"):
        engine.check_request([1, 2], SamplingParams(regex="(unclosed"))
    # max_tokens inside the object: "length", the partial text
    engine.add_request("short", [5, 6], SamplingParams(temperature=1.0, seed=1, max_tokens=3,
                                                        json_schema=json.dumps(SCHEMAS[0])))
    engine.add_request("gone", [5, 7], SamplingParams(temperature=1.0, seed=2, max_tokens=50, regex=REGEX))
    engine.abort_request("gone")  # still compiling, or queued
    finals = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
    assert finals["short"].finish_reason is FinishReason.LENGTH and finals["short"].completion_tokens == 3
    assert finals["gone"].finish_reason is FinishReason.ABORT
    engine.check_kv_invariant()


def test_tensor_parallel_gives_the_same_tokens(checkpoint, engine):
    params = constrained_params()[:3]
    prompts = [[5, 6, 7, 8 + i] for i in range(len(params))]
    tp2 = tiny_engine(checkpoint, **{**ENGINE, "tp": 2})
    assert tp2.generate(prompts, params) == engine.generate(prompts, params)


def test_retraction_and_chunked_prefill_keep_the_tokens(checkpoint, engine):
    """Constrained requests retracted and recomputed (their grammar stays where their output is),
    prompts prefilled in chunks: the tokens of the roomy engine."""
    params = constrained_params()
    prompts = [[5, 6, 7, 8 + i] * 6 for i in range(len(params))]
    small = tiny_engine(checkpoint, **{**ENGINE, "cache": "naive", "num_pages": 8, "max_prefill_tokens": 16})
    assert small.generate(prompts, params) == engine.generate(prompts, params)
    assert small.stats()["num_retractions"] > 0 and small.stats()["split_steps"] > 0
    small.check_kv_invariant()


def test_a_grammar_past_its_time_limit_ends_its_request_and_stalls_no_other(engine):
    """The grammar compiles off the engine's loop (GrammarCompiler.submit returns at once), so the
    free request is served; past the compiler's limit the constrained one ends with an error that
    names its field (the server answers it with a 400)."""
    engine.grammars.compiler = GrammarCompiler(GrammarVocab(engine.tokenizer, engine.model_config.vocab_size),
                                               CompilerConfig(timeout_s=0.05))
    engine.add_request("slow", [5, 6], SamplingParams(max_tokens=8, regex="(a{1000}){1000}"))
    engine.add_request("free", [5, 7], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    finished = {}
    while engine.has_unfinished():
        finished |= {out.request_id: out for out in engine.step() if out.finished}
    assert finished["free"].finish_reason is FinishReason.LENGTH and finished["free"].completion_tokens == 4
    slow = finished["slow"]
    assert slow.finish_reason is FinishReason.ERROR and slow.error_field == "regex" and "regex" in slow.error
    engine.grammars.compiler = None
    engine.check_kv_invariant()
