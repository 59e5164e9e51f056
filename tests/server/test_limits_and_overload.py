"""Limits, admission control and timeouts: every breach is refused with a status and a named field."""

import asyncio
import json

import httpx
import pytest
from server_process import ServerProcess
from test_errors_and_aborts import wait_idle

pytestmark = pytest.mark.slow  # a server of its own

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
LIMIT_FLAGS = ["--max-queued-requests", "2", "--max-n", "2", "--max-stop", "2", "--max-messages", "3",
               "--max-logprobs", "2", "--max-tokens-limit", "460", "--request-timeout", "120"]


@pytest.fixture(scope="module")
def limited(tiny_model_dir, compile_cache, tmp_path_factory):
    log = str(tmp_path_factory.mktemp("logs") / "limited.log")
    proc = ServerProcess(tiny_model_dir, log, *LIMIT_FLAGS, compile_cache=compile_cache)
    proc.wait_ready()
    yield proc
    assert proc.stop() == 0, proc.logs()


def user(text: str) -> dict:
    return {"role": "user", "content": text}


@pytest.mark.parametrize("path,body,param,words", [
    (COMPLETIONS, {"prompt": "a", "n": 3}, "n", "at most 2"),
    (COMPLETIONS, {"prompt": ["a", "b"], "n": 2}, "n", "4 completions"),
    (COMPLETIONS, {"prompt": "a", "max_tokens": 461}, "max_tokens", "at most 460"),
    (CHAT, {"messages": [user("a")], "max_completion_tokens": 470}, "max_completion_tokens", "at most 460"),
    ("/generate", {"text": "a", "sampling_params": {"max_new_tokens": 461}}, "sampling_params.max_new_tokens",
     "at most 460"),
    (COMPLETIONS, {"prompt": "a", "stop": ["x", "y", "z"]}, "stop", "3 stop strings"),
    (COMPLETIONS, {"prompt": "a", "stop_token_ids": [1, 2, 3]}, "stop_token_ids", "at most 2"),
    (CHAT, {"messages": [user("a"), {"role": "assistant", "content": "b"}, user("c"), user("d")]}, "messages",
     "4 messages"),
    (CHAT, {"messages": [user("a")], "logprobs": True, "top_logprobs": 3}, "top_logprobs", "at most 2"),
    (COMPLETIONS, {"prompt": "a", "logprobs": 3}, "logprobs", "at most 2"),
    (COMPLETIONS, {"prompt": "a", "timeout": 0}, "timeout", "greater than 0"),
])
def test_each_limit_is_a_400_naming_the_field(limited, path, body, param, words):
    response = httpx.post(limited.url + path, json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"], error


def test_a_full_queue_answers_503_with_retry_after_and_loses_no_accepted_request(limited):
    """4 running + 2 queued fit; of 12 sent at once, the rest are refused and every accepted one completes."""
    body = {"prompt": "queue", "max_tokens": 60, "ignore_eos": True, "temperature": 0}

    async def send_all() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(client.post(limited.url + COMPLETIONS, json=body) for _ in range(12)))

    responses = asyncio.run(send_all())
    accepted = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code == 503]
    assert len(accepted) + len(refused) == 12, [r.status_code for r in responses]
    assert 1 <= len(accepted) <= 6 and refused
    assert all(r.headers["retry-after"] == "1" and r.json()["error"]["type"] == "overloaded" for r in refused)
    texts = {r.json()["choices"][0]["text"] for r in accepted}
    assert len(texts) == 1  # greedy: every accepted request got the same full answer
    assert all(r.json()["usage"]["completion_tokens"] == 60 for r in accepted)
    assert limited.metric('minisgl_request_errors_total{status="503"}') == len(refused)
    wait_idle(limited)


def test_a_request_past_its_timeout_is_aborted_with_504(limited):
    body = {"prompt": "slow", "max_tokens": 450, "ignore_eos": True, "temperature": 0, "timeout": 0.1}
    response = httpx.post(limited.url + COMPLETIONS, json=body, timeout=60)
    assert response.status_code == 504, response.text
    assert response.json()["error"]["param"] == "timeout"
    assert limited.metric('minisgl_request_errors_total{status="504"}') >= 1
    wait_idle(limited)


def test_a_stream_past_its_timeout_ends_with_an_error_event(limited):
    """A deadline that passes mid-stream ends the stream with an error event, then [DONE].

    A deadline that passes before the first token is a plain 504 instead (the test above). On a loaded
    machine the first tokens can take longer than a short timeout, so the timeout grows until tokens
    were streamed before it passed."""
    for timeout in (0.15, 0.4, 1.0, 2.0):
        body = {"prompt": "slow", "max_tokens": 450, "ignore_eos": True, "temperature": 0, "timeout": timeout,
                "stream": True}
        with httpx.stream("POST", limited.url + COMPLETIONS, json=body, timeout=60) as response:
            status = response.status_code
            lines = [line for line in response.iter_lines() if line.startswith("data: ")]
        wait_idle(limited)
        if status == 200 and len(lines) > 3:  # at least two token events, then the error and [DONE]
            break
    assert status == 200 and len(lines) > 3, (status, lines)
    assert lines[-1] == "data: [DONE]"
    error = json.loads(lines[-2][6:])["error"]
    assert error["code"] == 504 and error["param"] == "timeout"


def test_flags_out_of_range_are_refused_at_launch():
    from minisgl_jax.server.cli import parse_args

    for flags in (["--max-queued-requests", "0"], ["--max-logprobs", "21"], ["--request-timeout", "-1"]):
        with pytest.raises(SystemExit):
            parse_args(["--model", "x", *flags])
