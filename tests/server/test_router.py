"""Data-parallel replicas behind sglang-router (`--replicas`): the bodies the router forwards, the
worker contract it reads, prefix affinity, answers equal to a direct call, a replica's death and
restart up to --max-restarts, and a stop that leaves no process behind."""

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from server_process import ServerProcess, child_pids, free_port, is_running

from minisgl_jax.server.replicas import gpu_groups

# The bodies sglang-router 0.3.2 forwards for a client's chat (no model named), completion and
# /generate: it renames max_tokens and adds SGLang's neutral fields.
ROUTER_CHAT = {"messages": [{"role": "user", "content": "hello"}], "model": "unknown", "logprobs": False,
               "max_completion_tokens": 5, "stream": False, "temperature": 0.0, "no_stop_trim": False,
               "ignore_eos": False, "continue_final_message": False, "skip_special_tokens": True,
               "separate_reasoning": True, "stream_reasoning": True, "return_hidden_states": False}
ROUTER_COMPLETION = {"prompt": "hello", "max_tokens": 5, "temperature": 0.0, "stream": False, "echo": False,
                     "no_stop_trim": False, "ignore_eos": False, "skip_special_tokens": True,
                     "return_hidden_states": False}
ROUTER_GENERATE = {"text": "hello", "model": None, "sampling_params": {"max_new_tokens": 5, "temperature": 0.0},
                   "return_text_in_logprobs": False, "stream": False, "log_metrics": True,
                   "return_hidden_states": False, "background": False, "no_logs": False, "return_bytes": False,
                   "return_entropy": False}
PREFIX_A = "You are a patient tutor of geometry. Answer with one short sentence and then a proof sketch. " * 2
PREFIX_B = "Translate every message into formal French, keeping names and numbers exactly as given. " * 2


def test_the_bodies_the_router_forwards_are_accepted(server, tiny_model_dir):
    for path, body in (("/v1/chat/completions", ROUTER_CHAT), ("/generate", ROUTER_GENERATE),
                       ("/v1/completions", dict(ROUTER_COMPLETION, model=tiny_model_dir))):
        for stream in (False, True):
            response = httpx.post(server.url + path, json=dict(body, stream=stream), timeout=60)
            assert response.status_code == 200, (path, stream, response.text)
    refused = (("/v1/chat/completions", ROUTER_CHAT, "continue_final_message", True),
               ("/v1/chat/completions", ROUTER_CHAT, "no_stop_trim", True),
               ("/generate", ROUTER_GENERATE, "log_metrics", False),
               ("/generate", ROUTER_GENERATE, "return_hidden_states", True))
    for path, body, name, value in refused:
        response = httpx.post(server.url + path, json={**body, name: value})
        assert response.status_code == 400 and response.json()["error"]["param"] == name, response.text


def test_each_replica_gets_its_slice_of_the_gpus(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    assert gpu_groups(2, 2) == ["4,5", "6,7"]
    assert gpu_groups(3, 1) == ["4", "5", "6"]
    with pytest.raises(ValueError, match="needs 6 GPUs; CUDA_VISIBLE_DEVICES=4,5,6,7 has 4"):
        gpu_groups(3, 2)


# ---- a launch of two replicas and the router -------------------------------------------------------


def router_flags() -> list[str]:
    """Health checks every second, so that a death and a return show within seconds; load balancing from
    an imbalance of 4 requests in flight (64 by default), so that a few concurrent requests show it."""
    return [f"--router-args=--prometheus-port {free_port()} --health-check-interval-secs 1 "
            "--health-failure-threshold 1 --health-success-threshold 1 --balance-abs-threshold 4"]


def launch(model_dir: str, log: str, compile_cache: str) -> ServerProcess:
    return ServerProcess(model_dir, log, "--replicas", "2", "--served-model-name", "tiny", "--max-restarts", "1",
                         *router_flags(), compile_cache=compile_cache)


def replica_urls(proc: ServerProcess) -> list[str]:
    return [f"http://127.0.0.1:{proc.port + 1 + i}" for i in range(2)]


def replica_pid(proc: ServerProcess, index: int) -> int:
    """The pid of replica `index` (its command line ends with its --port)."""
    port = str(proc.port + 1 + index)
    for pid in child_pids(proc.proc.pid):
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = f.read().split(b"\0")  # empty while a process exits or is a zombie
        if len(args) > 1 and args[-2] == port.encode() and is_running(pid):
            return pid
    raise LookupError(f"no replica {index} under {proc.proc.pid}")


def descendants(pid: int) -> list[int]:
    return [p for child in child_pids(pid) for p in (child, *descendants(child))]


def healthy_workers(proc: ServerProcess) -> set[str]:
    workers = httpx.get(proc.url + "/workers", timeout=5).json()["workers"]
    return {w["url"] for w in workers if w["is_healthy"]}


def wait_until(condition, timeout: float, what: str, proc: ServerProcess) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except httpx.TransportError:
            pass
        assert proc.proc.poll() is None, f"the launch exited with {proc.proc.returncode}:\n{proc.logs()}"
        time.sleep(0.2)
    raise TimeoutError(f"{what} within {timeout}s:\n{proc.logs()}")


def counter(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


def prompt_tokens(proc: ServerProcess) -> list[float]:
    return [counter(url, "minisgl_prompt_tokens_total") for url in replica_urls(proc)]


def cached_tokens(proc: ServerProcess) -> list[float]:
    return [counter(url, "minisgl_cached_prompt_tokens_total") for url in replica_urls(proc)]


def complete(url: str, prompt: str, **fields) -> httpx.Response:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 2, "temperature": 0, **fields}
    return httpx.post(url + "/v1/completions", json=body, timeout=60)


@pytest.fixture(scope="module")
def replicas(tiny_model_dir, compile_cache, tmp_path_factory):
    proc = launch(tiny_model_dir, str(tmp_path_factory.mktemp("logs") / "replicas.log"), compile_cache)
    wait_until(lambda: healthy_workers(proc) == set(replica_urls(proc)), 180, "both replicas not in the router",
               proc)
    yield proc
    proc.stop()


@pytest.mark.slow
def test_the_router_reads_the_worker_contract(replicas):
    for url in replica_urls(replicas):
        info = httpx.get(url + "/server_info").json()
        assert info == httpx.get(url + "/get_server_info").json()
        assert (info["served_model_name"], info["tp_size"], info["dp_size"]) == ("tiny", 1, 1)
        model = httpx.get(url + "/model_info").json()
        assert model == httpx.get(url + "/get_model_info").json()
        assert model["is_generation"] and model["model_type"] == "qwen3"
        (load,) = httpx.get(url + "/get_load").json()
        assert load["num_reqs"] == load["num_waiting_reqs"] == load["num_tokens"] == 0
    workers = httpx.get(replicas.url + "/workers").json()["workers"]
    assert {w["model_id"] for w in workers} == {"tiny"}
    assert [m["id"] for m in httpx.get(replicas.url + "/v1/models").json()["data"]] == ["tiny"]


@pytest.mark.slow
def test_requests_sharing_a_long_prefix_land_on_one_replica_and_hit_its_cache(replicas):
    for prefix in (PREFIX_A, PREFIX_B):
        before_prompt, before_cached = prompt_tokens(replicas), cached_tokens(replicas)
        for i in range(3):
            assert complete(replicas.url, f"{prefix}Question {i}: why?").status_code == 200
        served = [after > before for after, before in zip(prompt_tokens(replicas), before_prompt)]
        assert served.count(True) == 1, f"the requests of one prefix went to {served}"
        hits = cached_tokens(replicas)[served.index(True)] - before_cached[served.index(True)]
        assert hits >= 2 * 128, f"the 2nd and 3rd requests should reuse the prefix's pages, cached {hits}"


@pytest.mark.slow
def test_through_the_router_equals_a_direct_call(replicas):
    via, direct = (openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
                   for url in (replicas.url, replica_urls(replicas)[0]))
    messages = [{"role": "user", "content": "Name three prime numbers."}]
    chats = [c.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
             for c in (via, direct)]
    assert chats[0].choices[0].message.content == chats[1].choices[0].message.content
    assert chats[0].usage.completion_tokens == chats[1].usage.completion_tokens
    streamed = ["".join(c.choices[0].delta.content or "" for c in chunks if c.choices) for chunks in (
        via.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0, stream=True),
        direct.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0, stream=True))]
    assert streamed == [chats[1].choices[0].message.content] * 2
    texts = [c.completions.create(model="tiny", prompt="Once upon a time", max_tokens=12, temperature=0)
             .choices[0].text for c in (via, direct)]
    streamed = ["".join(c.choices[0].text for c in chunks if c.choices) for chunks in (
        via.completions.create(model="tiny", prompt="Once upon a time", max_tokens=12, temperature=0, stream=True),
        direct.completions.create(model="tiny", prompt="Once upon a time", max_tokens=12, temperature=0,
                                  stream=True))]
    assert texts[0] == texts[1] == streamed[0] == streamed[1]


@pytest.mark.slow
def test_a_killed_replica_is_left_out_then_restarted_and_rejoins(replicas):
    first, second = replica_urls(replicas)
    os.kill(replica_pid(replicas, 0), signal.SIGKILL)
    wait_until(lambda: first not in healthy_workers(replicas), 30, "the router did not leave out the dead replica",
               replicas)
    before = counter(second, "minisgl_prompt_tokens_total")
    for i in range(4):
        response = complete(replicas.url, f"{PREFIX_A}Question {i} again: why?")
        assert response.status_code == 200, response.text
    # /metrics' token counters come with the scheduler's heartbeat (every 0.5 s): allow it to arrive
    wait_until(lambda: counter(second, "minisgl_prompt_tokens_total") > before, 10,
               "the surviving replica served nothing", replicas)
    # The launcher sees the death once the killed process is reaped: allow a loaded machine its exit
    wait_until(lambda: "replica 0 (http://127.0.0.1" in replicas.logs() and "restarting it (restart 1 of 1)"
               in replicas.logs(), 30, "the launcher did not report the death", replicas)

    wait_until(lambda: healthy_workers(replicas) == {first, second}, 120, "the restarted replica did not rejoin",
               replicas)
    # Requests one after another go by cache affinity, and new prefixes with equal loads stay where they
    # went before (sglang-router 0.3.2); concurrent ones are balanced by load, onto the restarted replica too.
    with ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(lambda i: complete(replicas.url, f"A new subject, number {i}. " * 12).status_code,
                              range(16)))
    assert codes == [200] * 16
    wait_until(lambda: counter(first, "minisgl_prompt_tokens_total") > 0, 10,
               "the router sent nothing to the restarted replica", replicas)


@pytest.mark.slow
def test_past_max_restarts_the_launch_exits_1_and_leaves_no_process(replicas):
    processes = descendants(replicas.proc.pid)
    os.kill(replica_pid(replicas, 0), signal.SIGKILL)
    assert replicas.proc.wait(30) == 1
    assert "has been restarted 1 times (--max-restarts); stopping" in replicas.logs()
    assert not [p for p in processes if is_running(p)]


@pytest.mark.slow
def test_sigterm_stops_the_router_and_every_replica(tiny_model_dir, compile_cache, tmp_path):
    proc = launch(tiny_model_dir, str(tmp_path / "stopped.log"), compile_cache)
    wait_until(lambda: all(httpx.get(u + "/health/live").status_code == 200 for u in replica_urls(proc))
               and httpx.get(proc.url + "/liveness").status_code == 200, 60, "the launch did not come up", proc)
    processes = descendants(proc.proc.pid)
    assert len(processes) >= 2 * 4 + 1  # each replica's API process and its 3 workers, and the router
    assert proc.stop(timeout=30) == 0, proc.logs()
    assert not [p for p in processes if is_running(p)]
