"""benchmarks/stress.py against a real server: a short mixed run passes its own checks."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from server_process import ServerProcess, child_pids

pytestmark = pytest.mark.slow  # a server of its own

STRESS = Path(__file__).resolve().parents[2] / "benchmarks" / "stress.py"


@pytest.fixture(scope="module")
def stress_server(tiny_model_dir, compile_cache, tmp_path_factory):
    log = str(tmp_path_factory.mktemp("logs") / "stress.log")
    proc = ServerProcess(tiny_model_dir, log, compile_cache=compile_cache)
    proc.wait_ready()
    yield proc
    assert proc.stop() == 0, proc.logs()


def test_a_short_stress_run_passes(stress_server, tmp_path):
    out = tmp_path / "stress.json"
    # 20 words stay far inside the tiny model's 512-token context with the byte-level fallback tokenizer.
    cmd = [sys.executable, str(STRESS), "--base-url", stress_server.url, "--duration", "8", "--clients", "8",
           "--max-tokens", "16", "--max-prompt-words", "20", "--with-timeouts", "--drain-timeout", "30",
           "--out", str(out)]
    run = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, f"{run.stdout}\n{run.stderr}\n{stress_server.logs()[-4000:]}"
    report = json.loads(out.read_text())
    assert report["completed"] > 0 and report["invalid_4xx_ok"] > 0, report
    assert report["failures"] == 0 and report["drained"] and report["kv_pages_balance"]


def test_a_short_chaos_run_loses_nothing(stress_server, tmp_path):
    """The scheduler paused and resumed under load, attack bodies in the mix: no accepted request lost,
    no 5xx, no leaked page, the same greedy canaries before and after."""
    scheduler = next(pid for pid in child_pids(stress_server.proc.pid) if process_name(pid) == "minisgl-schedul")
    out = tmp_path / "chaos.json"
    cmd = [sys.executable, str(STRESS), "--base-url", stress_server.url, "--duration", "10", "--clients", "8",
           "--max-tokens", "16", "--max-prompt-words", "20", "--chaos", "--scheduler-pid", str(scheduler),
           "--pause-every", "2", "--max-pause", "1.5", "--drain-timeout", "30", "--out", str(out)]
    run = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, f"{run.stdout}\n{run.stderr}\n{stress_server.logs()[-4000:]}"
    report = json.loads(out.read_text())
    assert report["scheduler_pauses"] >= 2 and report["accepted"] > 0 and report["invalid_4xx_ok"] > 0, report
    assert report["lost"] == 0 and report["server_errors_5xx"] == 0 and report["leaked_pages"] == 0, report
    assert report["canaries_identical"] is True, report


def process_name(pid: int) -> str:
    with open(f"/proc/{pid}/comm") as f:
        return f.read().strip()
