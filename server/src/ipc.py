"""ZeroMQ plumbing between the server's processes: ipc:// sockets in a private run folder.

Each process binds one PULL socket, its inbox, and PUSHes to the inboxes of the others. The
folder is made by `tempfile.mkdtemp` (mode 0700), so no other user can connect; nothing listens
on TCP.
"""

from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass
from typing import Any

import zmq
from minisgl_jax.server import messages

logger = logging.getLogger(__name__)

PROCESSES = ("api", "tokenizer", "scheduler", "detokenizer")
# The launcher stops its children with this signal; they ignore SIGINT and SIGTERM, which a
# terminal or a process supervisor may send to the whole process group, and leave those to it.
STOP_SIGNAL = signal.SIGUSR1


@dataclass(frozen=True)
class RunDir:
    path: str

    def address(self, process: str) -> str:
        """The ipc:// address of `process`'s inbox."""
        if process not in PROCESSES:
            raise ValueError(f"no inbox for process {process!r}")
        return f"ipc://{os.path.join(self.path, process)}.sock"


def bind_inbox(context: zmq.Context, run_dir: RunDir, process: str) -> zmq.Socket:
    socket = context.socket(zmq.PULL)
    socket.setsockopt(zmq.LINGER, 0)
    socket.bind(run_dir.address(process))
    return socket


def connect_outbox(context: zmq.Context, run_dir: RunDir, process: str) -> zmq.Socket:
    socket = context.socket(zmq.PUSH)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(run_dir.address(process))
    return socket


def send(socket: zmq.Socket, message: Any) -> None:
    socket.send(messages.encode(message), copy=False)


def receive_all(socket: zmq.Socket, timeout_ms: int) -> list[Any]:
    """Every message waiting in the inbox, after waiting up to timeout_ms for the first.

    A message that does not decode is logged and dropped: the process keeps serving.
    """
    received = []
    if not socket.poll(timeout_ms):
        return received
    while True:
        try:
            data = socket.recv(zmq.NOBLOCK)
        except zmq.Again:
            return received
        try:
            received.append(messages.decode(data))
        except messages.MessageError as err:
            logger.warning("dropped a malformed message (%d bytes): %s", len(data), err)
