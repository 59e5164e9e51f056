"""A real server process on 127.0.0.1 for the end-to-end tests: start, wait until ready, stop."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
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
    def __init__(
        self, model_dir: str, log_path: str, *extra_flags: str, compile_cache: str | None = None,
        background_compile: bool = False,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        cmd = [sys.executable, "-m", "minisgl_jax", "--model", model_dir, "--port", str(self.port), *TEST_FLAGS]
        if compile_cache:
            cmd += ["--compile-cache-dir", compile_cache]
        if background_compile:
            cmd.remove("--no-background-compile")
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd + list(extra_flags), stdout=self.log, stderr=subprocess.STDOUT,
                                     env=dict(os.environ, PYTHONUNBUFFERED="1"))

    def wait_listening(self, timeout: float = 120) -> None:
        self._wait(lambda r: r.status_code == 200, "/health", timeout)

    def wait_ready(self, timeout: float = 300) -> None:
        self._wait(lambda r: r.status_code == 200, "/health/ready", timeout)

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
