"""Start the server: the worker processes, the API on uvicorn, and a clean stop of all of them.

The API process never imports JAX. It watches its children; one that dies takes the server down
with a log line naming it and a non-zero exit, and every request in flight gets an error. Children
get SIGKILL if this process dies (PR_SET_PDEATHSIG), so nothing is left behind even then.
SIGTERM or Ctrl-C drains first: new requests get 503 while those in flight get up to
--shutdown-timeout seconds to finish; then the server exits 0. With --replicas N, replicas.py starts
N such servers behind sglang-router instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import importlib
import json
import logging
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI
from minisgl_jax.server import ipc
from minisgl_jax.server.api import APIConfig, build_app
from minisgl_jax.server.cli import ServerArgs, parse_args
from minisgl_jax.server.client import EngineClient
from minisgl_jax.server.metrics import ServerMetrics
from minisgl_jax.server.tool_parsers import tool_parser_name
from minisgl_jax.server.worker_info import ModelCard

from minisgl_jax.config import EngineArgs
from minisgl_jax.models.config import bundled_config_path

logger = logging.getLogger("minisgl_jax.server")

LOG_FORMAT = "%(asctime)s %(processName)s %(levelname)s %(message)s"
PR_SET_NAME, PR_SET_PDEATHSIG = 15, 1
CHILD_STOP_S = 3.0
WORKERS = "minisgl_jax.server"


def setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT, force=True)


def child_main(level: str, target: str, *args: Any) -> None:
    """Every worker process starts here: logs like the parent, dies with it, leaves Ctrl-C to it.

    target is "module:function", imported here, so each process imports only what it uses
    (the API process neither JAX nor transformers).
    """
    setup_logging(level)
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        libc.prctl(PR_SET_NAME, f"minisgl-{multiprocessing.current_process().name}"[:15].encode())
    if os.getppid() != multiprocessing.parent_process().pid:
        sys.exit(1)  # the parent died before PR_SET_PDEATHSIG was set, which then never fires
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # At once, without the interpreter's teardown, whose last collection took over 3 s on a busy
    # host: a worker has nothing to save (the scheduler, once loaded, stops its own way).
    signal.signal(ipc.STOP_SIGNAL, lambda *_: os._exit(0))
    module, function = target.split(":")
    try:
        getattr(importlib.import_module(module), function)(*args)
    except Exception:
        logging.getLogger(__name__).exception("%s failed", multiprocessing.current_process().name)
        sys.exit(1)


class Launcher:
    def __init__(self, engine_args: EngineArgs, server_args: ServerArgs) -> None:
        self.engine_args, self.server_args = engine_args, server_args
        self.run_dir = ipc.RunDir(tempfile.mkdtemp(prefix="minisgl-jax-"))  # mode 0700
        self.exit_code = 0
        self.uvicorn: uvicorn.Server | None = None
        self.drain_deadline: float | None = None  # monotonic; set once SIGTERM or Ctrl-C arrives
        spawn = multiprocessing.get_context("spawn")
        tokenizer = (engine_args.tokenizer or engine_args.model, engine_args.load_format == "dummy",
                     model_vocab_size(engine_args.model))
        self.tool_call_parser = tool_parser_name(
            server_args.tool_call_parser, local_model_config(engine_args.model).get("model_type"))
        level = server_args.log_level
        self.children = {
            name: spawn.Process(name=name, target=child_main, args=(level, f"{WORKERS}.{name}_worker:run_{name}",
                                                                    self.run_dir.path, *args))
            for name, args in (
                ("tokenizer", (*tokenizer, server_args.chat_template, self.tool_call_parser)),
                ("detokenizer", tokenizer),
                ("scheduler", (engine_args, server_args.watchdog_timeout)),
            )
        }

    def problem(self) -> str | None:
        """Why this server cannot serve now (the API's not-ready reason), or None."""
        if self.drain_deadline is not None:
            return "the server is shutting down"
        dead = [name for name, child in self.children.items() if not child.is_alive()]
        return f"the {dead[0]} process has exited" if dead else None

    def run(self) -> int:
        a = self.server_args
        client = EngineClient(self.run_dir, ServerMetrics())
        config = APIConfig(
            served_model_name=a.served_model_name, api_key=a.api_key, max_body_bytes=a.max_request_bytes,
            watchdog_timeout_s=a.watchdog_timeout, launcher_problem=self.problem,
            allow_origins=a.allow_origins or [], limits=a.limits, model_card=self.model_card(),
            tool_call_parser=self.tool_call_parser, reasoning_parser=a.reasoning_parser,
        )
        app = build_app(client, config)
        app.router.lifespan_context = self._lifespan(client)
        for child in self.children.values():
            child.start()
        logger.info("loading %s; http://%s:%d/health answers 503 until the model is compiled; "
                    "IPC sockets in %s", self.engine_args.model, a.host, a.port, self.run_dir.path)
        self.uvicorn = DrainingServer(uvicorn.Config(
            app, host=a.host, port=a.port, log_level="warning", timeout_graceful_shutdown=a.shutdown_timeout,
        ), drain=lambda: self._start_drain(client))
        try:
            self.uvicorn.run()
        finally:
            self.stop_children()
        return self.exit_code

    def model_card(self) -> ModelCard:
        e = self.engine_args
        hf_config = local_model_config(e.model)
        return ModelCard(model_path=e.model, tokenizer_path=e.tokenizer or e.model, tp_size=e.tp,
                         model_type=hf_config.get("model_type"),
                         architectures=tuple(hf_config.get("architectures", ())))

    def _lifespan(self, client: EngineClient) -> Callable[[FastAPI], contextlib.AbstractAsyncContextManager]:
        @contextlib.asynccontextmanager
        async def lifespan(_: FastAPI) -> AsyncIterator[None]:
            tasks = [asyncio.create_task(client.receive_forever()), asyncio.create_task(self._watch(client))]
            try:
                yield
            finally:
                for task in tasks:
                    task.cancel()
                self.stop_children()

        return lifespan

    def _start_drain(self, client: EngineClient) -> None:
        self.drain_deadline = time.monotonic() + self.server_args.shutdown_timeout
        logger.info("shutting down: new requests get 503; %d in flight get up to %gs to finish",
                    len(client.queues), self.server_args.shutdown_timeout)

    async def _watch(self, client: EngineClient) -> None:
        """Report readiness once; take the server down if a child dies; end a drain once nothing
        is in flight or its time is up."""
        reported = False
        while True:
            await asyncio.sleep(0.2)
            for name, child in self.children.items():
                if not child.is_alive():
                    code = child.exitcode
                    how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
                    logger.error("the %s process %s (its last log lines are above); shutting down", name, how)
                    client.fail_all(500, f"the {name} process {how}; the server is shutting down")
                    self.exit_code = 1
                    self.uvicorn.should_exit = True
                    return
            if self.drain_deadline is not None and (not client.queues or time.monotonic() > self.drain_deadline):
                if client.queues:
                    logger.warning("%d requests did not finish within --shutdown-timeout; they end with 503",
                                   len(client.queues))
                    client.fail_all(503, "the server shut down before this request finished")
                self.uvicorn.should_exit = True
                return
            if client.ready is not None and not reported:
                reported = True
                self._report(client)

    def _report(self, client: EngineClient) -> None:
        r, a = client.ready, self.server_args
        logger.info(
            "ready in %.1fs: %s, weights %.2f GiB, KV cache %d pages x %d = %d tokens, up to %d running requests, "
            "context %d; serving on http://%s:%d (OpenAI API under /v1)",
            r.startup_seconds, a.served_model_name, r.weights_bytes / 2**30, r.kv_pages, r.page_size, r.kv_tokens,
            r.max_running_requests, r.max_model_len, a.host, a.port,
        )

    def stop_children(self) -> None:
        """Ask every child to stop, SIGKILL what is left after a few seconds; remove the run folder."""
        for child in self.children.values():
            if child.is_alive():
                os.kill(child.pid, ipc.STOP_SIGNAL)
        for child in self.children.values():
            if child.pid is not None:
                child.join(CHILD_STOP_S)
            if child.is_alive():
                logger.warning("the %s process did not stop; killing it", child.name)
                child.kill()
                child.join()
        shutil.rmtree(self.run_dir.path, ignore_errors=True)


class DrainingServer(uvicorn.Server):
    """uvicorn, but the first SIGTERM or Ctrl-C starts the launcher's drain instead of stopping
    (uvicorn would stop listening at once); a second one stops as uvicorn does."""

    def __init__(self, config: uvicorn.Config, drain: Callable[[], None]) -> None:
        super().__init__(config)
        self.drain = drain
        self.draining = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.draining:
            super().handle_exit(sig, frame)
            return
        self.draining = True
        self.drain()


def local_model_config(model: str) -> dict[str, Any]:
    """The model's config.json (or the bundled one of a hub id), or {} when neither is on this host."""
    path = os.path.join(model, "config.json") if os.path.isdir(model) else bundled_config_path(model)
    if path is None or not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def model_vocab_size(model: str) -> int:
    """The model's vocabulary size, for a fallback tokenizer."""
    return int(local_model_config(model).get("vocab_size", 259))


def run_follower(engine_args: EngineArgs) -> int:
    """A host other than node 0: the scheduler only, in lockstep with node 0's commands."""
    from minisgl_jax.engine import Engine
    from minisgl_jax.engine.multihost import follow

    follow(Engine(engine_args))
    return 0


def main(argv: list[str] | None = None) -> None:
    engine_args, server_args = parse_args(argv)
    setup_logging(server_args.log_level)
    # SIGTERM ends the process through SystemExit, so the children are always stopped; uvicorn
    # handles it while serving and raises it again once it has shut down.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        if server_args.shell:
            from minisgl_jax.server.shell import run_shell

            code = run_shell(engine_args, server_args.chat_template, server_args.shell_max_tokens)
        elif engine_args.node_rank > 0:
            code = run_follower(engine_args)
        elif server_args.replicas > 1:
            from minisgl_jax.server.replicas import ReplicaLauncher

            code = ReplicaLauncher(sys.argv[1:] if argv is None else argv, engine_args.tp, server_args).run()
        else:
            code = Launcher(engine_args, server_args).run()
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)
