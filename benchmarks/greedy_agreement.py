"""Greedy agreement of two engine configurations on the same prompts: a stability figure for a
lossy option (an FP8 KV cache, FP8 weights) against the engine without it.

    python benchmarks/greedy_agreement.py --model meta-llama/Llama-3.1-8B --candidate kv_cache_dtype=fp8_e4m3

Both engines run one after the other on the same devices (the first is freed before the second
starts), over `--num-prompts` random token prompts with `--max-tokens` greedy tokens each. Reports
the share of output tokens equal position by position, the prompts whose outputs are identical,
and where outputs first diverge. With random (`dummy`) weights the logits are nearly flat, so this
is a stability check, not a quality claim.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import statistics

import numpy as np

from minisgl_jax.config import EngineArgs
from minisgl_jax.core import SamplingParams
from minisgl_jax.engine import Engine


def engine_overrides(pairs: list[str]) -> dict:
    """KEY=VALUE pairs as EngineArgs fields; a VALUE that parses as JSON (2, 0.5, true) is taken as such."""
    fields = set(EngineArgs.__dataclass_fields__)
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in fields:
            raise SystemExit(f"--baseline/--candidate take EngineArgs fields as KEY=VALUE, got {pair!r}")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return overrides


def run(args: argparse.Namespace, overrides: dict, prompts: list[list[int]]) -> list[list[int]]:
    engine = Engine(EngineArgs(**{
        "model": args.model, "load_format": args.load_format, "max_model_len": args.max_model_len,
        "compile_cache_dir": args.compile_cache_dir or None, "background_compile": False, **overrides,
    }))
    outputs = engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True))
    engine.check_kv_invariant()
    del engine
    gc.collect()
    return outputs


def first_divergence(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="meta-llama/Llama-3.1-8B")
    parser.add_argument("--load-format", default="dummy")
    parser.add_argument("--baseline", nargs="*", default=[], help="EngineArgs KEY=VALUE of the reference run")
    parser.add_argument("--candidate", nargs="*", default=["kv_cache_dtype=fp8_e4m3"],
                        help="EngineArgs KEY=VALUE of the run compared with it")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--min-len", type=int, default=32)
    parser.add_argument("--max-len", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--max-token-id", type=int, default=10000, help="prompt token ids lie below this")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compile-cache-dir", default="~/.cache/minisgl_jax/xla", help="'': none")
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    baseline, candidate = engine_overrides(args.baseline), engine_overrides(args.candidate)

    rng = np.random.default_rng(args.seed)
    lengths = rng.integers(args.min_len, args.max_len + 1, args.num_prompts)
    prompts = [rng.integers(0, args.max_token_id, int(n)).tolist() for n in lengths]
    want, got = run(args, baseline, prompts), run(args, candidate, prompts)

    same = sum(x == y for a, b in zip(want, got) for x, y in zip(a, b))
    total = sum(len(a) for a in want)
    divergence = [first_divergence(a, b) for a, b in zip(want, got)]
    report = dict(
        model=args.model, baseline=baseline, candidate=candidate, prompts=args.num_prompts,
        max_tokens=args.max_tokens, token_agreement=same / total,
        identical_outputs=sum(a == b for a, b in zip(want, got)),
        median_first_divergence=statistics.median(divergence), first_token_agreement=sum(d > 0 for d in divergence),
    )
    print(f"\n{args.model}: {candidate} vs {baseline or 'defaults'}, {args.num_prompts} prompts x "
          f"{args.max_tokens} greedy tokens\n| token agreement | identical outputs | first tokens equal | "
          f"median first divergence |\n| --- | --- | --- | --- |\n| {100 * report['token_agreement']:.1f}% "
          f"| {report['identical_outputs']}/{args.num_prompts} | {report['first_token_agreement']}/{args.num_prompts} "
          f"| {report['median_first_divergence']} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
