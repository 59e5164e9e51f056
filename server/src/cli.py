"""`python -m minisgl_jax` flags: the engine's (EngineArgs) and the server's own."""

from __future__ import annotations

import argparse
import os
import shlex
from dataclasses import dataclass, field

from minisgl_jax.config import (
    ALL_REDUCE_MODES,
    ATTENTION_BACKENDS,
    CACHE_KINDS,
    DTYPES,
    KV_CACHE_DTYPES,
    LOAD_FORMATS,
    MOE_BACKENDS,
    MOE_PARALLEL_MODES,
    QUANTIZATIONS,
    EngineArgs,
)
from minisgl_jax.server.limits import RequestLimits
from minisgl_jax.server.reasoning import REASONING_FORMATS
from minisgl_jax.server.tool_parsers import FORMATS


@dataclass
class ServerArgs:
    host: str = "127.0.0.1"
    port: int = 1919
    served_model_name: str | None = None
    api_key: str | None = None
    chat_template: str | None = None  # the template itself, read from --chat-template
    tool_call_parser: str | None = None  # None: the model type's, if it has one
    reasoning_parser: str | None = None
    max_request_bytes: int = 8 * 2**20
    watchdog_timeout: float = 120.0
    shutdown_timeout: float = 5.0
    allow_origins: list[str] | None = None
    shell: bool = False
    shell_max_tokens: int = 1024
    log_level: str = "info"
    limits: RequestLimits = field(default_factory=RequestLimits)
    replicas: int = 1
    max_restarts: int = 3
    router_args: list[str] = field(default_factory=list)  # more flags for sglang-router, after ours


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends '(default: X)' only where the help does not already say the default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if "(default:" in help_text or action.default is None:
            return help_text
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    d = EngineArgs(model="")
    s = ServerArgs()
    p = argparse.ArgumentParser(
        prog="python -m minisgl_jax",
        description="Serve a model with an OpenAI-compatible API (or chat with it in the terminal: --shell).",
        formatter_class=_HelpFormatter,
    )
    model = p.add_argument_group("model")
    model.add_argument("--model", required=True, help="local folder (config.json, *.safetensors) or Hugging Face id; "
                                                      "with --load-format dummy also a bundled config name")
    model.add_argument("--tokenizer", default=None, help="tokenizer folder or id (default: the model's)")
    model.add_argument("--load-format", choices=LOAD_FORMATS, default=d.load_format,
                       help="auto reads the weights; dummy makes random ones (benchmarks)")
    model.add_argument("--dtype", choices=DTYPES, default=d.dtype, help="weights, activations and KV cache")
    model.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default=d.kv_cache_dtype,
                       help="auto: --dtype; fp8_e4m3: twice the tokens in the same memory, K/V divided by the "
                            "checkpoint's per-layer k_scale/v_scale (1.0 where it has none); needs sm_89+")
    model.add_argument("--quantization", choices=QUANTIZATIONS, default=None,
                       help="FP8 linear weights: a checkpoint's format comes from its config.json (then this must be "
                            "fp8 or absent); with --load-format dummy, random block-wise FP8 weights")
    model.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    model.add_argument("--chat-template", default=None,
                       help="a Jinja chat template file (or the template itself) instead of the tokenizer's")
    model.add_argument("--served-model-name", default=None, help="the model name clients send (default: --model)")
    model.add_argument("--tool-call-parser", choices=sorted(FORMATS), default=None,
                       help="how the model writes tool calls (default: from its model type: Qwen hermes, "
                            "Llama llama3_json, Mistral mistral)")
    model.add_argument("--reasoning-parser", choices=sorted(REASONING_FORMATS), default=None,
                       help="split <think>...</think> into reasoning_content (default: off)")
    model.add_argument("--seed", type=int, default=d.seed, help="seeds dummy weights and requests without a seed")

    engine = p.add_argument_group("engine")
    engine.add_argument("--tp", type=int, default=d.tp, help="tensor-parallel GPUs (a jax.sharding mesh axis)")
    engine.add_argument("--moe-parallel", choices=MOE_PARALLEL_MODES, default=d.moe_parallel,
                        help="mixture-of-experts models at tp > 1: tp slices every expert over the GPUs (load "
                             "balanced whatever the routing), ep places whole experts (experts / tp per GPU; "
                             "a GPU's work follows the routing)")
    engine.add_argument("--all-reduce", choices=ALL_REDUCE_MODES, default=d.all_reduce,
                        help="how tp > 1 sums partial results: auto (peer on the GPUs of one host, else xla), "
                             "xla (placed by XLA), psum (explicit, per shard), peer (our NVLink kernel, decode steps)")
    engine.add_argument("--page-size", type=int, default=d.page_size, help="tokens per KV page (a power of two)")
    engine.add_argument("--num-pages", type=int, default=None, help="KV pages (default: sized by --mem-fraction)")
    engine.add_argument("--mem-fraction", type=float, default=d.mem_fraction,
                        help="fraction of GPU memory for weights plus KV cache")
    engine.add_argument("--max-running-requests", type=int, default=d.max_running_requests,
                        help="requests decoded together (the largest decode batch)")
    engine.add_argument("--max-prefill-tokens", type=int, default=d.max_prefill_tokens,
                        help="tokens per prefill step (longer prompts are chunked)")
    engine.add_argument("--cache", choices=CACHE_KINDS, default=d.cache,
                        help="radix shares KV pages of common prefixes across requests; naive does not")
    engine.add_argument("--attention-backend", default=d.attention_backend,
                        help=f"one of {ATTENTION_BACKENDS}, or PREFILL,DECODE (e.g. mosaic,pallas: the Hopper prefill kernel)")
    engine.add_argument("--moe-backend", choices=MOE_BACKENDS, default=d.moe_backend,
                        help="the experts' grouped GEMM (mixture-of-experts models): pallas reads only the experts "
                             "a step routes to; ragged_dot is XLA's (dense on GPUs unless its cuDNN fusion flag is "
                             "on); auto: pallas on GPUs, ragged_dot elsewhere")
    engine.add_argument("--no-overlap", action="store_true", help="read each step's tokens before the next step")
    engine.add_argument("--decode-steps", type=int, default=d.decode_steps,
                        help="decode steps per launch for small decode batches when nothing waits (1: off)")
    engine.add_argument("--burst-max-rows", type=int, default=d.burst_max_rows,
                        help="decode batches of at most this many rows run bursts (default: 16 at tp 1, all at tp > 1; 0: off)")
    engine.add_argument("--no-cascade-attention", action="store_true",
                        help="decode reads a prefix shared by many requests once per request, not once per group")
    engine.add_argument("--decode-buckets", default=None,
                        help="comma-separated decode batch sizes to compile (default: powers of two)")
    engine.add_argument("--compile-cache-dir", default=d.compile_cache_dir,
                        help="persistent XLA compilation cache ('' to disable)")
    engine.add_argument("--compile-workers", type=int, default=d.compile_workers,
                        help="step buckets compiled at once at start-up (0: one per CPU core)")
    engine.add_argument("--no-background-compile", action="store_true",
                        help="compile the top-k/top-p/min-p and logprobs step programs when first needed, "
                             "not in a background thread after start-up")
    engine.add_argument("--status-interval", type=float, default=d.status_interval_s,
                        help="seconds between engine status lines while busy")
    engine.add_argument("--max-logit-bias", type=int, default=d.max_logit_bias,
                        help="logit_bias entries a request may give (each request slot holds this many on the GPU)")
    engine.add_argument("--grammar-timeout", type=float, default=d.grammar_timeout_s,
                        help="seconds a structured output's grammar may take to compile before its request is refused")

    replicas = p.add_argument_group(
        "replicas", "data-parallel copies of this server behind sglang-router (pip install 'minisgl-jax[router]')")
    replicas.add_argument("--replicas", type=int, default=s.replicas,
                          help="servers, each on its own --tp GPUs (slices of CUDA_VISIBLE_DEVICES), behind the "
                               "router on --host:--port; replica i listens on 127.0.0.1 at --port + 1 + i")
    replicas.add_argument("--max-restarts", type=int, default=s.max_restarts,
                          help="a replica that dies is restarted; once one has been restarted this many times, "
                               "the next death stops everything and the launch exits 1")
    replicas.add_argument("--router-args", default="",
                          help="more flags for python -m sglang_router.launch_router, as one string after '=' "
                               "(--router-args='--policy power_of_two --prometheus-port 29001'); they override ours")

    nodes = p.add_argument_group("multi-host")
    nodes.add_argument("--nnodes", type=int, default=d.nnodes, help="hosts in the job")
    nodes.add_argument("--node-rank", type=int, default=d.node_rank, help="this host's rank; 0 serves the API")
    nodes.add_argument("--coordinator", default=None, help="host:port of node 0 for jax.distributed")

    server = p.add_argument_group("server")
    server.add_argument("--host", default=s.host, help="address to bind (0.0.0.0 to listen on every interface)")
    server.add_argument("--port", type=int, default=s.port, help="HTTP port")
    server.add_argument("--api-key", default=os.environ.get("MINISGL_API_KEY"),
                        help="require 'Authorization: Bearer KEY' (default: $MINISGL_API_KEY, else none)")
    server.add_argument("--max-request-bytes", type=int, default=s.max_request_bytes,
                        help="larger request bodies get 413")
    server.add_argument("--watchdog-timeout", type=float, default=s.watchdog_timeout,
                        help="/health answers 503 while one pass of the scheduler's loop (a step, or a compile "
                             "it waits for) has run longer than this (s)")
    server.add_argument("--shutdown-timeout", type=float, default=s.shutdown_timeout,
                        help="on SIGTERM/Ctrl-C, new requests get 503 and those in flight get this many seconds "
                             "to finish before they end with 503")
    server.add_argument("--allow-origins", nargs="*", default=None, help="CORS origins (default: CORS off)")
    limits = p.add_argument_group("limits", "each breach is refused: 400 naming the field, 503 when the queue is full")
    lim = RequestLimits()
    limits.add_argument("--max-queued-requests", type=int, default=lim.max_queued_requests,
                        help="requests (choices) waiting beyond the running batch; past it, 503 with Retry-After")
    limits.add_argument("--request-timeout", type=float, default=lim.request_timeout_s,
                        help="seconds a request may run before it is aborted with 504 (a request's own "
                             "'timeout' field may shorten it; default: no limit)")
    limits.add_argument("--max-n", type=int, default=lim.max_n, help="completions per request (n x prompts)")
    limits.add_argument("--max-tokens-limit", type=int, default=lim.max_tokens,
                        help="largest max_tokens a request may ask (default: the context length)")
    limits.add_argument("--max-stop", type=int, default=lim.max_stop, help="stop strings (and stop token ids)")
    limits.add_argument("--max-messages", type=int, default=lim.max_messages, help="chat messages per request")
    limits.add_argument("--max-logprobs", type=int, default=lim.max_logprobs, help="top logprobs per token")
    server.add_argument("--log-level", default=s.log_level, choices=["debug", "info", "warning", "error"])
    server.add_argument("--shell", action="store_true", help="chat in this terminal instead of serving HTTP")
    server.add_argument("--shell-max-tokens", type=int, default=s.shell_max_tokens,
                        help="longest reply in the --shell chat (tokens)")
    return p


def parse_args(argv: list[str] | None = None) -> tuple[EngineArgs, ServerArgs]:
    parser = build_parser()
    a = parser.parse_args(argv)
    try:
        decode_buckets = [int(x) for x in a.decode_buckets.split(",")] if a.decode_buckets else []
    except ValueError:
        parser.error(f"--decode-buckets must be comma-separated integers, got {a.decode_buckets!r}")
    engine = EngineArgs(
        model=a.model, tokenizer=a.tokenizer, dtype=a.dtype, kv_cache_dtype=a.kv_cache_dtype,
        load_format=a.load_format, quantization=a.quantization, page_size=a.page_size,
        num_pages=a.num_pages, mem_fraction=a.mem_fraction, max_running_requests=a.max_running_requests,
        max_prefill_tokens=a.max_prefill_tokens, max_model_len=a.max_model_len, cache=a.cache,
        attention_backend=a.attention_backend, moe_backend=a.moe_backend, tp=a.tp, all_reduce=a.all_reduce, overlap=not a.no_overlap,
        decode_steps=a.decode_steps,
        burst_max_rows=a.burst_max_rows,
        moe_parallel=a.moe_parallel,
        cascade_attention=not a.no_cascade_attention, seed=a.seed,
        compile_cache_dir=a.compile_cache_dir or None, compile_workers=a.compile_workers,
        background_compile=not a.no_background_compile,
        status_interval_s=a.status_interval, decode_buckets=decode_buckets, nnodes=a.nnodes,
        max_logit_bias=a.max_logit_bias, grammar_timeout_s=a.grammar_timeout,
        node_rank=a.node_rank, coordinator=a.coordinator,
    )
    try:
        engine.validate()
    except ValueError as err:
        parser.error(str(err))
    server = ServerArgs(
        host=a.host, port=a.port, served_model_name=a.served_model_name or a.model, api_key=a.api_key or None,
        chat_template=read_chat_template(parser, a.chat_template), max_request_bytes=a.max_request_bytes,
        tool_call_parser=a.tool_call_parser, reasoning_parser=a.reasoning_parser,
        watchdog_timeout=a.watchdog_timeout, shutdown_timeout=a.shutdown_timeout, allow_origins=a.allow_origins,
        shell=a.shell, shell_max_tokens=a.shell_max_tokens, log_level=a.log_level,
        limits=RequestLimits(
            max_n=a.max_n, max_tokens=a.max_tokens_limit, max_stop=a.max_stop, max_messages=a.max_messages,
            max_logprobs=a.max_logprobs, max_queued_requests=a.max_queued_requests,
            request_timeout_s=a.request_timeout,
        ),
        replicas=a.replicas, max_restarts=a.max_restarts, router_args=split_router_args(parser, a.router_args),
    )
    try:
        server.limits.validate()
    except ValueError as err:
        parser.error(str(err))
    if server.shell_max_tokens < 1:
        parser.error(f"--shell-max-tokens must be >= 1, got {server.shell_max_tokens}")
    if not 0 < server.port < 65536:
        parser.error(f"--port must be in 1..65535, got {server.port}")
    check_replicas(parser, engine, server)
    return engine, server


def check_replicas(parser: argparse.ArgumentParser, engine: EngineArgs, server: ServerArgs) -> None:
    if server.replicas < 1:
        parser.error(f"--replicas must be >= 1, got {server.replicas}")
    if server.max_restarts < 0:
        parser.error(f"--max-restarts must be >= 0, got {server.max_restarts}")
    if server.replicas == 1:
        return
    if server.shell:
        parser.error("--shell chats with one engine in this process; it does not take --replicas")
    if engine.nnodes > 1:
        parser.error("--replicas starts servers on this host; for replicas of a multi-host server, run "
                     "sglang-router in front of several multi-host deployments (docs/deployment.md)")
    if server.port + server.replicas > 65535:
        parser.error(f"--port {server.port} + --replicas {server.replicas}: the replicas' ports (--port + 1 + i) "
                     "must be at most 65535")


def split_router_args(parser: argparse.ArgumentParser, value: str) -> list[str]:
    try:
        return shlex.split(value)
    except ValueError as err:
        parser.error(f"--router-args: {err} in {value!r}")
        return []


def read_chat_template(parser: argparse.ArgumentParser, value: str | None) -> str | None:
    if value is None:
        return None
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            return f.read()
    if "{{" in value or "{%" in value:
        return value
    parser.error(f"--chat-template: no such file {value!r}")
    return None
