"""Reliability stress test against a running server: valid, cancelled, aborted, invalid and timed-out requests.

--clients loop over random actions for --duration seconds. Every answer is judged (a valid request must
complete, an invalid one must get an OpenAI-shaped 4xx, a hang-up or an abort must leave the server
clean); then the server must drain, stay healthy and account for every KV page. Exit status 0 only
when no request failed and every end check passed.

--chaos (a server on this host) adds what goes wrong in production: the scheduler process is paused
(SIGSTOP) and resumed at random, attack bodies (integers past int64, NaN/Infinity literals, lone
surrogates, deep nesting) join the invalid mix, and greedy canary outputs must be the same before and
after. The report counts accepted requests, lost ones (accepted, then no complete answer), leaked KV
pages and 5xx answers (a clean 503 refusal and a request's own 504 timeout aside).

    python benchmarks/stress.py --base-url http://127.0.0.1:1919 --duration 300 --clients 64 --out stress.json
    python benchmarks/stress.py --chaos --duration 360 --clients 256 --max-pause 20 --out chaos.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import sys
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from report import emit  # benchmarks/report.py: the script's folder is on sys.path
from serving import WORDS, first_model
from stress_chaos import Pauses, attack_requests, canary_texts, find_scheduler_pid, pause_scheduler
from stress_metrics import drain, idle, increase, increases, pages_balance, read_metrics

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
ABORT_GRACE_S = 30.0  # a stream must end this soon after /abort accepted its id
EXAMPLES_PER_KIND = 3
OUTCOMES = ("completed", "disconnected", "aborted", "timed_out", "overloaded_503", "unavailable_503",
            "invalid_4xx_ok")


@dataclass
class Outcome:
    """How one request ended: one of OUTCOMES, or "failed" with a kind and an example message."""

    status: str
    output_tokens: int = 0
    retry_after_s: float = 0.0
    failure: str = ""
    detail: str = ""
    accepted: bool = False  # a valid request the server answered 200: it owes a complete answer
    server_error: bool = False  # an HTTP 5xx that is not a clean refusal


def failed(kind: str, detail: str, *, server_error: bool = False) -> Outcome:
    return Outcome("failed", failure=kind, detail=detail[:600], server_error=server_error)


def accepted(outcome: Outcome) -> Outcome:
    outcome.accepted = True
    return outcome


@dataclass
class Call:
    """One valid generation request."""

    path: str
    body: dict[str, Any]

    @property
    def n(self) -> int:
        return self.body.get("n", 1)

    def describe(self) -> str:
        """The body with its prompt shortened: enough to reproduce a failure by hand."""
        shown = dict(self.body)
        for key in ("prompt", "messages"):
            if key in shown:
                shown[key] = f"<{len(json.dumps(shown[key]))} chars>"
        return f"POST {self.path} {json.dumps(shown)}"


@dataclass
class Context:
    args: argparse.Namespace
    client: httpx.AsyncClient
    headers: dict[str, str]
    invalid_bodies: list[tuple[str, bytes]]

    def url(self, path: str) -> str:
        return self.args.base_url.rstrip("/") + path


@dataclass
class Tally:
    """What all clients saw, shared: asyncio runs one client at a time between awaits, so no lock."""

    outcomes: Counter[str] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    output_tokens: int = 0
    accepted: int = 0
    lost: int = 0
    server_errors: int = 0

    def add(self, outcome: Outcome) -> None:
        self.outcomes[outcome.status] += 1
        self.output_tokens += outcome.output_tokens
        self.accepted += outcome.accepted
        self.lost += outcome.accepted and outcome.status == "failed"
        self.server_errors += outcome.server_error
        if outcome.status == "failed":
            self.failures[outcome.failure] += 1
            if len(self.examples[outcome.failure]) < EXAMPLES_PER_KIND:
                self.examples[outcome.failure].append(outcome.detail)


# ---- requests ------------------------------------------------------------------------------------

def valid_call(args: argparse.Namespace, rng: random.Random, stream: bool, timeout_s: float | None = None) -> Call:
    words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, args.max_prompt_words)))
    body: dict[str, Any] = {"model": args.model, "max_tokens": rng.randint(1, args.max_tokens), "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    if rng.random() < 0.2:
        body["n"] = 2
    if rng.random() < 0.2:
        body["stop"] = rng.sample(["e", "the", ".", "\n"], rng.randint(1, 2))
    if rng.random() < 0.3:
        body["temperature"] = 0
    if timeout_s is not None:
        body["timeout"] = timeout_s
    if rng.random() < 0.5:
        return Call(CHAT, {**body, "messages": [{"role": "user", "content": words}]})
    return Call(COMPLETIONS, {**body, "prompt": words})


def invalid_requests(model: str) -> list[tuple[str, bytes]]:
    """(path, body) pairs that every OpenAI-compatible server must refuse with a 4xx."""
    hi = [{"role": "user", "content": "hi"}]

    def chat(**fields: Any) -> tuple[str, bytes]:
        return CHAT, json.dumps({"model": model, "messages": hi, **fields}).encode()

    return [
        chat(max_tokens=-1),
        chat(temperature=5),
        chat(model="no-such-model"),
        chat(messages=[]),
        chat(frobnicate=1),
        (CHAT, b"{not json"),
        (COMPLETIONS, json.dumps({"model": model, "prompt": "hi", "max_tokens": -1}).encode()),
    ]


def error_body_ok(response: httpx.Response) -> bool:
    """An OpenAI-style error: {"error": {"message", "type", "param", "code"}} with a message."""
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return isinstance(error, dict) and {"message", "type", "param", "code"} <= error.keys() and bool(error["message"])


def overloaded(response: httpx.Response) -> Outcome | None:
    """Admission control's answer, 503 with Retry-After (seconds; a date counts as 1 s), is a clean one;
    so is a 503 with an error body while the server is not ready (its scheduler paused): nothing was
    accepted, the client retries."""
    if response.status_code != 503:
        return None
    retry_after = response.headers.get("retry-after")
    if retry_after is not None:
        return Outcome("overloaded_503", retry_after_s=float(retry_after) if retry_after.isdigit() else 1.0)
    return Outcome("unavailable_503", retry_after_s=0.5) if error_body_ok(response) else None


def refusal(response: httpx.Response, call: Call) -> Outcome:
    """A non-200 answer to a valid request: overload and our own timeout are clean, the rest failures."""
    if (outcome := overloaded(response)) is not None:
        return outcome
    if response.status_code == 504 and "timeout" in call.body and error_body_ok(response):
        return Outcome("timed_out")
    return failed(f"HTTP {response.status_code}", f"{call.describe()} -> {response.text[:300]}",
                  server_error=response.status_code >= 500)


async def post_whole(ctx: Context, call: Call) -> Outcome:
    """A non-streamed request: complete when 200 with n choices, each finished, and usage."""
    try:
        response = await ctx.client.post(ctx.url(call.path), json=call.body, headers=ctx.headers)
        if response.status_code != 200:
            return refusal(response, call)
        data = response.json()
    except ValueError as e:
        return accepted(failed("malformed JSON", f"{call.describe()} -> {e}"))
    except httpx.ConnectError as e:
        return failed(type(e).__name__, f"{call.describe()} -> {e!r}")
    except httpx.HTTPError as e:  # sent, and no answer came: the server lost it
        return accepted(failed(type(e).__name__, f"{call.describe()} -> {e!r}"))
    reasons = [choice.get("finish_reason") for choice in data.get("choices") or []]
    usage = data.get("usage") or {}
    if len(reasons) != call.n or not set(reasons) <= {"stop", "length"} or "completion_tokens" not in usage:
        return accepted(failed("incomplete response", f"{call.describe()} -> {json.dumps(data)[:300]}"))
    return accepted(Outcome("completed", usage["completion_tokens"]))


async def abort_later(ctx: Context, rid: str, delay_s: float, limit: asyncio.Timeout) -> int:
    """POST /abort/{rid} after delay_s; once accepted, the stream gets ABORT_GRACE_S to end."""
    await asyncio.sleep(delay_s)
    response = await ctx.client.post(ctx.url(f"/abort/{rid}"), headers=ctx.headers)
    if response.status_code == 200:
        limit.reschedule(asyncio.get_running_loop().time() + ABORT_GRACE_S)
    return response.status_code


async def sse_data(response: httpx.Response) -> AsyncIterator[str]:
    """The payload of each `data:` line. Lines end only at CR, LF or CRLF, as SSE has it: httpx's
    aiter_lines also splits at U+2028, U+0085 and the like, which JSON text may carry unescaped.
    """
    rest = ""
    async for text in response.aiter_text():
        *lines, rest = re.split("\r\n|\r|\n", rest + text)
        for line in lines:
            if line.startswith("data:"):
                yield line[len("data:"):].strip()


async def post_stream(ctx: Context, call: Call, hang_up_after: int | None = None,
                      abort_delay_s: float | None = None) -> Outcome:
    """A streamed request, optionally hung up on after some events or aborted by id from the side.
    Once the server has answered 200, every outcome counts as accepted."""
    answered: list[bool] = []
    outcome = await read_stream(ctx, call, hang_up_after, abort_delay_s, answered)
    return accepted(outcome) if answered else outcome


async def read_stream(ctx: Context, call: Call, hang_up_after: int | None, abort_delay_s: float | None,
                      answered: list[bool]) -> Outcome:
    finish: dict[int, str] = {}
    tokens, events, done, error, payload = 0, 0, False, None, ""
    abort_task: asyncio.Task[int] | None = None
    abort_status = None
    try:
        async with asyncio.timeout(None) as limit:
            async with ctx.client.stream("POST", ctx.url(call.path), json=call.body, headers=ctx.headers) as response:
                if response.status_code != 200:
                    await response.aread()
                    return refusal(response, call)
                answered.append(True)
                async for payload in sse_data(response):
                    if payload == "[DONE]":
                        done = True
                        break
                    data = json.loads(payload)
                    if "error" in data:
                        error = data["error"]
                        continue
                    if abort_delay_s is not None and abort_task is None:
                        abort_task = asyncio.create_task(abort_later(ctx, data["id"], abort_delay_s, limit))
                    for choice in data.get("choices") or []:
                        if choice.get("finish_reason"):
                            finish[choice["index"]] = choice["finish_reason"]
                    tokens = (data.get("usage") or {}).get("completion_tokens", tokens)
                    events += 1
                    if events == hang_up_after:
                        return Outcome("disconnected")  # leaving the block closes the connection
            if abort_task is not None:
                abort_status = await abort_task  # inside the limit: its grace applies while it is pending
    except TimeoutError:
        return failed("stream did not end after /abort", call.describe())
    except ValueError as e:
        return failed("malformed JSON", f"{call.describe()} -> {e} in {payload[:300]!r}")
    except httpx.HTTPError as e:
        return failed(type(e).__name__, f"{call.describe()} -> {e!r}")
    finally:
        if abort_task is not None and not abort_task.done():
            abort_task.cancel()
    if abort_status not in (None, 200, 404):
        return failed(f"/abort HTTP {abort_status}", call.describe())
    if not done:
        return failed("stream without [DONE]", call.describe())
    if error is not None:
        if "timeout" in call.body and error.get("code") == 504:
            return Outcome("timed_out")
        return failed("error event in stream", f"{call.describe()} -> {json.dumps(error)[:300]}")
    allowed = {"stop", "length", "abort"} if abort_status == 200 else {"stop", "length"}
    if sorted(finish) != list(range(call.n)) or not set(finish.values()) <= allowed:
        return failed("bad finish_reason in stream", f"{call.describe()} -> finish reasons {finish}")
    return Outcome("aborted" if "abort" in finish.values() else "completed", tokens)


# ---- actions: each one request, judged ------------------------------------------------------------

async def complete(ctx: Context, rng: random.Random) -> Outcome:
    call = valid_call(ctx.args, rng, stream=rng.random() < 0.5)
    return await (post_stream(ctx, call) if call.body["stream"] else post_whole(ctx, call))


async def disconnect(ctx: Context, rng: random.Random) -> Outcome:
    call = valid_call(ctx.args, rng, stream=rng.random() < 0.5)
    if call.body["stream"]:
        return await post_stream(ctx, call, hang_up_after=rng.randint(1, 8))
    try:
        async with asyncio.timeout(rng.uniform(0.01, 1.0)):
            return await post_whole(ctx, call)
    except TimeoutError:
        return Outcome("disconnected")


async def abort(ctx: Context, rng: random.Random) -> Outcome:
    return await post_stream(ctx, valid_call(ctx.args, rng, stream=True), abort_delay_s=rng.uniform(0, 0.2))


async def invalid(ctx: Context, rng: random.Random) -> Outcome:
    path, content = rng.choice(ctx.invalid_bodies)
    describe = f"POST {path} {content[:300].decode(errors='replace')}"
    headers = {**ctx.headers, "Content-Type": "application/json"}
    try:
        response = await ctx.client.post(ctx.url(path), content=content, headers=headers)
    except httpx.HTTPError as e:
        return failed(type(e).__name__, f"{describe} -> {e!r}")
    if (outcome := overloaded(response)) is not None:
        return outcome
    if not 400 <= response.status_code < 500:
        return failed(f"invalid request got HTTP {response.status_code}", f"{describe} -> {response.text[:300]}",
                      server_error=response.status_code >= 500)
    if not error_body_ok(response):
        return failed("error body not OpenAI-shaped", f"{describe} -> {response.text[:300]}")
    return Outcome("invalid_4xx_ok")


async def timeout(ctx: Context, rng: random.Random) -> Outcome:
    call = valid_call(ctx.args, rng, stream=rng.random() < 0.5, timeout_s=round(rng.uniform(0.05, 2.0), 3))
    return await (post_stream(ctx, call) if call.body["stream"] else post_whole(ctx, call))


Action = Callable[[Context, random.Random], Awaitable[Outcome]]


def action_mix(args: argparse.Namespace) -> list[tuple[Action, float]]:
    mix: list[tuple[Action, float]] = [(complete, 5.0), (disconnect, 1.5), (abort, 1.0), (invalid, 1.5)]
    return mix + [(timeout, 1.0)] if args.with_timeouts else mix


async def client_loop(ctx: Context, index: int, deadline: float, tally: Tally) -> None:
    rng = random.Random(f"{ctx.args.seed}/{index}")
    actions, weights = zip(*action_mix(ctx.args), strict=True)
    while time.monotonic() < deadline:
        action = rng.choices(actions, weights)[0]
        try:
            outcome = await action(ctx, rng)
        except Exception as e:  # noqa: BLE001 - an answer of an unexpected shape (a KeyError, ...) is a failure
            outcome = failed(f"unexpected answer in {action.__name__}", repr(e))
        tally.add(outcome)
        if outcome.status == "overloaded_503":
            await asyncio.sleep(min(outcome.retry_after_s, max(0.0, deadline - time.monotonic())))
        elif outcome.status == "failed":
            await asyncio.sleep(0.1)  # a server that refuses connections is not hammered in a busy loop


async def run(args: argparse.Namespace) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=2 * args.clients + 4)  # each client: its request and an /abort
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(args.read_timeout, connect=10)) as client:
        invalid_bodies = invalid_requests(args.model) + (attack_requests(args.model) if args.chaos else [])
        ctx = Context(args, client, headers, invalid_bodies)
        before = await read_metrics(client, args.base_url, headers)
        canaries_before = await canary_texts(client, args.base_url, args.model, headers) if args.chaos else None
        tally = Tally()
        start = time.monotonic()
        deadline = start + args.duration
        pausing = (asyncio.create_task(pause_scheduler(args.scheduler_pid, deadline, args.pause_every, args.max_pause,
                                                       args.seed)) if args.chaos else None)
        await asyncio.gather(*(client_loop(ctx, i, deadline, tally) for i in range(args.clients)))
        pauses = await pausing if pausing is not None else Pauses()
        elapsed = time.monotonic() - start
        after = await drain(client, args.base_url, headers, args.drain_timeout)
        try:
            health_ok = (await client.get(ctx.url("/health"), headers=headers)).status_code == 200
        except httpx.HTTPError:
            health_ok = False
        canaries_after = await canary_texts(client, args.base_url, args.model, headers) if args.chaos else None

    invariant = after.get("minisgl_kv_invariant_ok")
    canaries_identical = None  # None: not compared (no --chaos)
    if args.chaos:
        canaries_identical = canaries_before is not None and canaries_before == canaries_after
    kv = {k: after.get(f"minisgl_kv_{k}") for k in ("pages_free", "cached_pages", "pages_total")}
    checks = {
        "drained": idle(after),
        "health_ok": health_ok,
        "kv_pages_balance": pages_balance(after),
        "kv_invariant_ok": None if invariant is None else invariant == 1,  # None: not reported
        "canaries_identical": canaries_identical,
        "scheduler_alive": None if pausing is None else not pauses.scheduler_gone,
    }
    leaked = None if None in kv.values() else kv["pages_total"] - kv["pages_free"] - kv["cached_pages"]
    total = sum(tally.outcomes.values())
    failures = sum(tally.failures.values())
    settings = {k: v for k, v in vars(args).items() if k != "api_key"}
    return {
        **settings,
        "duration_s": elapsed,
        "requests": total,
        "requests_per_s": total / elapsed,
        **{name: tally.outcomes[name] for name in OUTCOMES},
        "accepted": tally.accepted,
        "lost": tally.lost,
        "leaked_pages": leaked,
        "server_errors_5xx": tally.server_errors,
        "scheduler_pauses": pauses.count,
        "scheduler_paused_s": pauses.seconds,
        "failures": failures,
        "failures_by_kind": dict(tally.failures),
        "failure_examples": dict(tally.examples),
        "output_tokens": tally.output_tokens,
        "output_tokens_per_s": tally.output_tokens / elapsed,
        "retractions": increase(before, after, "minisgl_retractions"),
        "evicted_pages": increase(before, after, "minisgl_evicted_pages"),
        "request_errors": increases(before, after, "minisgl_request_errors_total"),
        "kv_pages": kv,
        **checks,
        "passed": failures == 0 and tally.lost == 0 and tally.server_errors == 0 and not leaked
                  and tally.outcomes["completed"] > 0 and all(v is not False for v in checks.values()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default="http://127.0.0.1:1919")
    parser.add_argument("--model", default=None, help="default: the first id from GET /v1/models")
    parser.add_argument("--api-key", default=None, help="sent as a Bearer token")
    parser.add_argument("--duration", type=float, default=300.0, help="seconds of new requests")
    parser.add_argument("--clients", type=int, default=64, help="concurrent clients, one request each at a time")
    parser.add_argument("--max-tokens", type=int, default=512, help="max_tokens is uniform in [1, this]")
    parser.add_argument("--max-prompt-words", type=int, default=256,
                        help="prompt words uniform in [1, this]; keep prompt + max tokens within the context")
    parser.add_argument("--with-timeouts", action="store_true", help="also send requests with a short `timeout`")
    parser.add_argument("--drain-timeout", type=float, default=60.0, help="seconds for the server to go idle")
    parser.add_argument("--read-timeout", type=float, default=120.0,
                        help="seconds without a byte from the server before a request counts as hung")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chaos", action="store_true",
                        help="pause and resume the scheduler at random, add attack bodies, compare greedy canaries "
                             "before and after (the server must run on this host)")
    parser.add_argument("--scheduler-pid", type=int, default=None,
                        help="--chaos: the scheduler process to pause (default: the one named minisgl-schedul here)")
    parser.add_argument("--pause-every", type=float, default=5.0, help="--chaos: mean seconds between pauses")
    parser.add_argument("--max-pause", type=float, default=3.0,
                        help="--chaos: longest pause (s); past 15 s /health turns 503 and new requests are refused")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    args.model = args.model or first_model(args)
    if args.chaos and args.scheduler_pid is None:
        args.scheduler_pid = find_scheduler_pid()
    report = asyncio.run(run(args))
    emit(report, args.out)
    sys.exit(0 if report["passed"] else 1)


if __name__ == "__main__":
    main()
