"""The engine: model, KV cache and scheduler behind `add_request` / `step` / `abort_request`.

`step` dispatches the next batch before reading the previous one's tokens (overlap scheduling),
so the host's bookkeeping runs while the device computes.

A step that fails ends the requests in it with FinishReason.ERROR, and the engine goes on;
a device error, or repeated failures, raise `EngineBroken` instead (engine/step_failures.py).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import random
import time
from typing import TYPE_CHECKING

import jax.numpy as jnp
from flax import nnx

from minisgl_jax.config import EngineArgs
from minisgl_jax.core import FinishReason, RequestOutput, SamplingParams
from minisgl_jax.engine import cascade as cascade_groups
from minisgl_jax.engine import constraints, setup, warmup
from minisgl_jax.engine.batch import BatchConstants, ScheduledBatch, StepOutput, build_step_batch
from minisgl_jax.engine.buckets import Buckets
from minisgl_jax.engine.grammar_queue import GrammarQueue
from minisgl_jax.engine.logits_processing import ProcessingState
from minisgl_jax.engine.model_runner import ModelRunner, RunnerConfig
from minisgl_jax.engine.multihost import ABORT, ADD, GRAMMAR, STOP, CommandChannel
from minisgl_jax.engine.outputs import append_tokens, collect_prompt_logprobs, request_output
from minisgl_jax.engine.request import Phase, Req
from minisgl_jax.engine.request_checks import RequestLimits
from minisgl_jax.engine.scheduler import Scheduler, SchedulerConfig
from minisgl_jax.engine.status_log import StatusLog
from minisgl_jax.engine.step_failures import FailedSteps, end_with_error
from minisgl_jax.grammar import GrammarVocab, grammar_spec
from minisgl_jax.kvcache.allocator import PageAllocator, pages_for
from minisgl_jax.kvcache.prefix_cache import NaiveCache, PrefixCache
from minisgl_jax.kvcache.radix import RadixCache
from minisgl_jax.layers.attention import AttentionBackend
from minisgl_jax.layers.collectives import CollectiveBackend
from minisgl_jax.models.loader import load_model

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)


def make_prefix_cache(kind: str, allocator: PageAllocator, page_size: int) -> PrefixCache:
    return NaiveCache(allocator, page_size) if kind == "naive" else RadixCache(allocator, page_size)


class Engine:
    def __init__(self, args: EngineArgs) -> None:
        args.validate()
        self.args = args
        setup.prepare_process(args)
        self.channel = CommandChannel(is_leader=args.node_rank == 0) if args.nnodes > 1 else None
        self.stopped = False
        started = time.perf_counter()
        num_pages = self._build(args)
        self.requests: dict[str, Req] = {}
        self._finals: list[RequestOutput] = []
        self._in_flight: tuple[ScheduledBatch, StepOutput] | None = None
        self.failed_steps = FailedSteps()
        self._rng = random.Random(args.seed)
        self._arrivals = 0
        self._counters = dict(prompt_tokens=0, generation_tokens=0, steps=0, cascade_steps=0, burst_steps=0,
                              split_steps=0)
        # Seconds in step() and, of those, waiting for the device's tokens and launching the compiled
        # step: the rest is the engine's own host work. All of it but the wait must hide behind the
        # device's work for the previous step.
        self.timing = dict(step_s=0.0, wait_s=0.0, launch_s=0.0)
        self.status_log = StatusLog(args.status_interval_s)
        self.load_seconds = time.perf_counter() - started
        setup.log_loaded(args, self.load_seconds, self.weights_bytes, self.runner, num_pages)
        self.warmup_seconds = self.warmup() if args.warmup else 0.0
        self.background_compiler = None
        if args.warmup and args.background_compile:
            # A quarter of the cores: the rest stay with the engine's host work and the server.
            workers = max(1, (os.cpu_count() or 1) // 4)
            self.background_compiler = warmup.BackgroundCompiler(self, warmup.variant_programs(self), workers)

    def _build(self, args: EngineArgs) -> int:
        """Load the model, size the KV pool and build the runner, cache and scheduler; returns the KV pages."""
        hf_config, weights_dir = setup.resolve_model(args)
        self.mesh = setup.make_mesh(args.tp)
        cfg = setup.resolve_moe_backend(args, setup.resolve_quantization(args, hf_config, self.mesh), self.mesh)
        self.model_config = cfg = setup.shard_config(args, cfg)
        self.model_name = args.model
        dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
        model = load_model(cfg, weights_dir, dtype, self.mesh, dummy_seed=args.seed)
        self.weights_bytes = sum(v.get_value().nbytes for _, v in nnx.to_flat_state(nnx.state(model)))
        # The config's EOS ids; the tokenizer's only when the config names none (a fallback
        # tokenizer's ids mean nothing to the model).
        self.eos_token_ids = set(cfg.eos_token_ids) or {self.tokenizer.eos_token_id} - {None}
        self.max_model_len = args.max_model_len or cfg.max_position_embeddings
        self.page_size = args.page_size
        self.pages_per_seq = pages_for(self.max_model_len, args.page_size)
        self.logit_bias_width = max(1, args.max_logit_bias)
        processing_bytes = ProcessingState.nbytes(args.max_running_requests + 1, cfg.vocab_size, self.logit_bias_width)
        # An FP8 pool: one byte per element, so the same memory holds twice a bf16 pool's tokens.
        kv_dtype = jnp.float8_e4m3fn if args.kv_cache_dtype == "fp8_e4m3" else dtype
        num_pages = setup.plan_kv_pages(args, cfg, self.mesh, self.pages_per_seq, jnp.dtype(kv_dtype).itemsize,
                                        reserved_bytes=processing_bytes)
        prefill_backend, decode_backend = args.attention_backends
        backend = AttentionBackend(
            prefill_backend, decode_backend, sm_scale=cfg.head_dim**-0.5, mesh=self.mesh,
            dtype=dtype, head_dim=cfg.head_dim, page_size=args.page_size, kv_dtype=kv_dtype,
        )
        # Shared prefixes exist only with the radix cache; the cascade kernel is a Pallas kernel.
        cascade = args.cascade_attention and args.cache == "radix" and decode_backend == "pallas"
        self.buckets = Buckets.from_args(args, cascade)
        collectives = CollectiveBackend(args.all_reduce, self.mesh, dtype, max(self.buckets.decode), cfg.hidden_size)
        self.runner = ModelRunner(model, RunnerConfig(
            self.mesh, backend, collectives, num_pages, args.page_size, args.max_running_requests,
            self.pages_per_seq, kv_dtype, self.logit_bias_width,
        ))
        self.allocator = PageAllocator(num_pages)
        self.cache = make_prefix_cache(args.cache, self.allocator, args.page_size)
        self.scheduler = Scheduler(self.allocator, self.cache, SchedulerConfig(
            args.page_size, args.max_prefill_tokens, args.lpm_min_queue, self.buckets,
        ))
        self.limits = RequestLimits(
            cfg.vocab_size, self.max_model_len, self.allocator.num_usable, args.page_size, args.max_logit_bias,
        )
        self.grammars = GrammarQueue(self.eos_token_ids, args.grammar_timeout_s)
        self.batch_constants = BatchConstants(
            args.page_size, self.pages_per_seq, self.runner.scratch_slot, cfg.vocab_size,
        )
        return num_pages

    @functools.cached_property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """Loaded on first use: the server's scheduler process never needs it (nor transformers' import time)."""
        from minisgl_jax.tokenizer import load_tokenizer

        args = self.args
        return load_tokenizer(
            args.tokenizer or args.model, local_only=args.load_format == "dummy",
            vocab_size=self.model_config.vocab_size,
        )

    def _grammar_vocab(self) -> GrammarVocab:
        return GrammarVocab(self.tokenizer, self.model_config.vocab_size)

    # ---- requests ----------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Queue a request; raises ValueError with a user-facing message when it cannot be served."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        self.check_request(prompt_token_ids, params)
        if params.seed is None:
            params = dataclasses.replace(params, seed=self._rng.getrandbits(63))
        if self.channel is not None:
            self.channel.add(request_id, prompt_token_ids, params)  # applied by every node at the next step
        else:
            self._admit(request_id, prompt_token_ids, params)

    def check_request(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError, with the numbers, when this request can never be served."""
        self.limits.check(prompt_token_ids, params)
        spec = grammar_spec(params)
        if spec is not None:
            try:
                self.grammars.prepare(self._grammar_vocab)
            except ValueError as err:
                raise ValueError(f"{spec.field}: structured outputs are not available here: {err}") from None

    def _admit(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self._arrivals += 1
        max_new = self.limits.max_new_tokens(len(prompt_token_ids), params)
        req = Req(request_id, list(prompt_token_ids), params, params.seed, max_new, arrival=self._arrivals)
        self.requests[request_id] = req
        self._counters["prompt_tokens"] += len(prompt_token_ids)
        spec = grammar_spec(params)
        if spec is None:
            self.scheduler.add(req)
        else:  # it waits outside the scheduler until its grammar has compiled (_start_constrained)
            self.grammars.prepare(self._grammar_vocab)  # a node that follows another made none yet
            self.grammars.submit(req)

    def _start_constrained(self) -> None:
        """Queue the requests whose grammar has compiled; end those whose grammar failed to. Across
        hosts node 0 decides when, by a command every node applies (`_grammar_compiled`)."""
        if self.channel is not None and not self.channel.is_leader:
            return
        for request_id, error in self.grammars.compiled():
            if self.channel is None:
                self._grammar_compiled(request_id, error)
            else:
                self.channel.grammar_compiled(request_id, error)

    def _grammar_compiled(self, request_id: str, error: str | None) -> None:
        req = self.requests.get(request_id)
        if req is None or req not in self.grammars.waiting:
            return  # aborted meanwhile
        if self.grammars.take(req, error):
            self.scheduler.add(req)
        else:
            self._finals.append(request_output(req))

    def abort_request(self, request_id: str) -> None:
        if self.channel is not None:
            self.channel.abort(request_id)
        else:
            self._abort(request_id)

    def _abort(self, request_id: str) -> None:
        req = self.requests.get(request_id)
        if req is None or req.finished:
            return
        if self.grammars.drop(req):
            req.phase, req.finish_reason = Phase.FINISHED, FinishReason.ABORT
        else:
            self.scheduler.finish(req, FinishReason.ABORT)
        self._finals.append(request_output(req))

    def shutdown(self) -> None:
        """Stop the background compiler; multi-host: tell the other nodes to leave their follower
        loop (node 0 only)."""
        if self.background_compiler is not None:
            self.background_compiler.stop()
        if self.channel is not None:
            self.channel.stop()
            self.step()

    def _apply_commands(self) -> None:
        for command in self.channel.exchange():
            if command[0] == ADD:
                self._admit(command[1], command[2], command[3])
            elif command[0] == ABORT:
                self._abort(command[1])
            elif command[0] == STOP:
                self.stopped = True
            elif command[0] == GRAMMAR:
                self._grammar_compiled(command[1], command[2])

    def has_unfinished(self) -> bool:
        pending = self.channel.pending if self.channel is not None else 0
        return bool(self.requests) or self._in_flight is not None or pending > 0

    # ---- the loop ----------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Dispatch the next batch, then read the previous one's tokens; returns the new outputs."""
        started = time.perf_counter()
        outputs = self._step()
        self.timing["step_s"] += time.perf_counter() - started
        return outputs

    @property
    def compiling(self) -> bool:
        """Whether the step under way waits for a step program to compile: slow, not hung."""
        return self.runner.programs.compiling

    def _step(self) -> list[RequestOutput]:
        if self.channel is not None:
            self._apply_commands()
        if self.grammars.waiting:
            self._start_constrained()
        outputs, self._finals = self._finals, []
        batch = self.scheduler.schedule()
        launched = failure = None
        if batch is not None:
            try:
                launched = (batch, self._dispatch(batch, outputs))
            except Exception as error:
                failure = error
                # Nothing ran: take its positions back before the read below may release these
                # requests, so that the prefix cache receives only pages the device has written.
                for row in batch.rows:
                    row.req.kv_len = row.start
        if self._in_flight is not None:
            outputs += self._read(*self._in_flight)
        self._in_flight = launched
        if failure is not None:  # after the read: the previous batch ran before this one
            outputs += self._fail([row.req for row in batch.rows if not row.req.finished], failure, batch)
        if not self.args.overlap and self._in_flight is not None:
            outputs += self._read(*self._in_flight)
            self._in_flight = None
        for out in outputs:
            if out.finished:
                self.requests.pop(out.request_id, None)
        self.status_log.maybe_log(self.scheduler.has_work(), self.stats)
        return outputs

    def _dispatch(self, batch: ScheduledBatch, outputs: list[RequestOutput]) -> StepOutput:
        """Launch `batch`. A constrained batch's grammar masks need the tokens of the step in flight:
        its forward stage runs on the device while the host reads those (into `outputs`) and fills
        the masks; then its sample stage."""
        tokens, seqs = self.buckets.shape(batch.is_decode, len(batch.rows), batch.num_tokens)
        cascade = None
        if batch.is_decode and batch.num_steps == 1 and self.buckets.has_cascade(seqs):
            plan = cascade_groups.plan_cascade(batch.rows, self.page_size)
            if plan is not None:
                batch.rows = plan.rows  # _process reads the tokens back in this order
                cascade = (plan.prefix_lens, plan.groups)
                self._counters["cascade_steps"] += 1
        if batch.logits_processing:
            constraints.seed_slots(batch, self.runner, self.eos_token_ids, self.logit_bias_width)
        step_batch = build_step_batch(batch, tokens, seqs, self.batch_constants, cascade)
        launched = time.perf_counter()
        if batch.constrained:
            key = batch.key
            forward = self.runner.run(step_batch, key.forward_stage())
            if self._in_flight is not None:
                outputs += self._read(*self._in_flight)
                self._in_flight = None
            mask = constraints.grammar_masks(batch, seqs, self.runner.mask_words)
            out = self.runner.run(step_batch, key.sample_stage(), mask, forward.logits)
            out = dataclasses.replace(out, prompt_logprob=forward.prompt_logprob,
                                      prompt_top_ids=forward.prompt_top_ids,
                                      prompt_top_logprobs=forward.prompt_top_logprobs)
            self._counters["split_steps"] += 1
        else:
            out = self.runner.run(step_batch, batch.key)
        out.start_copy()
        self.timing["launch_s"] += time.perf_counter() - launched
        self._counters["steps"] += 1
        self._counters["burst_steps"] += batch.num_steps > 1
        return out

    def _read(self, batch: ScheduledBatch, out: StepOutput) -> list[RequestOutput]:
        """A launched step's outputs; if reading or processing its tokens fails, an error for each
        of its requests that had not finished before (the outputs of the rows before the failure
        are lost with it)."""
        pending = [row.req for row in batch.rows if not row.req.finished]
        try:
            outputs = self._process(batch, out)
        except Exception as error:
            return self._fail(pending, error, batch)
        self.failed_steps.succeeded()
        return outputs

    def _fail(self, reqs: list[Req], error: Exception, batch: ScheduledBatch) -> list[RequestOutput]:
        """End `reqs`, the requests of a failed step, with an error and give their pages back;
        raise EngineBroken when the engine cannot go on."""
        self.failed_steps.record(error, "decode" if batch.is_decode else "prefill", len(batch.rows))
        return end_with_error(reqs, error, self.scheduler.finish)

    def _process(self, batch: ScheduledBatch, out: StepOutput) -> list[RequestOutput]:
        waited = time.perf_counter()
        arrays = map(StepOutput.to_host, (out.ids, out.logprob, out.top_ids, out.top_logprobs))
        if batch.num_steps == 1:  # one step's arrays as a burst of one
            arrays = (None if a is None else a[None] for a in arrays)
        ids, logprob, top_ids, top_lps = arrays
        self.timing["wait_s"] += time.perf_counter() - waited
        if batch.key.prompt_logprobs:
            collect_prompt_logprobs(batch, out)
        outputs, taken = append_tokens(batch, ids, logprob, top_ids, top_lps, self.eos_token_ids,
                                       self.scheduler.finish)
        self._counters["generation_tokens"] += taken
        self.status_log.tokens += taken
        return outputs

    # ---- batch API ---------------------------------------------------------------------------

    def generate(
        self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]
    ) -> list[list[int]]:
        """Output token ids of each prompt, run to completion."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        ids = [f"gen-{self._arrivals + i}" for i in range(len(prompts))]
        for rid, prompt, p in zip(ids, prompts, params_list):
            self.add_request(rid, prompt, p)
        results: dict[str, list[int]] = {rid: [] for rid in ids}
        while self.has_unfinished():
            for out in self.step():
                if out.request_id in results:
                    results[out.request_id] += out.new_token_ids
        return [results[rid] for rid in ids]

    # ---- health ------------------------------------------------------------------------------

    def check_kv_invariant(self) -> None:
        self.scheduler.check_kv_invariant()

    def flush_cache(self) -> int:
        return self.cache.flush()

    def stats(self) -> dict[str, float | int]:
        return {**self.scheduler.stats(), **self._counters}

    def memory_plan(self) -> dict[str, int]:
        return dict(
            weights_bytes=self.weights_bytes,
            kv_pages=self.allocator.num_usable,
            kv_tokens=self.allocator.num_usable * self.page_size,
            page_size=self.page_size,
            max_running_requests=self.args.max_running_requests,
            max_model_len=self.max_model_len,
        )

    def warmup(self) -> float:
        """Compile every step program now ("capture"), so serving never waits on a compile; then
        freeze what start-up made, so serving never waits on a full garbage collection over it."""
        with warmup.collector_paused():
            seconds = warmup.compile_programs(self)
            try:  # the vocabulary in llguidance's form, once, before the first constrained request
                self.grammars.prepare(self._grammar_vocab)
            except ValueError as err:
                logger.warning("structured outputs are not available: %s", err)
        warmup.freeze_start_up_objects(self)
        return seconds
