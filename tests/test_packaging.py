"""A non-editable install (`pip install .`, as a wheel or the GPU machine's `--target` install) ships
only the packages pyproject.toml lists: every folder of Python code in the tree must be among them (a
missing `minisgl_jax.layers` once installed an engine that could not be imported)."""

import os
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def has_python(folder: str) -> bool:
    return os.path.isdir(folder) and any(name.endswith(".py") for name in os.listdir(folder))


def test_every_package_of_the_tree_is_listed_in_pyproject():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        setuptools = tomllib.load(f)["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    folders = {name: os.path.join(ROOT, *name.split(".")) for name in listed}
    folders.update({name: os.path.join(ROOT, path) for name, path in setuptools["package-dir"].items()})
    for name, folder in folders.items():
        assert has_python(folder), f"{name} is listed but {folder} holds no Python code"
    missing = sorted(f"{name}.{entry}" for name, folder in folders.items() for entry in os.listdir(folder)
                     if has_python(os.path.join(folder, entry)) and f"{name}.{entry}" not in listed)
    assert not missing, f"packages missing from pyproject.toml's [tool.setuptools] packages: {missing}"
