"""The OpenAI endpoints end to end, through the official `openai` client, against a real server."""

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def model(server, client) -> str:
    return client.models.list().data[0].id


def test_models_lists_the_served_model(client, tiny_model_dir):
    models = client.models.list()
    assert [m.id for m in models.data] == [tiny_model_dir]
    assert models.data[0].object == "model"


def test_chat_streamed_text_equals_whole_text_and_usage_adds_up(client, model):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    whole = client.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0)
    assert whole.object == "chat.completion" and whole.id.startswith("chatcmpl-")
    choice = whole.choices[0]
    assert choice.index == 0 and choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    assert 1 <= whole.usage.completion_tokens <= 12

    stream = client.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text == choice.message.content
    assert finishes == [choice.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_completion_n2_seed_reproducible_and_samples_differ(client, model):
    def run(seed):
        return client.completions.create(model=model, prompt="The quick brown", max_tokens=10, n=2, seed=seed,
                                         temperature=1.0, extra_body={"ignore_eos": True})

    first, again, other = run(7), run(7), run(8)
    assert [c.index for c in first.choices] == [0, 1]
    assert first.usage.completion_tokens == 20
    texts = [c.text for c in first.choices]
    assert texts == [c.text for c in again.choices]
    assert texts[0] != texts[1]  # the two samples use different seeds (seed, seed + 1)
    assert texts != [c.text for c in other.choices]


def test_completion_logprobs_one_entry_per_token(client, model):
    out = client.completions.create(model=model, prompt=[5, 6, 7, 8], max_tokens=6, logprobs=3, temperature=0,
                                    extra_body={"ignore_eos": True})
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == out.usage.completion_tokens == 6
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert chosen <= 0 and 1 <= len(top) <= 3  # keyed by token text: byte tokens may share one key


def test_penalties_bias_and_min_tokens_are_applied(client, model):
    """The sampling controls SDKs send are honoured, not refused: a +100 bias makes greedy text one token
    over and over, a frequency penalty breaks that run, and min_tokens holds back a biased stop token."""
    def tokens(**extra):
        out = client.completions.create(model=model, prompt=[5, 6, 7], max_tokens=8, temperature=0, logprobs=0,
                                        extra_body={"ignore_eos": True, **extra.pop("extra_body", {})}, **extra)
        return [t for t in out.choices[0].logprobs.tokens], out.choices[0].finish_reason

    biased, _ = tokens(logit_bias={"42": 100})
    assert len(set(biased)) == 1
    penalized, _ = tokens(logit_bias={"42": 4}, frequency_penalty=2.0, presence_penalty=0.5)
    assert len(set(penalized)) > 1
    held, reason = tokens(logit_bias={"9": 100}, extra_body={"min_tokens": 5, "stop_token_ids": [9], "ignore_eos": True})
    assert len(held) == 6 and reason == "stop"
    chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                          temperature=0.7, seed=3, frequency_penalty=1.0, presence_penalty=1.0,
                                          extra_body={"repetition_penalty": 1.3, "min_tokens": 4, "ignore_eos": True})
    assert chat.usage.completion_tokens == 4


def test_completion_echo_returns_the_prompt_and_its_logprobs(client, model):
    """echo puts the prompt before the completion, streamed or whole; with logprobs each prompt token has
    one (the first: none), from the prefill."""
    whole = client.completions.create(model=model, prompt="The quick brown", max_tokens=5, temperature=0, echo=True,
                                      logprobs=2, extra_body={"ignore_eos": True})
    plain = client.completions.create(model=model, prompt="The quick brown", max_tokens=5, temperature=0,
                                      logprobs=2, extra_body={"ignore_eos": True})
    choice = whole.choices[0]
    assert choice.text == "The quick brown" + plain.choices[0].text
    lp = choice.logprobs
    prompt_tokens = whole.usage.prompt_tokens
    assert len(lp.tokens) == prompt_tokens + 5 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(x <= 0 for x in lp.token_logprobs[1:]) and all(len(t) <= 2 for t in lp.top_logprobs[1:])
    assert lp.token_logprobs[prompt_tokens:] == plain.choices[0].logprobs.token_logprobs
    assert "".join(lp.tokens) == choice.text and lp.text_offset[prompt_tokens] == len("The quick brown")
    stream = client.completions.create(model=model, prompt="The quick brown", max_tokens=5, temperature=0, echo=True,
                                       stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in stream) == choice.text


def test_chat_logprobs_top_logprobs(client, model):
    out = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}], max_tokens=4,
                                         temperature=0, logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    content = out.choices[0].logprobs.content
    assert len(content) == 4
    for e in content:
        assert len(e.top_logprobs) == 2 and e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob
        assert abs(e.top_logprobs[0].logprob - e.logprob) < 1e-4  # greedy: the chosen token is the most likely


def test_stop_token_ids_end_the_output_at_that_token(server):
    import httpx

    body = {"input_ids": [10, 20, 30], "sampling_params": {"max_new_tokens": 16, "temperature": 0, "ignore_eos": True}}
    ids = httpx.post(server.url + "/generate", json=body).json()["output_ids"]
    assert len(ids) == 16
    stop_id = ids[5]
    body["sampling_params"]["stop_token_ids"] = [stop_id]
    out = httpx.post(server.url + "/generate", json=body).json()
    assert out["output_ids"] == ids[: ids.index(stop_id) + 1]
    assert out["meta_info"]["finish_reason"] == "stop"


def test_stop_string_cuts_text_before_it(client, model):
    prompt = "Once upon a time"
    full = client.completions.create(model=model, prompt=prompt, max_tokens=40, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    clean = [i for i in range(4, len(full) - 2) if "\ufffd" not in full[i : i + 2] and full[i : i + 2].strip()]
    assert clean, f"the tiny model's greedy text has no usable stop string: {full!r}"
    stop = full[clean[0] : clean[0] + 2]
    expected = full[: full.index(stop)]
    for stream in (False, True):
        out = client.completions.create(model=model, prompt=prompt, max_tokens=40, temperature=0, stop=[stop],
                                        stream=stream, extra_body={"ignore_eos": True})
        chunks = list(out) if stream else [out]
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        assert text == expected
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_tokenize_detokenize_round_trip(server):
    import httpx

    tokens = httpx.post(server.url + "/tokenize", json={"prompt": "héllo"}).json()
    assert tokens["count"] == len(tokens["tokens"]) > 0 and tokens["max_model_len"] == 512
    text = httpx.post(server.url + "/detokenize", json={"tokens": tokens["tokens"]}).json()["prompt"]
    assert text == "héllo"


def test_metrics_parse_as_prometheus_text(server, client, model):
    client.completions.create(model=model, prompt="metrics", max_tokens=3, extra_body={"ignore_eos": True})
    import httpx

    families = {f.name: f for f in text_string_to_metric_families(httpx.get(server.url + "/metrics").text)}
    for name in ("minisgl_requests", "minisgl_generation_tokens", "minisgl_time_to_first_token_seconds",
                 "minisgl_inter_token_latency_seconds", "minisgl_num_waiting_requests", "minisgl_kv_cache_usage",
                 "minisgl_prefix_cache_hit_rate"):
        assert name in families, name
    generated = [s.value for s in families["minisgl_generation_tokens"].samples if s.name.endswith("_total")]
    assert generated[0] >= 3
