"""One step's batch on its way to the device: the scheduler's rows (ScheduledBatch) and the static
choices they make (StepKey), their padded arrays (StepBatch), packed into one int32 vector, and
the arrays the step gives back (StepOutput)."""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from minisgl_jax.core import MAX_LOGPROBS
from minisgl_jax.layers.attention import AttentionMetadata
from minisgl_jax.engine.logits_processing import ProcessingArrays
from minisgl_jax.engine.request import Req
from minisgl_jax.engine.sampler import SAMPLE_FILTERED, SAMPLE_PLAIN, SamplingArrays


@dataclass(frozen=True)
class StepKey:
    """The static choices of one step program, as the scheduler's batch makes them. Everything
    downstream (the runner, the program cache, warm-up) takes this one key; a new static choice of
    the step (a logits-processing stage, the KV cache dtype) is a new field here."""

    is_decode: bool
    sample_mode: str = SAMPLE_PLAIN
    num_logprobs: int = 0  # 0, or MAX_LOGPROBS when some row asks for logprobs
    num_steps: int = 1  # decode steps per launch (a burst)
    logits_processing: bool = False  # some row has penalties, logit_bias or min_tokens (logits_processing.py)
    prompt_logprobs: bool = False  # prefill: some row wants its prompt tokens' logprobs (all positions' logits)
    # "full": forward and sample; a constrained batch runs "forward" (to the logits), then "sample"
    # once the host has filled its grammar masks from the tokens of the step before.
    stage: str = "full"

    def describe(self) -> str:
        phase = "decode" if self.is_decode else "prefill"
        processing = ", logits processing" if self.logits_processing else ""
        prompt = ", prompt logprobs" if self.prompt_logprobs else ""
        stage = "" if self.stage == "full" else f", {self.stage} stage"
        return (f"the {phase} program ({self.sample_mode} sampling, {self.num_logprobs} logprobs, "
                f"{self.num_steps} steps{processing}{prompt}{stage})")

    def forward_stage(self) -> StepKey:
        """The key of this step's forward half: the sampling choices do not matter to it (its batch
        still carries the logits-processing arrays, for the sample stage)."""
        return StepKey(self.is_decode, logits_processing=self.logits_processing,
                       prompt_logprobs=self.prompt_logprobs, stage="forward")

    def sample_stage(self) -> StepKey:
        return dataclasses.replace(self, prompt_logprobs=False, stage="sample")


@dataclass
class ScheduledRow:
    """One sequence of a step: `num_tokens` new tokens starting at position `start`."""

    req: Req
    start: int
    num_tokens: int
    samples: bool  # whether this row's sampled token is the request's next output
    token_index: int  # index of that output token within the request's outputs
    steps: int = 1  # decode steps (tokens) this row takes in a burst; fewer than the burst's near max_tokens


@dataclass
class ScheduledBatch:
    """A step's rows. A decode batch may run `num_steps` decode steps in one launch (a burst): each
    row then holds pages for positions start .. start + row.steps - 1 and samples row.steps tokens.
    Its static choices are computed once (the rows may be reordered, never changed): each walks
    every row, which at 256 rows costs tens of microseconds a walk."""

    rows: list[ScheduledRow]
    is_decode: bool
    num_steps: int = 1

    @property
    def num_tokens(self) -> int:
        return sum(r.num_tokens for r in self.rows)

    @functools.cached_property
    def sample_mode(self) -> str:
        filtered = any(
            r.req.params.top_k > 0 or r.req.params.top_p < 1.0 or r.req.params.min_p > 0.0
            for r in self.rows
            if r.samples and not r.req.params.greedy
        )
        return SAMPLE_FILTERED if filtered else SAMPLE_PLAIN

    @functools.cached_property
    def num_logprobs(self) -> int:
        return MAX_LOGPROBS if any(r.req.params.logprobs is not None for r in self.rows) else 0

    @functools.cached_property
    def constrained(self) -> bool:
        """Some row samples under a grammar: the host fills its mask from the tokens so far."""
        return any(r.samples and r.req.grammar is not None for r in self.rows)

    @functools.cached_property
    def logits_processing(self) -> bool:
        return self.constrained or any(r.req.processes_logits for r in self.rows)

    @functools.cached_property
    def prompt_logprobs(self) -> bool:
        return not self.is_decode and any(r.req.params.prompt_logprobs is not None for r in self.rows)

    @functools.cached_property
    def key(self) -> StepKey:
        return StepKey(self.is_decode, self.sample_mode, self.num_logprobs, self.num_steps, self.logits_processing,
                       self.prompt_logprobs)


@jax.tree_util.register_dataclass
@dataclass
class StepBatch:
    """One step's host-made inputs. tokens: T, seqs: S (bucket sizes); R = S for prefill, 0 for decode."""

    input_ids: jax.Array  # [T] int32 (ignored in decode: read from state.tokens)
    positions: jax.Array  # [T] int32
    token_slots: jax.Array  # [T] int32: request slot of each token
    attn: AttentionMetadata
    seq_slots: jax.Array  # [S] int32
    page_rows: jax.Array  # [R, pages_per_seq] int32: full page-table rows to install (prefill)
    sampling: SamplingArrays
    row_steps: jax.Array  # [S] int32: decode steps each row takes in a burst (>= 1; ignored otherwise)
    processing: ProcessingArrays | None = None  # present in the programs with the logits-processing stage
    prompt_targets: jax.Array | None = None  # [T] int32: the prompt token each position predicts (prompt logprobs)


@jax.tree_util.register_dataclass
@dataclass
class StepOutput:
    """Device arrays of one step; the host reads them after dispatching the next step."""

    ids: jax.Array  # [S]
    logprob: jax.Array | None  # [S]
    top_ids: jax.Array | None  # [S, MAX_LOGPROBS]
    top_logprobs: jax.Array | None
    logits: jax.Array | None = None  # [S, vocab] float32 of a "forward" stage, for its "sample" stage
    # With StepKey.prompt_logprobs, per token of the batch: its prediction's logprob of prompt_targets, and the top
    prompt_logprob: jax.Array | None = None  # [T]
    prompt_top_ids: jax.Array | None = None  # [T, MAX_LOGPROBS]
    prompt_top_logprobs: jax.Array | None = None

    def start_copy(self) -> None:
        for array in (self.ids, self.logprob, self.top_ids, self.top_logprobs, self.prompt_logprob,
                      self.prompt_top_ids, self.prompt_top_logprobs):
            if array is not None:
                array.copy_to_host_async()

    @staticmethod
    def to_host(array: jax.Array | None) -> np.ndarray | None:
        """The value of a replicated output, read from this host's first shard."""
        return None if array is None else np.asarray(array.addressable_data(0))


@dataclass(frozen=True)
class PackedLayout:
    """Where each array of a StepBatch lies in the one int32 vector the host sends per step.

    One transfer instead of ~15: each argument of a jitted call is its own host-to-device copy
    and its own fresh device address, which the step's CUDA graphs must then be updated for.
    """

    treedef: Any
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]


def pack_batch(batch: StepBatch) -> tuple[np.ndarray, PackedLayout]:
    """The batch's 32-bit arrays, bit-cast to int32 and concatenated."""
    leaves, treedef = jax.tree.flatten(batch)
    for leaf in leaves:
        if leaf.dtype.itemsize != 4:
            raise TypeError(f"step batch arrays must be 32-bit, got {leaf.dtype}")
    packed = np.concatenate([np.ascontiguousarray(leaf).view(np.int32).ravel() for leaf in leaves])
    layout = PackedLayout(treedef, tuple(leaf.shape for leaf in leaves), tuple(leaf.dtype.name for leaf in leaves))
    return packed, layout


def unpack_batch(packed: jax.Array, layout: PackedLayout) -> StepBatch:
    """Inverse of pack_batch, inside the jitted step (static slices and bit casts)."""
    leaves, offset = [], 0
    for shape, dtype in zip(layout.shapes, layout.dtypes):
        size = int(np.prod(shape))
        part = packed[offset:offset + size].reshape(shape)
        leaves.append(part if dtype == "int32" else jax.lax.bitcast_convert_type(part, jnp.dtype(dtype)))
        offset += size
    return jax.tree.unflatten(layout.treedef, leaves)


@dataclass(frozen=True)
class BatchConstants:
    """What every step batch of one engine shares: the page geometry, the padding rows' slot, the
    vocabulary (top-k's "off")."""

    page_size: int
    pages_per_seq: int
    scratch_slot: int
    vocab_size: int


def sampling_row(req: Req, vocab_size: int) -> tuple:
    """(temperature, top_k, top_p, min_p, seed_lo, seed_hi) of a request, computed once."""
    if req.sampling_row is None:
        p = req.params
        req.sampling_row = (
            0.0 if p.greedy else p.temperature, p.top_k if p.top_k > 0 else vocab_size, p.top_p, p.min_p,
            req.seed & 0xFFFFFFFF, (req.seed >> 32) & 0xFFFFFFFF,
        )
    return req.sampling_row


def build_step_batch(
    batch: ScheduledBatch,
    token_bucket: int,
    seq_bucket: int,
    constants: BatchConstants,
    cascade: tuple[np.ndarray, np.ndarray] | None = None,
) -> StepBatch:
    """Pad rows to (token_bucket, seq_bucket); padding tokens write into the scratch page 0.
    A decode burst's slot mapping holds each step's slots, step after step.

    cascade: (prefix_lens per row, groups) of a decode batch whose rows are in the plan's order
    (engine/cascade.py); padding rows share no prefix.
    """
    page_size, scratch_slot, vocab_size = constants.page_size, constants.scratch_slot, constants.vocab_size
    input_ids = np.zeros(token_bucket, np.int32)
    positions = np.zeros(token_bucket, np.int32)
    token_slots = np.full(token_bucket, scratch_slot, np.int32)
    slot_mapping = np.zeros(token_bucket * batch.num_steps, np.int32)  # [num_steps, tokens] flattened
    cu_q_lens = np.zeros(seq_bucket + 1, np.int32)
    kv_lens = np.zeros(seq_bucket, np.int32)
    seq_slots = np.full(seq_bucket, scratch_slot, np.int32)
    num_page_rows = 0 if batch.is_decode else seq_bucket
    page_rows = np.zeros((num_page_rows, constants.pages_per_seq), np.int32)
    temperature = np.zeros(seq_bucket, np.float32)
    top_k = np.full(seq_bucket, vocab_size, np.int32)
    top_p = np.ones(seq_bucket, np.float32)
    min_p = np.zeros(seq_bucket, np.float32)
    seed_lo = np.zeros(seq_bucket, np.uint32)
    seed_hi = np.zeros(seq_bucket, np.uint32)
    token_index = np.zeros(seq_bucket, np.int32)
    row_steps = np.ones(seq_bucket, np.int32)

    rows, n = batch.rows, len(batch.rows)
    if batch.is_decode:  # one token a row: plain Python over the rows, no per-row numpy calls
        starts = [r.start for r in rows]
        positions[:n] = starts
        token_slots[:n] = [r.req.slot for r in rows]
        for k in range(batch.num_steps):  # a row's steps past its own count write the scratch slot 0
            slot_mapping[k * token_bucket : k * token_bucket + n] = [
                r.req.pages[(s + k) // page_size] * page_size + (s + k) % page_size if k < r.steps else 0
                for r, s in zip(rows, starts)
            ]
        row_steps[:n] = [r.steps for r in rows]
        cu_q_lens[1 : n + 1] = np.arange(1, n + 1, dtype=np.int32)
        cu_q_lens[n + 1 :] = n
    else:
        t = 0
        for i, row in enumerate(rows):
            req, end = row.req, row.start + row.num_tokens
            pos = np.arange(row.start, end, dtype=np.int32)
            input_ids[t:t + row.num_tokens] = req.all_ids[row.start:end]
            page_rows[i, : len(req.pages)] = req.pages
            positions[t:t + row.num_tokens] = pos
            token_slots[t:t + row.num_tokens] = req.slot
            pages = np.asarray(req.pages, np.int32)
            slot_mapping[t:t + row.num_tokens] = pages[pos // page_size] * page_size + pos % page_size
            t += row.num_tokens
            cu_q_lens[i + 1] = t
        cu_q_lens[n + 1 :] = t
    kv_lens[:n] = [r.start + r.num_tokens for r in rows]
    seq_slots[:n] = [r.req.slot for r in rows]
    token_index[:n] = [r.token_index for r in rows]
    if n:
        columns = list(zip(*(sampling_row(r.req, vocab_size) for r in rows)))
        for array, column in zip((temperature, top_k, top_p, min_p, seed_lo, seed_hi), columns):
            array[:n] = column

    prompt_targets = None
    if batch.prompt_logprobs:
        prompt_targets = np.zeros(token_bucket, np.int32)
        t = 0
        for row in rows:  # position p predicts token p + 1, where that is still the prompt
            prompt = row.req.prompt_ids
            ends = min(row.start + row.num_tokens, len(prompt) - 1)
            prompt_targets[t:t + max(0, ends - row.start)] = prompt[row.start + 1:ends + 1]
            t += row.num_tokens
    processing = None
    if batch.logits_processing:
        processing = processing_arrays(rows, seq_bucket, scratch_slot)
    prefix_lens = groups = None
    if cascade is not None:
        prefix_lens = np.zeros(seq_bucket, np.int32)
        prefix_lens[:n] = cascade[0]
        groups = cascade[1]
    arrays = dict(
        input_ids=input_ids, positions=positions, token_slots=token_slots, seq_slots=seq_slots, page_rows=page_rows
    )
    step = StepBatch(
        **arrays,
        attn=AttentionMetadata(
            cu_q_lens=cu_q_lens,
            kv_lens=kv_lens,
            page_table=None,
            slot_mapping=slot_mapping,
            prefix_lens=prefix_lens,
            cascade_groups=groups,
        ),
        sampling=SamplingArrays(
            temperature, top_k, top_p, min_p, seed_lo, seed_hi, token_index
        ),
        row_steps=row_steps,
        processing=processing,
        prompt_targets=prompt_targets,
    )
    return step


def processing_arrays(rows: list[ScheduledRow], seq_bucket: int, scratch_slot: int) -> ProcessingArrays:
    """The rows' penalties and min_tokens; rows without logits processing read the neutral scratch slot."""
    slots = np.full(seq_bucket, scratch_slot, np.int32)
    presence = np.zeros(seq_bucket, np.float32)
    frequency = np.zeros(seq_bucket, np.float32)
    repetition = np.ones(seq_bucket, np.float32)
    min_tokens = np.zeros(seq_bucket, np.int32)
    counts_token = np.zeros(seq_bucket, np.int32)
    for i, row in enumerate(rows):
        p = row.req.params
        if p.processes_logits:
            slots[i], counts_token[i] = row.req.slot, row.samples
            presence[i], frequency[i], repetition[i] = p.presence_penalty, p.frequency_penalty, p.repetition_penalty
            min_tokens[i] = p.min_tokens
    return ProcessingArrays(slots, presence, frequency, repetition, min_tokens, counts_token)
