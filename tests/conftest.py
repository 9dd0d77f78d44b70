"""Shared fixtures: seeding and tiny builders."""

import importlib.util
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of model tests: the machines running this suite are small and shared,
    and more threads only add contention there."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def bench_script(monkeypatch):
    """Load a script of bench/ as a module, by its file, for one test: bench/ is a folder of scripts, not a
    package, and nothing of the load (the module, the script's own sys.path line) outlives the test."""
    monkeypatch.setattr(sys, "path", list(sys.path))

    def load(name: str):
        path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(f"_bench_{name}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture(scope="session")
def tracked_files() -> list[str]:
    """The repository's git-tracked files (relative paths); skips where the tests run outside a git checkout."""
    root = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout (an installed copy): nothing to check")
    return [p for p in out.decode().split("\0") if p]
