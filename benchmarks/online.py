"""Our server end to end: start-up time (cold, then with the compile cache), serving runs, shutdown time.

Launches `python -m minisgl_jax` itself, so the figures include everything a user waits for:

    python benchmarks/online.py --model Qwen/Qwen3-0.6B --load-format dummy \
        --run "--num-prompts 200 --input-len 128 --output-len 128" --run "--request-rate 20 --num-prompts 400"

Each --run is one benchmarks/serving.py invocation (its flags) against the running server.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time

import httpx
from report import emit  # benchmarks/report.py: the script's folder is on sys.path

HERE = os.path.dirname(os.path.abspath(__file__))


def start(args: argparse.Namespace, cache_dir: str, log_path: str) -> tuple[subprocess.Popen, float]:
    """Launch the server and wait for /health/ready; (process, seconds from launch to ready)."""
    cmd = [sys.executable, "-m", "minisgl_jax", "--model", args.model, "--load-format", args.load_format,
           "--port", str(args.port), "--compile-cache-dir", cache_dir, *shlex.split(args.server_args)]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=open(log_path, "a"), stderr=subprocess.STDOUT)
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}; see {log_path}")
        try:
            if httpx.get(f"http://127.0.0.1:{args.port}/health/ready", timeout=2).status_code == 200:
                return proc, time.perf_counter() - started
        except httpx.TransportError:
            pass
        time.sleep(0.2)


def stop(proc: subprocess.Popen) -> float:
    started = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    proc.wait(30)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="Qwen/Qwen3-0.6B")
    parser.add_argument("--load-format", default="dummy")
    parser.add_argument("--port", type=int, default=1919)
    parser.add_argument("--server-args", default="", help="more server flags, as one string")
    parser.add_argument("--run", action="append", default=[], help="serving.py flags for one run (repeatable)")
    parser.add_argument("--log", default="online_server.log")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    report: dict = {"model": args.model, "server_args": args.server_args}
    with tempfile.TemporaryDirectory(prefix="xla-cache-") as cache_dir:
        proc, report["startup_cold_s"] = start(args, cache_dir, args.log)
        try:
            for i, run_flags in enumerate(args.run):
                out = os.path.join(tempfile.gettempdir(), f"serving-{i}.json")
                cmd = [sys.executable, os.path.join(HERE, "serving.py"), "--base-url",
                       f"http://127.0.0.1:{args.port}", "--json", out, *shlex.split(run_flags)]
                subprocess.run(cmd, check=True)
                with open(out) as f:
                    report[f"run{i}"] = json.load(f)
        finally:
            report["shutdown_s"] = stop(proc)
        proc, report["startup_cached_s"] = start(args, cache_dir, args.log)
        stop(proc)
    flat = {k: v for k, v in report.items() if not isinstance(v, dict)}
    emit(flat, None)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
