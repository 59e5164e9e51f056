"""Engine arguments: every knob of the engine, validated where it is set."""

from __future__ import annotations

from dataclasses import dataclass, field

ALL_REDUCE_MODES = ("auto", "xla", "psum", "peer")  # layers/collectives.py says what each does
ATTENTION_BACKENDS = ("reference", "pallas", "mosaic")
CACHE_KINDS = ("radix", "naive")
DTYPES = ("bfloat16", "float32")
KV_CACHE_DTYPES = ("auto", "fp8_e4m3")  # auto: the model's dtype
LOAD_FORMATS = ("auto", "dummy")
MOE_PARALLEL_MODES = ("tp", "ep")  # models/moe.py's docstring weighs the two
MOE_BACKENDS = ("auto", "ragged_dot", "pallas")  # auto: pallas on GPUs, ragged_dot elsewhere (engine/setup.py)
QUANTIZATIONS = ("fp8",)


@dataclass
class EngineArgs:
    """What `LLM(...)`, `Engine(...)` and the CLI flags configure.

    attention_backend is one name for both phases or "PREFILL,DECODE" (e.g. "reference,pallas");
    "mosaic" (prefill only, Hopper GPUs, bf16/fp16, an FP8 KV cache too) leaves decode steps on the
    Pallas kernels.
    num_pages None sizes the KV pool from mem_fraction of the device memory left after weights.
    kv_cache_dtype "fp8_e4m3" stores K/V as float8_e4m3fn, divided by the checkpoint's per-layer
    k/v scales (1.0 where it has none): twice the tokens of a bf16 pool in the same memory.
    moe_backend picks the experts' grouped GEMM of mixture-of-experts models (models/moe.py says what
    each reads).
    """

    model: str
    tokenizer: str | None = None
    dtype: str = "bfloat16"
    kv_cache_dtype: str = "auto"
    load_format: str = "auto"
    # FP8 weights: a checkpoint's format comes from its config.json (this must then agree); with
    # load_format dummy, "fp8" makes random block-wise FP8 weights (models/quantization.py).
    quantization: str | None = None
    page_size: int = 16
    num_pages: int | None = None
    mem_fraction: float = 0.85
    max_running_requests: int = 256
    max_prefill_tokens: int = 8192
    max_model_len: int | None = None
    cache: str = "radix"
    attention_backend: str = "pallas"
    moe_backend: str = "auto"
    tp: int = 1
    # Mixtures of experts under tp > 1: "tp" slices every expert over the devices, "ep" places whole
    # experts (experts / tp per device); tp until the GPU runs say which is faster (models/moe.py).
    moe_parallel: str = "tp"
    all_reduce: str = "auto"  # auto: the peer-memory kernel in decode steps on the GPUs of one process, else xla
    overlap: bool = True
    decode_steps: int = 4  # decode steps per launch of a burst: a batch of burst_max_rows or fewer, nobody waiting
    # Bursts are for host-bound steps: None means scheduler.BURST_MAX_ROWS on one GPU and every
    # batch with tp > 1, where the host's launch and bookkeeping of one step (its collectives
    # split the CUDA graphs) take about as long as the device's work (benchmarks/RESULTS.md,
    # "where the tp=2 step really goes").
    burst_max_rows: int | None = None
    cascade_attention: bool = True  # radix cache + pallas decode: shared prefixes read once per group
    seed: int = 0
    compile_cache_dir: str | None = "~/.cache/minisgl_jax/xla"
    warmup: bool = True
    # After warm-up, compile the top-k/top-p/min-p and logprobs variants of every step program in a
    # background thread, so that the first such request does not wait for them (engine/warmup.py).
    background_compile: bool = True
    compile_workers: int = 0  # buckets compiled at once at start-up; 0: one per CPU core
    status_interval_s: float = 10.0
    lpm_min_queue: int = 8
    max_logit_bias: int = 1024  # logit_bias entries per request at most (each slot holds this many on the device)
    grammar_timeout_s: float = 10.0  # a structured output's grammar compiles within this, or its request ends
    decode_buckets: list[int] = field(default_factory=list)
    nnodes: int = 1
    node_rank: int = 0
    coordinator: str | None = None  # host:port of node 0, for jax.distributed

    def validate(self) -> None:
        """Raise ValueError naming the first invalid field and the allowed values."""
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}")
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format must be one of {LOAD_FORMATS}, got {self.load_format!r}")
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be None or one of {QUANTIZATIONS}, got {self.quantization!r}")
        if self.cache not in CACHE_KINDS:
            raise ValueError(f"cache must be one of {CACHE_KINDS}, got {self.cache!r}")
        for name in self.attention_backends:
            if name not in ATTENTION_BACKENDS:
                raise ValueError(f"attention_backend must name one of {ATTENTION_BACKENDS}, got {name!r}")
        if self.moe_backend not in MOE_BACKENDS:
            raise ValueError(f"moe_backend must be one of {MOE_BACKENDS}, got {self.moe_backend!r}")
        if self.page_size < 1 or self.page_size & (self.page_size - 1):
            raise ValueError(f"page_size must be a power of two >= 1, got {self.page_size}")
        if self.num_pages is not None and self.num_pages < 2:
            raise ValueError(f"num_pages must be >= 2, got {self.num_pages}")
        if not 0.0 < self.mem_fraction <= 1.0:
            raise ValueError(f"mem_fraction must be in (0, 1], got {self.mem_fraction}")
        if self.max_running_requests < 1:
            raise ValueError(f"max_running_requests must be >= 1, got {self.max_running_requests}")
        if self.max_prefill_tokens < 1:
            raise ValueError(f"max_prefill_tokens must be >= 1, got {self.max_prefill_tokens}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if self.compile_workers < 0:
            raise ValueError(f"compile_workers must be >= 0, got {self.compile_workers}")
        if not 1 <= self.decode_steps <= 64:
            raise ValueError(f"decode_steps must be in [1, 64], got {self.decode_steps}")
        if not 0 <= self.max_logit_bias <= 1 << 20:
            raise ValueError(f"max_logit_bias must be in [0, {1 << 20}], got {self.max_logit_bias}")
        if not 0.0 < self.grammar_timeout_s <= 3600.0:
            raise ValueError(f"grammar_timeout_s must be in (0, 3600], got {self.grammar_timeout_s}")
        if self.tp < 1:
            raise ValueError(f"tp must be >= 1, got {self.tp}")
        if self.moe_parallel not in MOE_PARALLEL_MODES:
            raise ValueError(f"moe_parallel must be one of {MOE_PARALLEL_MODES}, got {self.moe_parallel!r}")
        if self.all_reduce not in ALL_REDUCE_MODES:
            raise ValueError(f"all_reduce must be one of {ALL_REDUCE_MODES}, got {self.all_reduce!r}")
        if self.burst_max_rows is not None and self.burst_max_rows < 0:
            raise ValueError(f"burst_max_rows must be >= 0 (0: no bursts), got {self.burst_max_rows}")
        if self.nnodes < 1 or not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"node_rank must be in [0, nnodes={self.nnodes}), got {self.node_rank}")
        if self.nnodes > 1 and not self.coordinator:
            raise ValueError("coordinator (host:port of node 0) is required when nnodes > 1")

    @property
    def attention_backends(self) -> tuple[str, str]:
        """(prefill backend, decode backend)."""
        names = [n.strip() for n in self.attention_backend.split(",")]
        if len(names) == 1:
            return names[0], names[0]
        if len(names) == 2:
            return names[0], names[1]
        raise ValueError(f"attention_backend must be NAME or PREFILL,DECODE, got {self.attention_backend!r}")
