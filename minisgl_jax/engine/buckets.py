"""Which step programs exist: decode and prefill buckets, the decode buckets that run bursts, and those
with a cascade-attention variant. Warm-up compiles exactly `Buckets.programs()`; the scheduler and the
engine ask here which bucket a batch runs in and whether it may burst."""

from __future__ import annotations

from dataclasses import dataclass

from minisgl_jax.config import EngineArgs

# Below 8 rows XLA turns the decode matmuls into reductions, slower than its GEMMs (RESULTS.md,
# "Batch-1 decode: buckets and CUDA graphs").
SMALLEST_DECODE_BUCKET = 8
SMALLEST_PREFILL_BUCKET = 64
# On one GPU, decode batches this small run bursts: their device step is shorter than the host's
# launch of it (RESULTS.md, "Batch-1 decode in bursts"). At tp > 1 every batch bursts by default.
BURST_MAX_ROWS = 16
CASCADE_MIN_BUCKET = 16  # decode buckets this large or larger get a cascade variant; smaller ones never group


def pad_bucket(n: int, buckets: tuple[int, ...] | list[int]) -> int:
    """The smallest bucket that holds n."""
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")


def decode_buckets(max_running: int) -> list[int]:
    """Powers of two from SMALLEST_DECODE_BUCKET up to max_running: padding rows are cheap in decode
    (no KV to read, weight-bound matmuls), so fewer buckets buy a faster start for almost nothing."""
    out, b = [], min(SMALLEST_DECODE_BUCKET, max_running)
    while b < max_running:
        out.append(b)
        b *= 2
    return out + [max_running]


def prefill_buckets(max_tokens: int, smallest: int = SMALLEST_PREFILL_BUCKET) -> list[int]:
    """Token counts of prefill steps: powers of four from `smallest`, then max_tokens."""
    out, b = [], smallest
    while b < max_tokens:
        out.append(b)
        b *= 4
    return out + [max_tokens]


@dataclass(frozen=True)
class ProgramShape:
    """One step program's padded shape: tokens and sequences, steps per launch, cascade or not."""

    is_decode: bool
    tokens: int
    seqs: int
    num_steps: int = 1
    cascade: bool = False


@dataclass(frozen=True)
class Buckets:
    decode: tuple[int, ...]
    prefill: tuple[int, ...]
    max_running: int
    decode_steps: int  # steps per launch of a burst; 1: no bursts
    burst_max_rows: int  # decode batches of at most this many rows burst; 0: none
    cascade: bool  # whether decode buckets from CASCADE_MIN_BUCKET have a cascade variant

    @classmethod
    def from_args(cls, args: EngineArgs, cascade: bool) -> Buckets:
        burst_max_rows = args.burst_max_rows
        if burst_max_rows is None:
            burst_max_rows = BURST_MAX_ROWS if args.tp == 1 else args.max_running_requests
        return cls(
            decode=tuple(args.decode_buckets or decode_buckets(args.max_running_requests)),
            prefill=tuple(prefill_buckets(args.max_prefill_tokens)), max_running=args.max_running_requests,
            decode_steps=args.decode_steps, burst_max_rows=burst_max_rows, cascade=cascade,
        )

    def shape(self, is_decode: bool, rows: int, tokens: int) -> tuple[int, int]:
        """(tokens, sequences) of the program that runs a batch of `rows` rows and `tokens` tokens."""
        if is_decode:
            size = pad_bucket(rows, self.decode)
            return size, size
        padded = pad_bucket(tokens, self.prefill)
        return padded, min(padded, self.max_running)

    def may_burst(self, rows: int) -> bool:
        """Whether a decode batch of `rows` rows may run a burst of decode_steps."""
        return self.decode_steps > 1 and rows <= self.burst_max_rows

    def has_cascade(self, seqs: int) -> bool:
        return self.cascade and seqs >= CASCADE_MIN_BUCKET

    def burst_buckets(self) -> list[int]:
        """Decode buckets that run bursts (those of batches of up to burst_max_rows rows)."""
        most = min(self.burst_max_rows, self.decode[-1])
        if self.decode_steps == 1 or most == 0:
            return []
        return sorted({pad_bucket(n, self.decode) for n in range(1, most + 1)})

    def programs(self) -> list[ProgramShape]:
        """Every step program the engine can launch: what warm-up compiles."""
        return (
            [ProgramShape(True, n, n) for n in self.decode]
            + [ProgramShape(True, n, n, cascade=True) for n in self.decode if self.has_cascade(n)]
            + [ProgramShape(True, n, n, num_steps=self.decode_steps) for n in self.burst_buckets()]
            + [ProgramShape(False, n, min(n, self.max_running)) for n in self.prefill]
        )
