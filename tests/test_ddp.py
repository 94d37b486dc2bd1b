"""Two processes under torchrun (gloo) must train to the same weights as one process on the same global batch."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

WORKER = Path(__file__).with_name("ddp_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("weighting", [["ew"], ["uw"], ["pcgrad", "params"], ["cagrad", "params"],
                                       ["pcgrad", "params", "per-task"],
                                       ["ew", "-", "proportional", "accumulate=2,scheduler=cosine"]])
def test_ddp_two_processes_match_one(tmp_path, weighting):
    """Gradient methods in params mode all-reduce the per-task gradient matrix before combining it."""
    assert_two_processes_match_one(tmp_path, weighting)


def assert_two_processes_match_one(tmp_path, args: list[str]) -> None:
    """Train with the worker in 1 process and in 2 (torchrun, gloo); the weights must agree."""
    single, double = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    _run([sys.executable, str(WORKER), str(single), *args])
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
          f"--master_port={_free_port()}", str(WORKER), str(double), *args])
    a, b = load_file(str(single)), load_file(str(double))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4, msg=lambda m, k=k: f"{k}: {m}")
