"""Every entry point imports and prints its help from the checkout's root, as a user runs it.

Cheap, and the first thing an upstream release that breaks our imports (or a module of ours that
shadows one of its dependencies) breaks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = sorted((ROOT / "benchmarks").glob("*.py"))


def is_script(path: Path) -> bool:
    return 'if __name__ == "__main__":' in path.read_text()


def test_every_entry_point_prints_its_help():
    commands = {"python -m minisgl_jax": [sys.executable, "-m", "minisgl_jax", "--help"]}
    commands |= {f"benchmarks/{p.name}": [sys.executable, str(p.relative_to(ROOT)), "--help"] for p in BENCHMARKS}
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    procs = {name: subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True) for name, cmd in commands.items()}
    failures = []
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=300)
        is_helper = name.startswith("benchmarks/") and not is_script(ROOT / name)
        if proc.returncode != 0 or (not is_helper and "usage:" not in out):
            failures.append(f"{name} --help exited {proc.returncode}:\n{out[-2000:]}")
    assert not failures, "\n\n".join(failures)


def test_the_benchmarks_folder_has_scripts():
    assert sum(is_script(p) for p in BENCHMARKS) >= 10
