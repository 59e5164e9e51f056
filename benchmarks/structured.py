"""What a grammar costs: the same requests under a bounded JSON schema and free, in one process.

    python benchmarks/structured.py --model Qwen/Qwen3-0.6B --load-format dummy
    python benchmarks/structured.py --model meta-llama/Llama-3.1-8B --load-format dummy

Throughput: --num-requests requests at once, output tokens per second, constrained over free (a
random-weight model ends a bounded object early, so tokens per second, not seconds, compare).
Batch 1: seconds per output token after the first, constrained over free. Compile: seconds to
compile each schema cold (a new grammar each), and again from the compiled-grammar cache.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

from report import emit  # noqa: E402

from minisgl_jax import LLM, SamplingParams  # noqa: E402
from minisgl_jax.engine import warmup  # noqa: E402
from minisgl_jax.engine.setup import enable_compile_cache  # noqa: E402
from minisgl_jax.grammar import GrammarSpec  # noqa: E402

SCHEMA = {  # bounded: every string, array and number has a limit, so a weak model still ends
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 4},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                      "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"], "additionalProperties": False},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "tags", "address", "active"],
    "additionalProperties": False,
}


def parses(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def per_token_seconds(llm: LLM, prompt: list[int], params: SamplingParams) -> float:
    """Seconds per output token of one request after its first (the decode steps alone)."""
    stamps = []
    for delta in llm.stream([prompt], params):
        stamps += [time.perf_counter()] * len(delta.token_ids)
    return (stamps[-1] - stamps[0]) / max(1, len(stamps) - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="Qwen/Qwen3-0.6B")
    parser.add_argument("--load-format", default="dummy")
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--batch1-tokens", type=int, default=128)
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--compile-cache-dir", default="~/.cache/minisgl_jax/xla")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    enable_compile_cache(args.compile_cache_dir)

    llm = LLM(args.model, load_format=args.load_format, background_compile=False,
              compile_cache_dir=args.compile_cache_dir, max_model_len=args.max_model_len)
    engine = llm.engine
    engine.runner.programs.compile_all(warmup.step_programs(engine, logits_processing=True), workers=os.cpu_count())
    schema = json.dumps(SCHEMA)
    prompts = [[100 + i % 1000, 7, 8, 9] for i in range(args.num_requests)]
    free = [SamplingParams(temperature=0.7, seed=i, max_tokens=args.max_tokens, ignore_eos=True)
            for i in range(args.num_requests)]
    constrained = [SamplingParams(temperature=0.7, seed=i, max_tokens=args.max_tokens, json_schema=schema)
                   for i in range(args.num_requests)]
    llm.generate(prompts[:2], constrained[:2])  # the grammar compiles and is cached; programs run once

    report: dict = dict(model=args.model, device=str(engine.mesh.devices.flat[0].device_kind),
                        requests=args.num_requests)
    for name, params in (("free", free), ("constrained", constrained)):
        engine.flush_cache()
        started = time.perf_counter()
        results = llm.generate(prompts, params)
        seconds = time.perf_counter() - started
        tokens = sum(len(r.token_ids) for r in results)
        if name == "constrained":
            report["constrained_complete_objects"] = sum(parses(r.text) for r in results)
        report[f"{name}_output_tokens"], report[f"{name}_tok_per_s"] = tokens, tokens / seconds
    report["constrained_over_free_throughput"] = report["constrained_tok_per_s"] / report["free_tok_per_s"]

    prompt = prompts[0]
    plain = SamplingParams(temperature=0.0, max_tokens=args.batch1_tokens, ignore_eos=True)
    shaped = SamplingParams(temperature=0.0, max_tokens=args.batch1_tokens, regex="[a-z ]{%d}" % args.batch1_tokens)
    per_token_seconds(llm, prompt, shaped)  # compiles and caches this grammar
    report["batch1_free_ms_per_token"] = 1e3 * per_token_seconds(llm, prompt, plain)
    report["batch1_constrained_ms_per_token"] = 1e3 * per_token_seconds(llm, prompt, shaped)
    report["batch1_constrained_over_free"] = (report["batch1_constrained_ms_per_token"]
                                              / report["batch1_free_ms_per_token"])

    compiler = engine.grammars.compiler
    for i, field in enumerate(("name", "city")):  # a new schema each: a cold compile
        variant = dict(SCHEMA, properties=dict(SCHEMA["properties"], **{f"extra_{field}": {"type": "string"}}))
        spec = GrammarSpec("json_schema", json.dumps(variant))
        started = time.perf_counter()
        compiler.compile(spec)
        report[f"compile_cold_{i}_s"] = time.perf_counter() - started
        started = time.perf_counter()
        compiler.compile(spec)
        report[f"compile_cached_{i}_s"] = time.perf_counter() - started
    emit(report, args.out)


if __name__ == "__main__":
    main()
