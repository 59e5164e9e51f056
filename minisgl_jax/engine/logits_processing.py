"""The logits-processing stage before sampling: repetition, frequency and presence penalties,
logit_bias and min_tokens, in the order `SamplingParams` documents.

A step runs the stage only when some row of its batch asks for it (`StepKey.logits_processing`);
other batches run programs without it. The same stage applies a grammar's token mask (structured
outputs): the mask is an argument of these programs, all ones where no row is constrained. What a row needs to be penalized lives on the device, per
request slot (`ProcessingState`, part of the step's donated state): how often each token occurs in
the output so far, which tokens are in the prompt or are stop tokens, and the logit_bias entries.
The step counts its own sampled tokens into it (every step of a burst too), so neither overlap
scheduling nor bursts need the host in the loop. The host writes a slot once, when a request
takes it (`seed_chunks` -> `seed`): its prompt, its output so far (after a retraction), its stop
ids and its bias. A slot given back holds stale values until its next seeding, and only rows that
process their logits read their slot; the others read the scratch slot, which stays neutral.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from minisgl_jax.utils import cdiv

IN_PROMPT, STOP = 1, 2  # bits of ProcessingState.flags
SEED_CHUNK = 2048  # tokens per seeding call: one compiled shape, cdiv(len, SEED_CHUNK) calls per request
PROMPT, OUTPUT, STOP_ID = 1, 2, 3  # what a seeded token is (0: padding)


@jax.tree_util.register_dataclass
@dataclass
class ProcessingState:
    """Per request slot (the last: the padding rows' scratch slot, never seeded, so neutral)."""

    counts: jax.Array  # [slots, vocab] int32: occurrences of each token in the output so far
    flags: jax.Array  # [slots, vocab] int8: IN_PROMPT | STOP bits
    bias_ids: jax.Array  # [slots, width] int32: logit_bias token ids, `vocab` (dropped) when unused
    bias_values: jax.Array  # [slots, width] float32

    @staticmethod
    def zeros(slots: int, vocab: int, width: int) -> ProcessingState:
        return ProcessingState(
            counts=np.zeros((slots, vocab), np.int32), flags=np.zeros((slots, vocab), np.int8),
            bias_ids=np.full((slots, width), vocab, np.int32), bias_values=np.zeros((slots, width), np.float32),
        )

    @staticmethod
    def nbytes(slots: int, vocab: int, width: int) -> int:
        return slots * (vocab * 5 + width * 8)


@jax.tree_util.register_dataclass
@dataclass
class ProcessingArrays:
    """Per row of a step, [seqs] each; neutral values for the rows that do not process their logits."""

    slots: jax.Array  # int32: the slot whose state the row reads (the scratch slot: nothing to apply)
    presence: jax.Array  # float32, 0 when off
    frequency: jax.Array  # float32, 0 when off
    repetition: jax.Array  # float32, 1 when off
    min_tokens: jax.Array  # int32: stop tokens are impossible while the sampled token's index is below it
    counts_token: jax.Array  # int32, 1 when the sampled token is the request's next output (counted)


def process(
    logits: jax.Array, state: ProcessingState, arrays: ProcessingArrays, token_index: jax.Array, mask: jax.Array
) -> jax.Array:
    """logits [seqs, vocab] float32 -> the logits to sample from. mask [seqs, cdiv(vocab, 32)] int32:
    the grammar's allowed tokens (bit j of word i: token 32 i + j), all ones for free rows."""
    counts = state.counts[arrays.slots]
    flags = state.flags[arrays.slots]
    seen = (counts > 0) | ((flags & IN_PROMPT) != 0)
    repetition = arrays.repetition[:, None]
    logits = jnp.where(seen, jnp.where(logits < 0, logits * repetition, logits / repetition), logits)
    logits = logits - arrays.frequency[:, None] * counts - arrays.presence[:, None] * (counts > 0)
    rows = jnp.arange(logits.shape[0])[:, None]
    logits = logits.at[rows, state.bias_ids[arrays.slots]].add(state.bias_values[arrays.slots], mode="drop")
    early = (token_index < arrays.min_tokens)[:, None]
    tokens = jnp.arange(logits.shape[1], dtype=jnp.int32)
    allowed = (jax.lax.shift_right_logical(mask[:, tokens >> 5], (tokens & 31)[None, :]) & 1) != 0
    return jnp.where((early & ((flags & STOP) != 0)) | ~allowed, -jnp.inf, logits)


def count_sampled(state: ProcessingState, arrays: ProcessingArrays, ids: jax.Array) -> ProcessingState:
    """The state with each counted row's sampled token added to its slot's counts."""
    vocab = state.counts.shape[1]
    tokens = jnp.where(arrays.counts_token > 0, ids, vocab)  # out of range: dropped
    counts = state.counts.at[arrays.slots, tokens].add(1, mode="drop")
    return ProcessingState(counts, state.flags, state.bias_ids, state.bias_values)


def seed_chunks(
    slot: int, prompt_ids: list[int], output_ids: list[int], stop_ids: list[int],
    bias: dict[int, float], width: int, vocab: int,
) -> list[np.ndarray]:
    """The packed inputs of the `seed` calls that write one slot: [slot, reset, ids, kinds, bias ids,
    bias values (float32 bits)]; the first call clears the slot."""
    ids = [*prompt_ids, *output_ids, *stop_ids]
    kinds = [PROMPT] * len(prompt_ids) + [OUTPUT] * len(output_ids) + [STOP_ID] * len(stop_ids)
    bias_ids = np.full(width, vocab, np.int32)
    bias_values = np.zeros(width, np.float32)
    bias_ids[: len(bias)] = list(bias)
    bias_values[: len(bias)] = list(bias.values())
    chunks = []
    for i in range(max(1, cdiv(len(ids), SEED_CHUNK))):
        chunk_ids = np.full(SEED_CHUNK, vocab, np.int32)
        chunk_kinds = np.zeros(SEED_CHUNK, np.int32)
        part = slice(i * SEED_CHUNK, (i + 1) * SEED_CHUNK)
        chunk_ids[: len(ids[part])] = ids[part]
        chunk_kinds[: len(kinds[part])] = kinds[part]
        header = np.array([slot, i == 0], np.int32)
        chunks.append(np.concatenate([header, chunk_ids, chunk_kinds, bias_ids, bias_values.view(np.int32)]))
    return chunks


def seed(state: ProcessingState, packed: jax.Array) -> ProcessingState:
    """Write one chunk of `seed_chunks` into its slot (cleared first when the chunk says so)."""
    vocab, width = state.counts.shape[1], state.bias_ids.shape[1]
    slot, reset = packed[0], packed[1] != 0
    ids = packed[2: 2 + SEED_CHUNK]
    kinds = packed[2 + SEED_CHUNK: 2 + 2 * SEED_CHUNK]
    bias_ids = packed[2 + 2 * SEED_CHUNK: 2 + 2 * SEED_CHUNK + width]
    bias_values = jax.lax.bitcast_convert_type(packed[2 + 2 * SEED_CHUNK + width:], jnp.float32)

    def of_kind(kind: int) -> jax.Array:
        return jnp.where(kinds == kind, ids, vocab)  # others out of range: dropped

    counts = jnp.where(reset, 0, state.counts[slot]).at[of_kind(OUTPUT)].add(1, mode="drop")
    in_prompt = jnp.zeros(vocab, jnp.int8).at[of_kind(PROMPT)].set(IN_PROMPT, mode="drop")
    stop = jnp.zeros(vocab, jnp.int8).at[of_kind(STOP_ID)].set(STOP, mode="drop")
    flags = jnp.where(reset, jnp.int8(0), state.flags[slot]) | in_prompt | stop
    return ProcessingState(
        counts=state.counts.at[slot].set(counts), flags=state.flags.at[slot].set(flags),
        bias_ids=state.bias_ids.at[slot].set(bias_ids), bias_values=state.bias_values.at[slot].set(bias_values),
    )
