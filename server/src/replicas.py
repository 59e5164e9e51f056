"""`python -m minisgl_jax --replicas N ...`: N servers, each on GPUs of its own, behind sglang-router.

Replica i is this same command with --replicas 1, listening on 127.0.0.1 at --port + 1 + i, with
CUDA_VISIBLE_DEVICES set to its --tp GPUs. The router (`python -m sglang_router.launch_router`,
cache-aware) listens on --host:--port, so requests that share a prefix reach the replica whose radix
cache holds it. A replica that dies is logged and restarted on its port; the router leaves it out
until its /health answers again, and requests in flight on it end with the router's error. Past
--max-restarts, or if the router dies, everything stops and the launch exits 1. SIGTERM or Ctrl-C
stops the router and drains every replica (--shutdown-timeout), then exits 0; a second one kills.

Every child runs in a session of its own (a Ctrl-C in the terminal reaches this process only, which
stops the children once) and dies with this process (PR_SET_PDEATHSIG), so none is left behind.
"""

from __future__ import annotations

import ctypes
import glob
import importlib.util
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from types import FrameType
from typing import IO

from minisgl_jax.server.cli import ServerArgs

logger = logging.getLogger("minisgl_jax.server")

ROUTER_MODULE = "sglang_router.launch_router"
# The router checks a worker every 60 s by default; a dead replica should leave the rotation within
# seconds, and a restarted one rejoin as soon as it answers. Its per-request log lines stay off.
ROUTER_DEFAULTS = ["--policy", "cache_aware", "--health-check-interval-secs", "2", "--health-failure-threshold", "2",
                   "--health-success-threshold", "1", "--log-level", "warn"]
POLL_S = 0.5
STOP_MARGIN_S = 5.0  # beyond --shutdown-timeout: a replica's workers take up to 3 s to stop after its drain
PR_SET_PDEATHSIG = 1
LIBC = ctypes.CDLL("libc.so.6", use_errno=True)  # loaded here: the child must not load libraries before exec


def die_with_parent() -> None:
    """Run in each child between fork and exec: SIGKILL it when this process dies."""
    LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def relay(stream: IO[bytes], name: str) -> None:
    """Copy a child's output to ours, each line prefixed with the child's name."""
    prefix = f"[{name}] ".encode()
    for line in iter(stream.readline, b""):
        sys.stdout.buffer.write(prefix + line)  # one write a line: lines of two children never mix
        sys.stdout.flush()


@dataclass
class Child:
    """A process this launcher starts, restarts and stops: a replica or the router."""

    name: str
    command: list[str]
    env: dict[str, str]
    url: str
    proc: subprocess.Popen | None = None
    restarts: int = 0
    ready: bool = False

    def start(self) -> None:
        self.proc = subprocess.Popen(self.command, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     start_new_session=True, preexec_fn=die_with_parent)
        self.ready = False
        threading.Thread(target=relay, args=(self.proc.stdout, self.name), daemon=True).start()

    def exited(self) -> str | None:
        """How the process ended ("exited with code 1", "was killed by signal 9"), or None while it runs."""
        code = self.proc.poll()
        if code is None:
            return None
        return f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"

    def answers_health(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=1) as response:
                return response.status == 200
        except (OSError, urllib.error.URLError):
            return False


def gpu_groups(replicas: int, tp: int) -> list[str] | None:
    """Each replica's CUDA_VISIBLE_DEVICES: consecutive slices of --tp of the GPUs that
    CUDA_VISIBLE_DEVICES names, else of this host's. None on a host without NVIDIA GPUs."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    devices = visible.split(",") if visible else [str(i) for i in range(len(glob.glob("/dev/nvidia[0-9]*")))]
    if not devices:
        return None
    if len(devices) < replicas * tp:
        where = f"CUDA_VISIBLE_DEVICES={visible}" if visible else "this host"
        raise ValueError(f"--replicas {replicas} x --tp {tp} needs {replicas * tp} GPUs; {where} has {len(devices)}")
    return [",".join(devices[i * tp:(i + 1) * tp]) for i in range(replicas)]


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class ReplicaLauncher:
    argv: list[str]  # the command line given, less the program: each replica runs it again
    tp: int
    server_args: ServerArgs
    signals: int = 0
    replicas: list[Child] = field(default_factory=list)
    router: Child | None = None

    def build(self) -> None:
        """The children's commands; ValueError naming the problem where they cannot run here."""
        a = self.server_args
        if importlib.util.find_spec("sglang_router") is None:
            raise ValueError("--replicas needs sglang-router: pip install 'minisgl-jax[router]'")
        groups = gpu_groups(a.replicas, self.tp)
        for i in range(a.replicas):
            port = a.port + 1 + i
            if port_in_use(port):
                raise ValueError(f"replica {i}'s port {port} (--port + 1 + {i}) is in use")
            env = dict(os.environ) if groups is None else dict(os.environ, CUDA_VISIBLE_DEVICES=groups[i])
            command = [sys.executable, "-m", "minisgl_jax", *self.argv, "--replicas", "1", "--host", "127.0.0.1",
                       "--port", str(port)]  # the last of a flag given twice wins
            self.replicas.append(Child(f"replica {i}", command, env, f"http://127.0.0.1:{port}"))
        router = [sys.executable, "-m", ROUTER_MODULE, "--host", a.host, "--port", str(a.port),
                  "--worker-urls", *(r.url for r in self.replicas), *ROUTER_DEFAULTS,
                  "--shutdown-grace-period-secs", str(math.ceil(a.shutdown_timeout))]
        if a.api_key:  # the router asks it of clients and gives it to the replicas
            router += ["--api-key", a.api_key]
        self.router = Child("router", router + a.router_args, dict(os.environ), f"http://{a.host}:{a.port}")

    def run(self) -> int:
        try:
            self.build()
        except ValueError as err:
            logger.error("%s", err)
            return 2
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self.on_signal)
        children = [*self.replicas, self.router]
        try:
            for child in children:
                child.start()
            logger.info("%d replicas loading on ports %s; the router serves on %s once they answer /health",
                        len(self.replicas), ", ".join(r.url.rsplit(":", 1)[1] for r in self.replicas),
                        self.router.url)
            code = None
            while code is None and not self.signals:
                time.sleep(POLL_S)
                code = self.check()
        finally:
            self.stop(children)
        return code or 0

    def on_signal(self, sig: int, frame: FrameType | None) -> None:
        self.signals += 1

    def check(self) -> int | None:
        """Restart a replica that died; the exit code if the launch must end."""
        how = self.router.exited()
        if how is not None:
            logger.error("the router %s; stopping the replicas", how)
            return 1
        for replica in self.replicas:
            how = replica.exited()
            if how is None:
                if not replica.ready and replica.answers_health():
                    replica.ready = True
                    logger.info("%s is ready at %s", replica.name, replica.url)
                    if all(r.ready for r in self.replicas):
                        logger.info("all %d replicas ready; the router on %s (OpenAI API under /v1) adds each "
                                    "once its health check passes", len(self.replicas), self.router.url)
                continue
            gpus = replica.env.get("CUDA_VISIBLE_DEVICES", "none")
            if replica.restarts == self.server_args.max_restarts:
                logger.error("%s (%s, GPUs %s) %s and has been restarted %d times (--max-restarts); stopping",
                             replica.name, replica.url, gpus, how, replica.restarts)
                return 1
            replica.restarts += 1
            logger.warning("%s (%s, GPUs %s) %s; restarting it (restart %d of %d)", replica.name, replica.url,
                           gpus, how, replica.restarts, self.server_args.max_restarts)
            replica.start()  # its workers have died with it (PR_SET_PDEATHSIG), freeing its GPUs
        return None

    def stop(self, children: list[Child]) -> None:
        """SIGTERM every child (the replicas drain); SIGKILL what is left after the drain's time, or at
        a second signal."""
        running = [c for c in children if c.proc is not None and c.proc.poll() is None]
        for child in running:
            child.proc.send_signal(signal.SIGTERM)
        signals = self.signals
        deadline = time.monotonic() + self.server_args.shutdown_timeout + STOP_MARGIN_S
        while any(c.proc.poll() is None for c in running) and time.monotonic() < deadline and self.signals == signals:
            time.sleep(0.1)
        for child in running:
            if child.proc.poll() is None:
                logger.warning("%s did not stop; killing it", child.name)
                child.proc.kill()  # the workers of a replica die with it (PR_SET_PDEATHSIG)
            child.proc.wait()
