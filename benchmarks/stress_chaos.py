"""Chaos for benchmarks/stress.py --chaos: a scheduler paused and resumed under load, attack bodies, canaries.

A paused scheduler (SIGSTOP) is what a hung device or a stalled host looks like from outside: in-flight
requests must be held and finish after SIGCONT, new ones refused with a clean 503, nothing lost or leaked.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import time
from dataclasses import dataclass
from typing import Any

import httpx

SCHEDULER_PROCESS_NAME = "minisgl-schedul"  # the launcher's prctl name, cut to 15 bytes by the kernel
CANARY_PROMPTS = ("The capital of France is", "Once upon a time", "def fibonacci(n):", "1, 2, 3, 4,")
CANARY_MAX_TOKENS = 16


def find_scheduler_pid() -> int:
    """The one minisgl-jax scheduler process on this host; an error when there is none or several."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/comm") as f:
                if f.read().strip() == SCHEDULER_PROCESS_NAME:
                    found.append(int(entry))
        except OSError:
            continue
    if len(found) != 1:
        raise SystemExit(f"--chaos needs the server's scheduler process: found {len(found)} processes named "
                         f"{SCHEDULER_PROCESS_NAME!r} on this host; pass --scheduler-pid")
    return found[0]


def attack_requests(model: str) -> list[tuple[str, bytes]]:
    """(path, raw body) pairs an attacker sends: each must get a 4xx, never a 5xx or a dead worker."""
    hi = [{"role": "user", "content": "hi"}]

    def chat(**fields: Any) -> bytes:
        return json.dumps({"model": model, "messages": hi, **fields}).encode()

    def completion(**fields: Any) -> bytes:
        return json.dumps({"model": model, "prompt": "hi", **fields}).encode()

    chat_path, completions_path = "/v1/chat/completions", "/v1/completions"
    nested = b"[" * 100_000 + b"1" + b"]" * 100_000
    return [
        (completions_path, completion(top_k=2**63)),
        (completions_path, completion(max_tokens=2**63)),
        (completions_path, completion(seed=2**64)),
        (completions_path, completion(n=2**31)),
        (completions_path, completion(stop_token_ids=[2**63])),
        (completions_path, completion(prompt=[2**64, 1, 2])),
        (completions_path, completion(prompt=[-1])),
        (completions_path, b'{"model": "%s", "prompt": %s}' % (model.encode(), nested)),
        (completions_path, b'{"model": "%s", "prompt": "hi", "temperature": NaN}' % model.encode()),
        (completions_path, b'{"model": "%s", "prompt": "hi", "top_p": Infinity}' % model.encode()),
        (completions_path, b'{"model": "%s", "prompt": "hi", "timeout": -Infinity}' % model.encode()),
        (completions_path, b'{"model": "%s", "prompt": "\\ud800 hi"}' % model.encode()),
        (chat_path, b'{"model": "%s", "messages": [{"role": "user", "content": "\\udfff"}]}' % model.encode()),
        (chat_path, chat(temperature=1e39)),
        (chat_path, chat(logprobs=True, top_logprobs=2**40)),
        (chat_path, json.dumps({"model": "\u0000" + "m" * 100_000, "messages": hi}).encode()),
        ("/generate", json.dumps({"input_ids": [2**63], "sampling_params": {"max_new_tokens": 2}}).encode()),
        ("/generate", json.dumps({"text": "hi", "sampling_params": {"top_k": -(2**63)}}).encode()),
    ]


@dataclass
class Pauses:
    """What the pause loop did: how often and how long the scheduler was stopped."""

    count: int = 0
    seconds: float = 0.0
    scheduler_gone: bool = False


async def pause_scheduler(pid: int, deadline: float, every_s: float, max_pause_s: float, seed: int) -> Pauses:
    """Until `deadline`: wait about `every_s`, SIGSTOP the scheduler for up to `max_pause_s`, SIGCONT it.
    The process is always resumed, whatever ends the loop; a scheduler that has died ends it early."""
    rng = random.Random(f"{seed}/chaos")
    pauses = Pauses()
    try:
        while True:
            await asyncio.sleep(rng.uniform(0.5, 1.5) * every_s)
            pause = rng.uniform(0.2, max_pause_s)
            if time.monotonic() + pause > deadline:
                return pauses
            os.kill(pid, signal.SIGSTOP)
            try:
                await asyncio.sleep(pause)
            finally:
                os.kill(pid, signal.SIGCONT)
            pauses.count += 1
            pauses.seconds += pause
    except ProcessLookupError:
        pauses.scheduler_gone = True
        return pauses


async def canary_texts(client: httpx.AsyncClient, base_url: str, model: str,
                       headers: dict[str, str]) -> list[str] | None:
    """Greedy outputs of fixed prompts, one at a time from an emptied prefix cache, so a run before and
    a run after a stress run compute exactly the same thing: they must match. None if the server fails."""
    url = base_url.rstrip("/")
    texts = []
    try:
        (await client.post(url + "/flush_cache", headers=headers)).raise_for_status()
        for prompt in CANARY_PROMPTS:
            body = {"model": model, "prompt": prompt, "max_tokens": CANARY_MAX_TOKENS, "temperature": 0,
                    "ignore_eos": True}
            response = await client.post(url + "/v1/completions", json=body, headers=headers)
            response.raise_for_status()
            texts.append(response.json()["choices"][0]["text"])
    except httpx.HTTPError:
        return None
    return texts
