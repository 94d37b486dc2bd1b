"""Shared fixtures: one thread (fast and steady for small models), a private cache dir."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="session")
def _cache_dir(tmp_path_factory: pytest.TempPathFactory) -> None:
    if "POLYTASK_CACHE" not in os.environ:
        os.environ["POLYTASK_CACHE"] = str(tmp_path_factory.mktemp("polytask-cache"))


def run_cli(*args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run the ``polytask`` command as a user would (a fresh process)."""
    env = {**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "polytask", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"polytask {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture
def cli() -> object:
    return run_cli


REPO = Path(__file__).resolve().parents[1]
