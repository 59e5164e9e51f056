"""No folder or module of the checkout shadows an installed distribution's import name.

`python -m pytest`, `python -m minisgl_jax` and `python benchmarks/x.py` put the checkout's root or a
script's folder at sys.path[0]; a bare `kernels/` or `benchmarks/kernels.py` there once hid Hugging
Face's `kernels` from `transformers`. Checked against what this environment has installed."""

from __future__ import annotations

import importlib.machinery
import importlib.metadata
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIPPED_DIRS = {".git", "build", "dist", "__pycache__"}


def path_folders() -> list[Path]:
    """The root and every folder a script or pytest may put on sys.path: those holding Python files
    outside a package (no `__init__.py`), as test and benchmark folders do."""
    folders = [ROOT]
    for folder in sorted(p for p in ROOT.rglob("*") if p.is_dir()):
        parts = folder.relative_to(ROOT).parts
        if any(part in SKIPPED_DIRS or part.startswith(".") or part.endswith(".egg-info") for part in parts):
            continue
        if not (folder / "__init__.py").exists() and any(folder.glob("*.py")):
            folders.append(folder)
    return folders


def inside_checkout(location: str | None) -> bool:
    return location is not None and Path(location).resolve().is_relative_to(ROOT)


def resolve(name: str, first: Path) -> importlib.machinery.ModuleSpec | None:
    """What `import name` finds with `first` at sys.path[0], the checkout's other folders off the path;
    the sys.modules cache is bypassed so names imported already are looked up afresh."""
    saved = sys.path[:]
    sys.path[:] = [str(first)] + [p for p in saved if not inside_checkout(p or ".")]
    try:
        for finder in sys.meta_path:
            find_spec = getattr(finder, "find_spec", None)
            spec = find_spec(name, None) if find_spec else None
            if spec is not None:
                return spec
        return None
    finally:
        sys.path[:] = saved


def shadowing_location(spec: importlib.machinery.ModuleSpec) -> str | None:
    if inside_checkout(spec.origin):
        return spec.origin
    return next((loc for loc in spec.submodule_search_locations or [] if inside_checkout(loc)), None)


def test_no_checkout_folder_shadows_an_installed_distribution():
    names = {name: dists for name, dists in importlib.metadata.packages_distributions().items()
             if "minisgl-jax" not in dists and name.isidentifier()}
    clashes = []
    for folder in path_folders():
        for name, dists in sorted(names.items()):
            spec = resolve(name, folder)
            where = spec and shadowing_location(spec)
            if where:
                clashes.append(f"{', '.join(sorted(set(dists)))} (import name {name!r}) resolves to {where} "
                               f"when {folder.relative_to(ROOT) or '.'} is sys.path[0]")
    assert not clashes, "the checkout shadows installed distributions:\n" + "\n".join(clashes)


def test_the_check_sees_a_module_that_would_shadow(tmp_path, monkeypatch):
    """The check itself can fail: a module named like an installed distribution, in a folder of ours,
    is reported (here `pytest.py` in a throwaway folder treated as the checkout)."""
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (tmp_path / "pytest.py").write_text("")
    spec = resolve("pytest", tmp_path)
    assert spec is not None and shadowing_location(spec) == str(tmp_path / "pytest.py")
