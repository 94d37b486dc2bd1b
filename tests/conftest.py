"""Shared fixtures: one thread (fast and steady for small models), a private cache dir."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="session")
def _cache_dir(tmp_path_factory: pytest.TempPathFactory) -> None:
    """One private cache per test session, shared by the pytest-xdist workers (builds are atomic)."""
    if "POLYTASK_CACHE" not in os.environ:
        root = tmp_path_factory.getbasetemp()
        shared = root.parent if "PYTEST_XDIST_WORKER" in os.environ else root
        os.environ["POLYTASK_CACHE"] = str(shared / "polytask-cache")


def run_cli(*args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run the ``polytask`` command as a user would (a fresh process)."""
    env = {**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "polytask", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"polytask {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def kill_at_checkpoint(args: list[str], out: Path, numbers: range, seed: int = 0, poll: float = 0.02) -> int:
    """Start ``polytask *args --out out`` and SIGKILL it at a seeded random point: once the checkpoint
    numbered k (``epoch-k`` / ``exp-00k``, k drawn from ``numbers``) is written. Checks that the run
    had not finished (so a resume has work left) and returns k."""
    k = random.Random(seed).choice(numbers)
    proc = subprocess.Popen([sys.executable, "-m", "polytask", *args, "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = out / "checkpoints" / "LATEST"

    def newest() -> int:
        try:
            return int(latest.read_text().strip().rsplit("-", 1)[1])
        except (OSError, ValueError, IndexError):
            return -1

    deadline = time.time() + 120
    while newest() < k and time.time() < deadline and proc.poll() is None:
        time.sleep(poll)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "metrics.json").exists(), "the run finished before it could be killed"
    return k


@pytest.fixture
def cli() -> object:
    return run_cli


REPO = Path(__file__).resolve().parents[1]


def safetensors_equal(a: Path, b: Path) -> bool:
    """Same tensors byte for byte and the same header (safetensors writes metadata keys in no fixed order)."""
    raw_a, raw_b = a.read_bytes(), b.read_bytes()
    n_a, n_b = (int.from_bytes(r[:8], "little") for r in (raw_a, raw_b))
    return json.loads(raw_a[8:8 + n_a]) == json.loads(raw_b[8:8 + n_b]) and raw_a[8 + n_a:] == raw_b[8 + n_b:]
