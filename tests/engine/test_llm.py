"""The offline API: text in and out, stop strings, streaming deltas, filters that reduce to greedy."""

import pytest

from minisgl_jax import LLM, FinishReason, SamplingParams
from tiny_models import save_tiny_checkpoint


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    path = save_tiny_checkpoint(str(tmp_path_factory.mktemp("m") / "llama"), "llama", seed=6)
    return LLM(path, dtype="float32", attention_backend="reference", cache="naive", num_pages=128,
               max_running_requests=4, max_prefill_tokens=64, compile_cache_dir=None, warmup=False)


def test_text_prompts_stop_strings_and_usage(llm):
    greedy = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    full = llm.generate(["Hello there", "abc"], greedy)
    assert [c.finish_reason for c in full] == [FinishReason.LENGTH] * 2
    assert full[0].usage["completion_tokens"] == 24
    text = full[0].text
    stop = text[5:8]
    stopped = llm.generate("Hello there", SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, stop=[stop]))
    assert stopped[0].finish_reason is FinishReason.STOP
    assert stopped[0].text == text[: text.index(stop)]
    # Decode bursts sample a few tokens past the stop: the completion ends at the token that completed it.
    ids = stopped[0].token_ids
    decode = llm.tokenizer.decode
    assert ids == full[0].token_ids[: len(ids)] and stop in decode(ids) and stop not in decode(ids[:-1])
    assert stopped[0].usage["completion_tokens"] == len(ids)
    llm.engine.check_kv_invariant()


def test_stream_deltas_add_up_to_the_text(llm):
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    want = llm.generate(["stream me", [1, 2, 3]], params)
    got = {0: "", 1: ""}
    for delta in llm.stream(["stream me", [1, 2, 3]], params):
        got[delta.index] += delta.text
    assert [got[0], got[1]] == [c.text for c in want]
    llm.engine.check_kv_invariant()


@pytest.mark.parametrize("filters", [dict(top_k=1), dict(min_p=1.0), dict(top_p=1e-6)])
def test_filters_that_keep_one_token_are_greedy(llm, filters):
    prompt = [[7, 8, 9, 10]]
    greedy = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    filtered = llm.generate(prompt, SamplingParams(temperature=1.5, max_tokens=12, ignore_eos=True, seed=1, **filters))
    assert filtered[0].token_ids == greedy[0].token_ids


def test_logprobs_are_consistent(llm):
    out = llm.generate([[4, 5, 6]], SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True, logprobs=3))[0]
    assert len(out.logprobs) == 5
    for lp in out.logprobs:
        assert len(lp.top) == 3 and lp.top[0][0] == lp.token_id  # greedy: the chosen token is the most likely
        assert lp.logprob == pytest.approx(lp.top[0][1]) and lp.logprob <= 0


def test_a_request_whose_step_fails_ends_with_error_and_the_engine_goes_on(llm, monkeypatch):
    """Offline too, a failed step ends its requests with finish_reason error and the reason; the next
    requests are served."""
    from minisgl_jax.engine import engine as engine_module

    build = engine_module.build_step_batch

    def failing(batch, *args):
        if any(row.req.params.seed == 13 for row in batch.rows):
            raise ValueError("injected")
        return build(batch, *args)

    monkeypatch.setattr(engine_module, "build_step_batch", failing)
    (bad,) = llm.generate(["doomed"], SamplingParams(max_tokens=4, seed=13))
    assert bad.finish_reason is FinishReason.ERROR and bad.error == "ValueError: injected" and not bad.token_ids
    (ok,) = llm.generate(["fine"], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    assert ok.finish_reason is FinishReason.LENGTH and len(ok.token_ids) == 4 and ok.error is None
    llm.engine.check_kv_invariant()
