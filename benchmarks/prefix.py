"""Prefix reuse: radix vs naive in one run, on a shared system prompt and on multi-turn chats.

(a) 256 requests sharing a 2,048-token system prompt, each with a 128-token unique suffix,
    128 output tokens; (b) 64 four-turn chats (each turn appends the previous answer and a new
    64-token user message). Reports throughput, mean time to first token, and prefill tokens.

    python benchmarks/prefix.py --model Qwen/Qwen3-0.6B --load-format dummy
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import time

import numpy as np

from minisgl_jax.config import EngineArgs
from minisgl_jax.core import SamplingParams
from minisgl_jax.engine import Engine
from minisgl_jax.engine.setup import enable_compile_cache


def run_sessions(engine: Engine, sessions: list[list[list[int]]], output_len: int) -> dict[str, float]:
    """Each session is a list of user turns; turn k+1's prompt is the history plus its answers."""
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    history = [[] for _ in sessions]
    turn = [0] * len(sessions)
    submitted: dict[str, tuple[int, float]] = {}
    first_token: list[float] = []
    answers: dict[str, list[int]] = {}
    prefill_before, hits_before = engine.stats()["prefill_tokens"], engine.stats()["cache_hit_tokens"]

    def submit(i: int) -> None:
        history[i] = history[i] + sessions[i][turn[i]]
        rid = f"s{i}-t{turn[i]}-{time.perf_counter_ns()}"
        engine.add_request(rid, history[i], params)
        submitted[rid] = (i, time.perf_counter())
        answers[rid] = []

    start = time.perf_counter()
    for i in range(len(sessions)):
        submit(i)
    tokens = 0
    while engine.has_unfinished():
        for out in engine.step():
            i, sent = submitted[out.request_id]
            if not answers[out.request_id] and out.new_token_ids:
                first_token.append(time.perf_counter() - sent)
            answers[out.request_id] += out.new_token_ids
            tokens += len(out.new_token_ids)
            if out.finished:
                history[i] = history[i] + answers[out.request_id]
                turn[i] += 1
                if turn[i] < len(sessions[i]):
                    submit(i)
    seconds = time.perf_counter() - start
    engine.check_kv_invariant()
    s = engine.stats()
    return dict(seconds=seconds, output_tok_s=tokens / seconds, mean_ttft_ms=1e3 * float(np.mean(first_token)),
                prefill_tokens=s["prefill_tokens"] - prefill_before, cache_hit_tokens=s["cache_hit_tokens"] - hits_before)


def workloads(args: argparse.Namespace) -> dict[str, list[list[list[int]]]]:
    rng = np.random.default_rng(0)
    draw = lambda n: rng.integers(0, args.vocab, n).tolist()  # noqa: E731
    system = draw(args.system_len)
    shared = [[system + draw(args.suffix_len)] for _ in range(args.num_requests)]
    chats = [[draw(args.turn_len) for _ in range(args.turns)] for _ in range(args.num_chats)]
    return {"shared system prompt": shared, "multi-turn chats": chats}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="Qwen/Qwen3-0.6B")
    parser.add_argument("--load-format", default="dummy")
    parser.add_argument("--attention-backend", default="pallas")
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--system-len", type=int, default=2048)
    parser.add_argument("--suffix-len", type=int, default=128)
    parser.add_argument("--num-chats", type=int, default=64)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--turn-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=10000)
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--max-running-requests", type=int, default=256)
    parser.add_argument("--num-pages", type=int, default=None)
    parser.add_argument("--compile-cache-dir", default="~/.cache/minisgl_jax/xla")
    parser.add_argument("--caches", default="naive,radix",
                        help="engines to compare, in order: naive, radix, radix-no-cascade (radix without cascade attention)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each workload per engine; the median is reported")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    enable_compile_cache(args.compile_cache_dir)
    results = {}
    caches = args.caches.split(",")
    for cache in caches:
        engine = Engine(EngineArgs(
            model=args.model, load_format=args.load_format, cache=cache.split("-")[0],
            cascade_attention=cache != "radix-no-cascade", attention_backend=args.attention_backend,
            max_model_len=args.max_model_len, max_running_requests=args.max_running_requests,
            num_pages=args.num_pages, compile_cache_dir=args.compile_cache_dir,
            background_compile=False,  # plain sampling only: the variants' compiles would run inside the timed runs
        ))
        for name, sessions in workloads(args).items():
            runs = []
            for _ in range(args.repeats):
                engine.flush_cache()  # each repeat starts from an empty cache, as the first did
                runs.append(run_sessions(engine, sessions, args.output_len))
            runs.sort(key=lambda r: r["seconds"])
            results[(name, cache)] = dict(runs[len(runs) // 2], all_seconds=[round(r["seconds"], 3) for r in runs])
        print(f"{cache}: {engine.stats()['cascade_steps']} of {engine.stats()['steps']} steps ran cascade attention")
        del engine
        gc.collect()  # free the first engine's KV pool before the second sizes its own
    print(f"\n(median of {args.repeats} runs; all runs' seconds in the last column)")
    print("| workload | cache | seconds | output tok/s | mean TTFT ms | prefill tokens | cache hit tokens | runs s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for (name, cache), r in results.items():
        print(f"| {name} | {cache} | {r['seconds']:.2f} | {r['output_tok_s']:.0f} | {r['mean_ttft_ms']:.1f} "
              f"| {r['prefill_tokens']} | {r['cache_hit_tokens']} | {', '.join(map(str, r['all_seconds']))} |")
    for name in ("shared system prompt", "multi-turn chats"):
        base = results[(name, caches[0])]
        for cache in caches[1:]:
            r = results[(name, cache)]
            print(f"{name}: {cache}/{caches[0]} throughput {r['output_tok_s'] / base['output_tok_s']:.2f}x, "
                  f"TTFT {base['mean_ttft_ms'] / r['mean_ttft_ms']:.2f}x lower")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({f"{k[0]} / {k[1]}": v for k, v in results.items()}, f, indent=2)


if __name__ == "__main__":
    main()
