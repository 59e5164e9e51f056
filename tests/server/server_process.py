"""A real server process on 127.0.0.1 for the end-to-end tests: start, wait until ready, stop."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx

# Small enough to compile fast on CPU: 3 decode buckets and one prefill bucket.
TEST_FLAGS = [
    "--attention-backend", "reference", "--max-running-requests", "4", "--max-prefill-tokens", "64",
    "--num-pages", "96", "--page-size", "16", "--decode-buckets", "1,2,4", "--status-interval", "1000",
    "--no-background-compile",  # the tests' 2 CPU cores are better spent on the tests
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_name(pid: int) -> str:
    """The name a server process gives itself (`minisgl-scheduler` shows as `minisgl-schedul`)."""
    with open(f"/proc/{pid}/comm") as f:
        return f.read().strip()


def child_pids(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except FileNotFoundError:
        return []


def is_running(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


class ServerProcess:
    """`python -m minisgl_jax` with TEST_FLAGS, or `script` (a file that runs the same main) in its place."""

    def __init__(
        self, model_dir: str, log_path: str, *extra_flags: str, compile_cache: str | None = None,
        background_compile: bool = False, script: str | None = None,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        entry = [script] if script else ["-m", "minisgl_jax"]
        cmd = [sys.executable, *entry, "--model", model_dir, "--port", str(self.port), *TEST_FLAGS]
        if compile_cache:
            cmd += ["--compile-cache-dir", compile_cache]
        if background_compile:
            cmd.remove("--no-background-compile")
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd + list(extra_flags), stdout=self.log, stderr=subprocess.STDOUT,
                                     env=dict(os.environ, PYTHONUNBUFFERED="1"))

    def wait_listening(self, timeout: float = 120) -> None:
        self._wait(lambda r: r.status_code == 200, "/health/live", timeout)

    def wait_ready(self, timeout: float = 300) -> None:
        self._wait(lambda r: r.status_code == 200, "/health", timeout)

    def child(self, role: str) -> int:
        """The pid of the worker process of `role` (tokenizer, detokenizer, scheduler)."""
        (pid,) = [p for p in child_pids(self.proc.pid) if process_name(p) == f"minisgl-{role}"[:15]]
        return pid

    def _wait(self, done, path: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.logs()}")
            try:
                if done(httpx.get(self.url + path, timeout=5)):
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not up at {path} within {timeout}s:\n{self.logs()}")

    def logs(self) -> str:
        self.log.flush()
        with open(self.log_path) as f:
            return f.read()

    def metric(self, name: str) -> float:
        for line in httpx.get(self.url + "/metrics").text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise KeyError(name)

    def wait_idle(self, timeout: float = 10) -> None:
        """No request running or waiting, and every KV page free or held by the prefix cache, as the
        scheduler's heartbeat says; it waits two heartbeats first, so that its figures are newer
        than the caller's requests."""
        time.sleep(1.0)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            running, waiting = self.metric("minisgl_num_running_requests"), self.metric("minisgl_num_waiting_requests")
            free, cached = self.metric("minisgl_kv_pages_free"), self.metric("minisgl_kv_cached_pages")
            if running == waiting == 0 and free + cached == self.metric("minisgl_kv_pages_total") > 0:
                return
            time.sleep(0.1)
        raise TimeoutError(f"the server did not become idle with every page back within {timeout}s")

    def stop(self, timeout: float = 10) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


class BackgroundStream:
    """A streaming completion read in a thread: its status, its events (the JSON of each `data:`
    line, an error event included), and `started`, set at the first event or when it ends."""

    def __init__(self, url: str, body: dict, headers: dict | None = None) -> None:
        self.status: int | None = None
        self.events: list[dict] = []
        self.started = threading.Event()
        self.ended_at: float | None = None
        self.thread = threading.Thread(target=self._read, args=(url, body, headers or {}), daemon=True)
        self.thread.start()

    def _read(self, url: str, body: dict, headers: dict) -> None:
        try:
            with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, headers=headers,
                              timeout=60) as response:
                self.status = response.status_code
                for line in response.iter_lines():
                    if line.startswith("data: {"):
                        self.events.append(json.loads(line[len("data: "):]))
                        self.started.set()
        finally:
            self.ended_at = time.monotonic()
            self.started.set()

    def join(self, timeout: float) -> list[dict]:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"the stream did not end within {timeout}s"
        return self.events

    @property
    def finish_reason(self) -> str | None:
        """The finish reason of its last event with choices."""
        choices = [e["choices"][0] for e in self.events if e.get("choices")]
        return choices[-1]["finish_reason"] if choices else None
