"""Multi-host serving: every host runs the same scheduler on one global mesh.

Node 0 receives the requests; at the start of every step it broadcasts the commands it got since
the last step (new requests with their seeds, aborts, stop, and when a request's grammar has
compiled), so all hosts apply the same commands in the same order, make the same scheduling
decision, and issue the same jitted steps, whose collectives XLA runs across all GPUs. Every host
reads the same sampled tokens, so each keeps its own copy of a constrained request's grammar and
fills the same masks; only the moment a grammar is ready (compilation time varies) comes from node 0.
"""

from __future__ import annotations

import dataclasses
import logging

import jax
import msgpack
import numpy as np

from minisgl_jax.config import EngineArgs
from minisgl_jax.core import SamplingParams

logger = logging.getLogger(__name__)

ADD, ABORT, STOP, GRAMMAR = "add", "abort", "stop", "grammar"


def init_distributed(args: EngineArgs) -> None:
    """Join the jax.distributed job of `--nnodes` hosts; a no-op on one host."""
    if args.nnodes == 1:
        return
    jax.distributed.initialize(
        coordinator_address=args.coordinator, num_processes=args.nnodes, process_id=args.node_rank
    )
    logger.info("node %d of %d joined %s: %d devices in all", args.node_rank, args.nnodes, args.coordinator,
                len(jax.devices()))


class CommandChannel:
    """Node 0's commands, broadcast to every node once per step."""

    def __init__(self, is_leader: bool) -> None:
        self.is_leader = is_leader
        self._outbox: list[list] = []

    @property
    def pending(self) -> int:
        return len(self._outbox)

    def add(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        self._send([ADD, request_id, list(prompt_ids), dataclasses.asdict(params)])

    def abort(self, request_id: str) -> None:
        self._send([ABORT, request_id])

    def stop(self) -> None:
        self._send([STOP])

    def grammar_compiled(self, request_id: str, error: str | None) -> None:
        """Node 0's grammar for the request is ready (error None) or failed: every node acts on it at once."""
        self._send([GRAMMAR, request_id, error])

    def _send(self, command: list) -> None:
        if not self.is_leader:
            raise RuntimeError("only node 0 takes requests; the other nodes follow its commands")
        self._outbox.append(command)

    def exchange(self) -> list[list]:
        """Node 0's commands since the last exchange, on every node (a collective: all nodes call it)."""
        from jax.experimental import multihost_utils

        payload = msgpack.packb(self._outbox) if self._outbox else b""
        self._outbox = []
        size = int(multihost_utils.broadcast_one_to_all(np.array([len(payload)], np.int32))[0])
        if size == 0:
            return []
        buffer = np.zeros(1 << (size - 1).bit_length(), np.uint8)  # power-of-two sizes: few compiles
        buffer[: len(payload)] = np.frombuffer(payload, np.uint8)
        buffer = np.asarray(multihost_utils.broadcast_one_to_all(buffer))
        commands = msgpack.unpackb(buffer[:size].tobytes(), strict_map_key=False)
        return [c if c[0] != ADD else [ADD, c[1], c[2], SamplingParams(**c[3])] for c in commands]


def follow(engine) -> None:
    """The loop of nodes other than 0: step in lockstep with node 0 until it says stop."""
    while not engine.stopped:
        engine.step()
    logger.info("node %d stopping: node 0 said stop", engine.args.node_rank)
