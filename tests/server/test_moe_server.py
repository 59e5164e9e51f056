"""A mixture of experts behind the server: a tiny random Qwen3-MoE (a dense layer mixed in), its experts
expert-parallel over two host devices, answers chat, streams, reuses cached prefixes, samples with
seeds and logprobs, and keeps structured outputs valid, as the dense model does in the other tests."""

import json

import httpx
import pytest
from server_process import ServerProcess
from test_errors_and_aborts import wait_idle
from tiny_models import save_tiny_checkpoint

pytestmark = pytest.mark.slow  # a server of its own

CHAT = "/v1/chat/completions"
HI = [{"role": "user", "content": "hi there, experts"}]


@pytest.fixture(scope="module")
def moe_server(compile_cache, tmp_path_factory):
    model_dir = save_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny-qwen3-moe")), "qwen3_moe", seed=5)
    log = str(tmp_path_factory.mktemp("logs") / "moe.log")
    proc = ServerProcess(model_dir, log, "--tp", "2", "--moe-parallel", "ep", compile_cache=compile_cache)
    proc.wait_ready()
    yield proc
    assert proc.stop() == 0, proc.logs()


def chat(server: ServerProcess, **body) -> dict:
    response = httpx.post(server.url + CHAT, json={"messages": HI, "max_tokens": 12, **body}, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def test_greedy_chat_is_the_same_again_from_the_prefix_cache_and_streamed(moe_server):
    first = chat(moe_server, temperature=0, ignore_eos=True)
    again = chat(moe_server, temperature=0, ignore_eos=True)
    assert first["choices"][0]["message"]["content"] == again["choices"][0]["message"]["content"]
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    body = {"messages": HI, "max_tokens": 12, "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", moe_server.url + CHAT, json=body, timeout=120) as response:
        events = [json.loads(line[6:]) for line in response.iter_lines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
    streamed = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
    assert streamed == first["choices"][0]["message"]["content"]
    wait_idle(moe_server)


def test_seeded_sampling_with_logprobs_repeats_and_json_stays_valid(moe_server):
    params = dict(temperature=0.9, seed=3, logprobs=True, top_logprobs=2, n=2, ignore_eos=True)
    one, two = chat(moe_server, **params), chat(moe_server, **params)
    assert [c["message"]["content"] for c in one["choices"]] == [c["message"]["content"] for c in two["choices"]]
    assert all(len(t["top_logprobs"]) == 2 for c in one["choices"] for t in c["logprobs"]["content"])
    schema = {"type": "object", "properties": {"pick": {"enum": ["left", "right"]}}, "required": ["pick"],
              "additionalProperties": False}
    answer = chat(moe_server, max_tokens=40, response_format={"type": "json_schema", "json_schema": {
        "name": "choice", "schema": schema}})
    assert answer["choices"][0]["finish_reason"] == "stop"
    assert json.loads(answer["choices"][0]["message"]["content"])["pick"] in ("left", "right")
    wait_idle(moe_server)
