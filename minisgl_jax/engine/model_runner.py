"""The jitted step and its buckets: what CUDA-graph capture is in CUDA engines.

    step(params, kv_pool, state, batch) -> (kv_pool', state', sampled ids, logprobs)

`kv_pool` and `state` are donated, so the cache is written in place. `batch` holds small int32
arrays padded to a bucket (tokens, sequences); each bucket compiles once, decode buckets at
start-up. `state` keeps, per request slot, the last sampled token and the page-table row: the
next decode step reads its input ids from there, so the host can dispatch step N+1 before it
has read step N's tokens (overlap scheduling). It also keeps the slot's logits-processing state
(token counts, engine/logits_processing.py), which the step updates the same way.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from minisgl_jax.core import MAX_LOGPROBS
from minisgl_jax.layers.attention import AttentionBackend, AttentionMetadata
from minisgl_jax.engine.batch import PackedLayout, StepBatch, StepKey, StepOutput, pack_batch, unpack_batch
from minisgl_jax.layers.collectives import CollectiveBackend
from minisgl_jax.layers.context import ForwardContext
from minisgl_jax.engine.logits_processing import ProcessingState, count_sampled, process, seed
from minisgl_jax.engine.programs import ProgramKey, StepPrograms
from minisgl_jax.engine.sampler import prompt_logprobs, sample
from minisgl_jax.models.transformer import CausalLM, KVPool
from minisgl_jax.utils import cdiv

logger = logging.getLogger(__name__)

@jax.tree_util.register_dataclass
@dataclass
class DeviceState:
    """Per request slot (the last slot is the padding rows' scratch slot)."""

    tokens: jax.Array  # [slots] int32: last sampled token
    page_table: jax.Array  # [slots, pages_per_seq] int32
    all_reduce_seq: jax.Array  # [1] int32: the peer all-reduce kernel's next sequence number
    processing: ProcessingState  # penalties' counts and logit_bias, read and written by processing steps


@dataclass(frozen=True)
class RunnerConfig:
    mesh: Mesh
    attention: AttentionBackend
    collectives: CollectiveBackend
    num_pages: int
    page_size: int
    max_slots: int  # request slots; one more, the last, is the padding rows' scratch slot
    pages_per_seq: int
    kv_dtype: jnp.dtype  # the model's, or float8_e4m3fn (EngineArgs.kv_cache_dtype "fp8_e4m3")
    logit_bias_width: int  # logit_bias entries a slot holds at most


class ModelRunner:
    """Owns the parameters, the KV pool and the device state; runs jitted steps."""

    def __init__(self, model: CausalLM, config: RunnerConfig) -> None:
        mesh, num_pages, page_size = config.mesh, config.num_pages, config.page_size
        max_slots, pages_per_seq, kv_dtype = config.max_slots, config.pages_per_seq, config.kv_dtype
        self.mesh = mesh
        self.backend = config.attention
        self.collectives = config.collectives
        self.graphdef, params = nnx.split(model)
        # One flat list of arrays: flattening the NNX tree of Variables on every call cost host time
        # (RESULTS.md, "The step takes a flat list of parameters").
        self.params, self.params_treedef = jax.tree.flatten(params)
        cfg = model.config
        self.vocab_size = cfg.vocab_size
        self.page_size = page_size
        self.num_pages = num_pages
        self.pages_per_seq = pages_per_seq
        self.scratch_slot = max_slots  # padding rows' slot
        self.kv_dtype = jnp.dtype(kv_dtype)
        pool_shape = (cfg.num_kv_heads, num_pages, page_size, cfg.head_dim)
        pool_sharding = NamedSharding(mesh, P("tp", None, None, None))
        zeros = jax.jit(lambda: jnp.zeros(pool_shape, kv_dtype), out_shardings=pool_sharding)
        self.kv_pool: KVPool = [(zeros(), zeros()) for _ in range(cfg.num_layers)]
        self.replicated = NamedSharding(mesh, P())
        self.state = self.to_device(DeviceState(
            tokens=np.zeros(max_slots + 1, np.int32),
            page_table=np.zeros((max_slots + 1, pages_per_seq), np.int32),
            all_reduce_seq=np.ones(1, np.int32),  # never 0: the peer kernel's flags start at 0
            processing=ProcessingState.zeros(max_slots + 1, cfg.vocab_size, config.logit_bias_width),
        ))
        self._seed = jax.jit(self._seed_fn, donate_argnames=("state",))
        self.mask_words = cdiv(cfg.vocab_size, 32)
        self._open_masks: dict[int, jax.Array] = {}  # all-ones grammar masks by rows, kept on the device
        self._step = jax.jit(
            self._step_fn,
            static_argnames=("layout", "key"),
            donate_argnames=("kv_pool", "state"),
        )
        # Lowering needs only shapes and shardings (which never change), not the live, donated arrays,
        # so a background thread can lower while steps run.
        self._abstract_args = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), (self.params, self.kv_pool, self.state)
        )
        self.programs = StepPrograms(self.lower)

    def param_state(self) -> nnx.State:
        """The parameters as the model's NNX state (for inspection; the step takes the flat list)."""
        return jax.tree.unflatten(self.params_treedef, self.params)

    def _step_fn(self, params, kv_pool, state: DeviceState, packed, mask, logits, *, layout: PackedLayout,
                 key: StepKey):
        batch = unpack_batch(packed, layout)
        model = nnx.merge(self.graphdef, jax.tree.unflatten(self.params_treedef, params))
        forward = functools.partial(self._forward, model, key=key, mask=mask, given_logits=logits)
        if key.num_steps == 1:
            kv_pool, state, out = forward(kv_pool, state, batch)
        else:
            kv_pool, state, out = self._multi_step(forward, kv_pool, state, batch, key.num_steps)
        # Replicated, as it came in: the next step's program expects that (GSPMD would shard the
        # token counts over the vocabulary like the logits).
        state = dataclasses.replace(state, processing=self._replicated(state.processing))
        # Replicated outputs: every host reads the whole of them from its own first device.
        return kv_pool, state, jax.lax.with_sharding_constraint(out, self.replicated)

    def _multi_step(self, forward, kv_pool, state: DeviceState, batch: StepBatch, num_steps: int):
        """`num_steps` decode steps in one program: step k feeds on step k-1's sampled tokens (from
        `state`), one position further, into the k-th slot of each row. One launch per burst.

        A row near its max_tokens takes only its `row_steps`. In the steps after those it stands in
        the scratch slot: its K/V, page-table and token writes go to the scratch page and slot (and
        its attention reads the scratch row), so its own pages, page-table row and last token stay
        as its real steps left them; the host drops those extra tokens."""
        rows = batch.positions.shape[0]
        real = batch.attn.kv_lens > 0  # padding rows stay empty

        def substep(carry, xs):
            k, slot_mapping = xs
            active = k < batch.row_steps
            shift = jnp.minimum(k, batch.row_steps - 1)
            sub = dataclasses.replace(
                batch,
                positions=batch.positions + shift,
                token_slots=jnp.where(active, batch.token_slots, self.scratch_slot),
                seq_slots=jnp.where(active, batch.seq_slots, self.scratch_slot),
                attn=dataclasses.replace(
                    batch.attn, slot_mapping=slot_mapping, kv_lens=jnp.where(real, batch.attn.kv_lens + shift, 0)
                ),
                sampling=dataclasses.replace(batch.sampling, token_index=batch.sampling.token_index + k),
            )
            if batch.processing is not None:  # a row's steps past its own count are not its output
                sub.processing = dataclasses.replace(
                    batch.processing, counts_token=jnp.where(active, batch.processing.counts_token, 0)
                )
            kv_pool, state, out = forward(*carry, sub)
            return (kv_pool, state), out

        steps = (jnp.arange(num_steps, dtype=jnp.int32), batch.attn.slot_mapping.reshape(num_steps, rows))
        (kv_pool, state), out = jax.lax.scan(substep, (kv_pool, state), steps)
        return kv_pool, state, out  # every output gains a leading [num_steps] axis

    def _forward(self, model, kv_pool, state: DeviceState, batch: StepBatch, *, key: StepKey, mask, given_logits):
        """One step of the model on one batch: write its K/V, sample a token per sequence. Its
        "forward" stage stops at the logits; its "sample" stage starts from them (`given_logits`)."""
        if key.stage == "sample":
            collectives = self.collectives.for_step(key.is_decode, state.all_reduce_seq)
            return kv_pool, *self._sample(state, batch, given_logits, state.page_table, collectives, key, mask)
        page_size = self.page_size
        if key.is_decode:
            input_ids = state.tokens[batch.token_slots]
            page_table = state.page_table.at[batch.token_slots, batch.positions // page_size].set(
                batch.attn.slot_mapping // page_size
            )
        else:
            input_ids = batch.input_ids
            page_table = state.page_table.at[batch.seq_slots].set(batch.page_rows)
        attn = AttentionMetadata(
            cu_q_lens=batch.attn.cu_q_lens,
            kv_lens=batch.attn.kv_lens,
            page_table=page_table[batch.seq_slots],
            slot_mapping=batch.attn.slot_mapping,
            prefix_lens=batch.attn.prefix_lens,
            cascade_groups=batch.attn.cascade_groups,
        )
        collectives = self.collectives.for_step(key.is_decode, state.all_reduce_seq)
        ctx = ForwardContext(batch.positions, attn, self.backend, key.is_decode, collectives)
        hidden, kv_pool = model(input_ids, kv_pool, ctx)
        last = jnp.maximum(batch.attn.cu_q_lens[1:] - 1, 0)
        logits = model.logits(hidden[last])
        prompt = {}
        if key.prompt_logprobs:
            with jax.named_scope("prompt_logprobs"):
                chosen, top, top_lps = prompt_logprobs(model.logits, hidden, batch.prompt_targets, MAX_LOGPROBS)
            prompt = dict(prompt_logprob=chosen, prompt_top_ids=top, prompt_top_logprobs=top_lps)
        if key.stage == "forward":
            state = dataclasses.replace(state, page_table=page_table,
                                        all_reduce_seq=state.all_reduce_seq + collectives.count)
            return kv_pool, state, StepOutput(None, None, None, None, logits=logits, **prompt)
        state, out = self._sample(state, batch, logits, page_table, collectives, key, mask)
        return kv_pool, state, dataclasses.replace(out, **prompt)

    def _sample(self, state: DeviceState, batch: StepBatch, logits, page_table, collectives, key: StepKey, mask):
        """The logits-processing stage (when the key has it), sampling, and the state it leaves."""
        processing = state.processing
        sample_logits = logits
        if key.logits_processing:
            with jax.named_scope("logits_processing"):
                sample_logits = process(logits, processing, batch.processing, batch.sampling.token_index, mask)
        with jax.named_scope("sample"):
            ids, logprob, top_ids, top_logprobs = sample(
                sample_logits, batch.sampling, mode=key.sample_mode, num_logprobs=key.num_logprobs,
                collectives=collectives, model_logits=logits,
            )
        if key.logits_processing:
            processing = count_sampled(processing, batch.processing, ids)
        state = DeviceState(
            tokens=state.tokens.at[batch.seq_slots].set(ids), page_table=page_table,
            all_reduce_seq=state.all_reduce_seq + collectives.count, processing=processing,
        )
        return state, StepOutput(ids, logprob, top_ids, top_logprobs)

    def _seed_fn(self, state: DeviceState, packed: jax.Array) -> DeviceState:
        return dataclasses.replace(state, processing=self._replicated(seed(state.processing, packed)))

    def _replicated(self, tree):
        return jax.tree.map(lambda a: jax.lax.with_sharding_constraint(a, self.replicated), tree)

    def seed_slot(self, chunks: list[np.ndarray]) -> None:
        """Write a slot's logits-processing state (`logits_processing.seed_chunks`), in order with
        the steps: after those dispatched before, before those dispatched after."""
        for chunk in chunks:
            self.state = self._seed(self.state, self.to_device(chunk))

    def to_device(self, tree):
        """Host arrays as replicated arrays of the mesh. On one host jit takes numpy as it is; across
        hosts every input must be a global array, made here from each host's identical copy."""
        if jax.process_count() == 1:
            return jax.device_put(tree, self.replicated)
        return jax.tree_util.tree_map(lambda a: jax.make_array_from_process_local_data(self.replicated, a), tree)

    def run(
        self, batch: StepBatch, key: StepKey, mask: np.ndarray | None = None, logits: jax.Array | None = None
    ) -> StepOutput:
        """Launch one step (or a burst of `key.num_steps` decode steps) on a host-made batch; `mask`:
        the grammar masks of its rows ([seqs, mask_words] int32) when some row is constrained;
        `logits`: a "sample" stage's, from its "forward" stage."""
        packed, layout = pack_batch(batch)
        return self.run_packed(packed, ProgramKey(layout, key), mask, logits)

    def run_packed(
        self, packed: np.ndarray | jax.Array, program: ProgramKey, mask: np.ndarray | None = None,
        logits: jax.Array | None = None,
    ) -> StepOutput:
        """Launch the step on a packed batch, from the host or already on the device (benchmarks
        replay one device buffer to time XLA's launch without the transfer's fresh address)."""
        if jax.process_count() > 1 and isinstance(packed, np.ndarray):
            packed = self.to_device(packed)
        if program.step.logits_processing:
            mask = self._open_mask(_seqs(program)) if mask is None else self.to_device(mask)
        compiled = self.programs.compiled.get(program)
        if compiled is None:
            compiled = self.programs.get(program, packed)
        self.kv_pool, self.state, out = compiled(self.params, self.kv_pool, self.state, packed, mask, logits)
        return out

    def _open_mask(self, seqs: int) -> jax.Array:
        """Every token allowed, for `seqs` rows: made once per bucket, so free rows cost no transfer."""
        if seqs not in self._open_masks:
            self._open_masks[seqs] = self.to_device(np.full((seqs, self.mask_words), -1, np.int32))
        return self._open_masks[seqs]

    def lower(self, program: ProgramKey, packed: np.ndarray | jax.Array) -> jax.stages.Lowered:
        """Trace and lower the step program of `program` (Python, under the GIL)."""
        params, kv_pool, state = self._abstract_args
        mask = logits = None
        if program.step.logits_processing:
            mask = jax.ShapeDtypeStruct((_seqs(program), self.mask_words), jnp.int32, sharding=self.replicated)
        if program.step.stage == "sample":
            logits = jax.ShapeDtypeStruct((_seqs(program), self.vocab_size), jnp.float32, sharding=self.replicated)
        return self._step.lower(params, kv_pool, state, packed, mask, logits, layout=program.layout,
                                key=program.step)

    def lower_text(self, batch: StepBatch, key: StepKey) -> str:
        """The compiled HLO of one bucket, to check that the pool is aliased, not copied."""
        packed, layout = pack_batch(batch)
        return self.lower(ProgramKey(layout, key), packed).compile().as_text()


def _seqs(program: ProgramKey) -> int:
    """The sequence bucket of a program: its batch's rows."""
    shapes = jax.tree.unflatten(program.layout.treedef, list(program.layout.shapes))
    return shapes.seq_slots[0]
