"""Online serving benchmark against any OpenAI-compatible endpoint (ours, vLLM, SGLang, ...).

Sends streamed requests with Poisson arrivals and an optional concurrency cap, then reports
throughput, TTFT, per-token ITL and end-to-end latency.

    python benchmarks/serving.py --base-url http://127.0.0.1:1919 --num-prompts 200 --request-rate 8
    python benchmarks/serving.py --dataset sharegpt --dataset-path sharegpt.json --tokenizer Qwen/Qwen3-0.6B
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import itertools
import json
import math
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
from report import emit  # benchmarks/report.py: the script's folder is on sys.path

# Short common words: most BPE tokenizers spend one token on each (with its leading space),
# so n words make roughly n tokens without knowing the server's tokenizer.
WORDS = (
    "the", "of", "and", "to", "in", "is", "you", "that", "it", "he", "was", "for", "on", "are", "as", "with", "his",
    "they", "at", "be", "this", "have", "from", "or", "one", "had", "by", "word", "but", "not", "what", "all",
    "were", "we", "when", "your", "can", "said", "there", "use", "an", "each", "which", "she", "do", "how", "their",
    "if", "will", "up", "other", "about", "out", "many", "then", "them", "these", "so", "some", "her", "would",
    "make", "like", "him", "into", "time", "has", "look", "two", "more", "write", "go", "see", "number", "no", "way",
    "could", "people", "my", "than", "first", "water", "been", "call", "who", "oil", "its", "now", "find", "long",
    "down", "day", "did", "get", "come", "made", "may", "part",
)


@dataclass
class Request:
    prompt: str
    prompt_len: int  # tokens: exact with --tokenizer, else an estimate; the server's usage wins when it has one
    max_tokens: int


@dataclass
class Result:
    ok: bool = False
    error: str = ""
    send_time: float = 0.0
    end_time: float = 0.0
    chunk_times: list[float] = field(default_factory=list)
    chunk_texts: list[str] = field(default_factory=list)
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


def pick_len(rng: random.Random, length: int, ratio: float) -> int:
    return rng.randint(max(1, int(length * ratio)), max(1, length))


def random_text(rng: random.Random, num_tokens: int, tokenizer: Any) -> str:
    """Random words; with a tokenizer, cut to exactly num_tokens tokens."""
    text = " ".join(rng.choice(WORDS) for _ in range(num_tokens))  # every word is at least one token
    if tokenizer is None:
        return text
    return tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)[:num_tokens])


def count_tokens(text: str, tokenizer: Any) -> int:
    """Exact with a tokenizer, else the usual ~1.3 tokens per English word."""
    if tokenizer is not None:
        return len(tokenizer.encode(text, add_special_tokens=False))
    return max(1, round(len(text.split()) * 1.3))


def random_dataset(args: argparse.Namespace, rng: random.Random, tokenizer: Any) -> list[Request]:
    requests = []
    for _ in range(args.num_prompts):
        n = pick_len(rng, args.input_len, args.range_ratio)
        requests.append(Request(random_text(rng, n, tokenizer), n, pick_len(rng, args.output_len, args.range_ratio)))
    return requests


def shared_prefix_dataset(args: argparse.Namespace, rng: random.Random, tokenizer: Any) -> list[Request]:
    """Each prompt is one of --num-prefixes shared prefixes followed by its own --input-len question."""
    prefixes = [random_text(rng, args.prefix_len, tokenizer) for _ in range(args.num_prefixes)]
    requests = []
    for i in range(args.num_prompts):
        n = pick_len(rng, args.input_len, args.range_ratio)
        prompt = prefixes[i % args.num_prefixes] + " " + random_text(rng, n, tokenizer)
        requests.append(Request(prompt, args.prefix_len + n, pick_len(rng, args.output_len, args.range_ratio)))
    return requests


def sharegpt_dataset(args: argparse.Namespace, rng: random.Random, tokenizer: Any) -> list[Request]:
    """First human turn as the prompt; the first gpt turn after it sets max_tokens."""
    with open(args.dataset_path) as f:
        entries = json.load(f)
    pairs = []
    for entry in entries:
        turns = entry.get("conversations", [])
        human = next((i for i, t in enumerate(turns) if t.get("from") == "human"), None)
        if human is None:
            continue
        gpt = next((t for t in turns[human + 1:] if t.get("from") == "gpt"), None)
        if gpt is not None and turns[human]["value"].strip() and gpt["value"].strip():
            pairs.append((turns[human]["value"], gpt["value"]))
    rng.shuffle(pairs)
    if len(pairs) < args.num_prompts:
        print(f"only {len(pairs)} usable conversations in {args.dataset_path}", file=sys.stderr)
    return [Request(p, count_tokens(p, tokenizer), count_tokens(c, tokenizer)) for p, c in pairs[: args.num_prompts]]


def request_body(args: argparse.Namespace, req: Request) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": args.model, "max_tokens": req.max_tokens, "temperature": args.temperature, "stream": True,
        "stream_options": {"include_usage": True},
    }
    if args.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": req.prompt}]
    else:
        body["prompt"] = req.prompt
    if not args.no_ignore_eos:
        body["ignore_eos"] = True
    return body


def chunk_text(choice: dict[str, Any]) -> str:
    """New text in a choice; chat deltas may also stream reasoning, which costs decode steps all the same."""
    if "delta" in choice:
        delta = choice["delta"] or {}
        return (delta.get("content") or "") + (delta.get("reasoning_content") or delta.get("reasoning") or "")
    return choice.get("text") or ""


async def send(client: httpx.AsyncClient, url: str, headers: dict[str, str], body: dict[str, Any]) -> Result:
    """One streamed request; every failure becomes an error kind on the Result, never an exception."""
    result = Result(send_time=time.perf_counter())
    finish_reason = None
    try:
        async with client.stream("POST", url, json=body, headers=headers) as response:
            if response.status_code != 200:
                await response.aread()
                result.error = f"HTTP {response.status_code}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                payload = line[len("data:"):].strip()
                if payload == "[DONE]":
                    break
                now = time.perf_counter()
                data = json.loads(payload)
                if data.get("error"):
                    result.error = "error in stream"
                    return result
                if data.get("usage"):
                    result.prompt_tokens = data["usage"].get("prompt_tokens")
                    result.completion_tokens = data["usage"].get("completion_tokens")
                for choice in data.get("choices") or []:
                    text = chunk_text(choice)
                    if text:
                        result.chunk_times.append(now)
                        result.chunk_texts.append(text)
                    finish_reason = choice.get("finish_reason") or finish_reason
    except Exception as e:  # noqa: BLE001 - the benchmark goes on whatever one request does
        result.error = type(e).__name__
        return result
    result.end_time = time.perf_counter()
    if finish_reason is None:
        result.error = "no finish_reason"
    elif not result.chunk_times:  # nothing to time: no TTFT, no ITL
        result.error = "no content"
    result.ok = not result.error
    return result


async def run(args: argparse.Namespace, requests: list[Request]) -> tuple[list[Result], float]:
    """Dispatch on a Poisson clock (absolute times, so sleeps do not drift); the semaphore caps in-flight ones."""
    url = args.base_url.rstrip("/") + ("/v1/chat/completions" if args.endpoint == "chat" else "/v1/completions")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    cap = args.max_concurrency or len(requests)
    semaphore = asyncio.Semaphore(cap)
    arrivals = random.Random(args.seed)
    limits = httpx.Limits(max_connections=cap, max_keepalive_connections=cap)

    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(None)) as client:

        async def limited(req: Request) -> Result:
            async with semaphore:
                return await send(client, url, headers, request_body(args, req))

        start = time.perf_counter()
        next_time = start
        tasks = []
        for i, req in enumerate(requests):
            if i and math.isfinite(args.request_rate):
                next_time += arrivals.expovariate(args.request_rate)
                await asyncio.sleep(max(0.0, next_time - time.perf_counter()))
            tasks.append(asyncio.create_task(limited(req)))
        results = await asyncio.gather(*tasks)
    return results, time.perf_counter() - start


def tokens_per_chunk(texts: list[str], tokenizer: Any) -> list[int]:
    """Tokens of the whole output, each assigned to the chunk in which its last character arrived."""
    if tokenizer is None:
        return [1] * len(texts)
    ends = list(itertools.accumulate(len(t) for t in texts))
    offsets = tokenizer("".join(texts), add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    counts = [0] * len(texts)
    for _, end in offsets:
        counts[min(bisect.bisect_left(ends, end), len(texts) - 1)] += 1
    return counts


def per_token_itls(result: Result, tokenizer: Any) -> list[float]:
    """Inter-token latencies, one per output token after the first chunk, not one per SSE chunk.

    Servers may pack several tokens into one chunk (detokenizer batching, speculative decoding), and a
    per-chunk gap then overstates ITL k-fold. A chunk with k tokens spreads its gap from the previous chunk
    over its k tokens; the tokens of the first chunk are all part of TTFT. With --tokenizer, k is counted
    from the text deltas. Without one, every content chunk counts as one token and the ITLs are then
    resampled and rescaled so that there are completion_tokens - 1 of them with the same total time: exact
    when the server sends one chunk per token, the mean over the stream otherwise. The server's
    completion_tokens has the last word either way, since a tokenizer may split the text differently.
    """
    counts = tokens_per_chunk(result.chunk_texts, tokenizer)
    itls: list[float] = []
    previous = result.chunk_times[0]
    for t, k in zip(result.chunk_times[1:], counts[1:], strict=True):
        if k:  # a chunk holding only part of a token: its time goes to the chunk that completes it
            itls += [(t - previous) / k] * k
            previous = t
    target = (result.completion_tokens or sum(counts)) - counts[0]
    if itls and target > 0 and target != len(itls):
        scale = len(itls) / target
        itls = [itls[int(i * scale)] * scale for i in range(target)]
    return itls


def stats(name: str, values: list[float], unit: float) -> dict[str, float | None]:
    """Mean and percentiles in the given unit; None when nothing was measured."""
    keys = [f"{name}_{s}" for s in ("mean", "p50", "p90", "p99")]
    if not values:
        return dict.fromkeys(keys)
    v = np.asarray(values) * unit
    return dict(zip(keys, [float(v.mean()), *(float(np.percentile(v, q)) for q in (50, 90, 99))], strict=True))


def summarize(args: argparse.Namespace, requests: list[Request], results: list[Result], duration: float,
              tokenizer: Any) -> dict[str, Any]:
    done = [(req, res) for req, res in zip(requests, results, strict=True) if res.ok]
    input_tokens = sum(res.prompt_tokens or req.prompt_len for req, res in done)
    output_tokens = sum(res.completion_tokens or sum(tokens_per_chunk(res.chunk_texts, tokenizer)) for _, res in done)
    errors = Counter(res.error for res in results if not res.ok)
    settings = {k: ("inf" if v == math.inf else v) for k, v in vars(args).items() if k != "api_key"}
    return {
        **settings,
        "duration_s": duration,
        "completed": len(done),
        "errors": sum(errors.values()),
        "errors_by_kind": dict(errors),
        "request_throughput": len(done) / duration,
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "input_tokens_per_s": input_tokens / duration,
        "output_tokens_per_s": output_tokens / duration,
        **stats("ttft_ms", [res.chunk_times[0] - res.send_time for _, res in done], 1e3),
        **stats("itl_ms", [x for _, res in done for x in per_token_itls(res, tokenizer)], 1e3),
        **stats("e2e_s", [res.end_time - res.send_time for _, res in done], 1.0),
    }


def first_model(args: argparse.Namespace) -> str:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    response = httpx.get(args.base_url.rstrip("/") + "/v1/models", headers=headers, timeout=30)
    response.raise_for_status()
    return response.json()["data"][0]["id"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default="http://127.0.0.1:1919")
    parser.add_argument("--model", default=None, help="default: the first id from GET /v1/models")
    parser.add_argument("--api-key", default=None, help="sent as a Bearer token")
    parser.add_argument("--endpoint", choices=["chat", "completions"], default="chat")
    parser.add_argument("--dataset", choices=["random", "shared-prefix", "sharegpt"], default="random")
    parser.add_argument("--dataset-path", default=None, help="ShareGPT-format JSON for --dataset sharegpt")
    parser.add_argument("--num-prompts", type=int, default=200)
    parser.add_argument("--input-len", type=int, default=512, help="prompt tokens (after the prefix if shared)")
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--range-ratio", type=float, default=1.0, help="lengths uniform in [len*ratio, len]")
    parser.add_argument("--prefix-len", type=int, default=2048, help="shared-prefix: tokens in each prefix")
    parser.add_argument("--num-prefixes", type=int, default=4, help="shared-prefix: distinct prefixes")
    parser.add_argument("--request-rate", type=float, default=math.inf, help="requests/s, Poisson; inf: all at once")
    parser.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--no-ignore-eos", action="store_true", help="do not send ignore_eos: true")
    parser.add_argument("--tokenizer", default=None, help="HF tokenizer: exact prompt lengths and tokens per chunk")
    parser.add_argument("--json", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    if args.dataset == "sharegpt" and not args.dataset_path:
        parser.error("--dataset sharegpt needs --dataset-path")
    if not 0.0 <= args.range_ratio <= 1.0:
        parser.error("--range-ratio must be in [0, 1]")

    tokenizer = None
    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    args.model = args.model or first_model(args)
    build = {"random": random_dataset, "shared-prefix": shared_prefix_dataset, "sharegpt": sharegpt_dataset}
    requests = build[args.dataset](args, random.Random(args.seed), tokenizer)
    results, duration = asyncio.run(run(args, requests))
    emit(summarize(args, requests, results, duration, tokenizer), args.json)


if __name__ == "__main__":
    main()
