"""Runs that survive what happens to real runs: a resume with new flags, an overwrite with a typo,
a damaged checkpoint, a kill in the middle of an overwrite, two copies of one command."""

from __future__ import annotations

import json
import multiprocessing
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli
from polytask.checkpoints import atomic_dir
from polytask.joint import RunConfig, run
from polytask.rundir import backup_path, check_run_dir, open_run_dir
from polytask.trainer import TrainConfig

TRAIN = ["train", "--suite", "synthetic-mmoe", "--suite-option", "num_samples=300", "--baseline", "none", "--no-progress"]


def _metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def _config(epochs: int) -> RunConfig:
    return RunConfig(suite="synthetic-mmoe", suite_options={"num_samples": 300}, baseline="none",
                     train=TrainConfig(epochs=epochs, progress=False, num_threads=1))


def test_resume_with_more_epochs_trains_them_and_equals_a_longer_run(tmp_path):
    short, long = tmp_path / "short", tmp_path / "long"
    run(_config(1), short)
    run(_config(3), long)
    run_cli("train", "--out", str(short), "--resume", "--epochs", "3", "--no-progress")
    assert _metrics(short)["epochs_trained"] == 3
    assert _metrics(short)["test"] == _metrics(long)["test"]
    a, b = load_file(str(short / "model.safetensors")), load_file(str(long / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_a_flag_that_cannot_apply_and_changes_nothing(tmp_path):
    out = tmp_path / "run"
    run(_config(1), out)
    before = (out / "metrics.json").read_bytes()
    proc = run_cli("train", "--out", str(out), "--resume", "--seed", "7", check=False)
    assert proc.returncode == 2 and "train.seed cannot change when resuming" in proc.stderr
    assert (out / "metrics.json").read_bytes() == before


def test_overwrite_with_a_typo_keeps_the_finished_run(tmp_path):
    out = tmp_path / "run"
    run(_config(1), out)
    files = sorted(p.name for p in out.iterdir())
    proc = run_cli("train", "--out", str(out), "--overwrite", "--suite", "synthtic-mmoe", check=False)
    assert proc.returncode == 2 and "did you mean 'synthetic-mmoe'" in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == files and (out / "metrics.json").exists()
    assert not backup_path(out).exists()


def test_overwrite_interrupted_before_the_first_checkpoint_puts_the_old_run_back(tmp_path):
    out = tmp_path / "run"
    run(_config(1), out)
    old = (out / "metrics.json").read_bytes()
    # what a kill leaves: the old run moved aside, the new folder without a checkpoint
    out.rename(backup_path(out))
    out.mkdir()
    (out / "config.yaml").write_text("suite: synthetic-mmoe\n")
    check_run_dir(out, resume=False, overwrite=True)
    assert (out / "metrics.json").read_bytes() == old and not backup_path(out).exists()


def test_a_damaged_latest_checkpoint_falls_back_to_the_one_before(tmp_path):
    out = tmp_path / "run"
    run(_config(3), out)
    latest = out / "checkpoints" / (out / "checkpoints" / "LATEST").read_text().strip()
    (latest / "model.safetensors").write_bytes(b"\x00" * 64)
    (out / "metrics.json").unlink()
    proc = run_cli("train", "--out", str(out), "--resume", "--no-progress")
    assert "warning: skipping damaged checkpoint" in proc.stderr and "epoch-0002" in proc.stderr
    assert _metrics(out)["epochs_trained"] == 3
    reference = tmp_path / "reference"
    run(_config(3), reference)
    assert _metrics(out)["test"] == _metrics(reference)["test"]


def test_a_missing_checkpoint_named_by_latest_falls_back(tmp_path):
    out = tmp_path / "run"
    run(_config(2), out)
    (out / "checkpoints" / "LATEST").write_text("epoch-0009\n")
    proc = run_cli("train", "--out", str(out), "--resume", "--no-progress")
    assert proc.returncode == 0 and "names a checkpoint that does not exist" in proc.stderr
    assert _metrics(out)["epochs_trained"] == 2


def test_a_second_run_on_the_same_out_is_refused_while_the_first_holds_it(tmp_path):
    out = tmp_path / "run"
    run(_config(1), out)
    with open_run_dir(out, resume=True, overwrite=False):  # this process is "the first run"
        for args in ([*TRAIN, "--epochs", "1", "--overwrite"], ["train", "--resume", "--epochs", "2"]):
            proc = run_cli(*args, "--out", str(out), check=False)
            assert proc.returncode == 2 and "another polytask process is writing to" in proc.stderr
    assert _metrics(out)["epochs_trained"] == 1
    run_cli("train", "--resume", "--epochs", "2", "--out", str(out), "--no-progress")  # free again once released
    assert _metrics(out)["epochs_trained"] == 2


def _build(target: str, value: int) -> None:
    with atomic_dir(Path(target)) as tmp:
        for i in range(20):
            (tmp / f"part-{i}.txt").write_text(str(value))
            time.sleep(0.005)


def test_two_processes_building_one_cache_folder_leave_one_complete_copy(tmp_path):
    target = tmp_path / "cache" / "suite"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_build, args=(str(target), v)) for v in (1, 2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    assert all(p.exitcode == 0 for p in procs)
    parts = sorted(target.iterdir())
    assert len(parts) == 20 and len({p.read_text() for p in parts}) == 1
    assert sorted(p.name for p in target.parent.iterdir()) == ["suite"]  # no temporary folders left


def test_checkpoints_hold_safetensors_and_json_only(tmp_path):
    out = tmp_path / "run"
    run(_config(1), out)
    folder = out / "checkpoints" / "epoch-0001"
    assert sorted(p.name for p in folder.iterdir()) == ["best.safetensors", "model.safetensors", "state.json",
                                                        "state.safetensors"]


@pytest.mark.slow
def test_killed_merge_bench_redoes_only_unfinished_runs(tmp_path):
    from test_merge_suites import TINY_CLI

    args = ["merge-bench", "--suite", "digits-merge", "--methods", "average,ties,dare", "--seeds", "2",
            "--no-progress", *TINY_CLI]
    run_cli(*args, "--out", str(tmp_path / "full"))
    killed = tmp_path / "killed"
    finished = random.Random(0).randrange(1, 4)  # a seeded point: after the 1st, 2nd or 3rd of the 6 runs
    proc = subprocess.Popen([sys.executable, "-m", "polytask", *args, "--out", str(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while (len(list(killed.glob("runs/*/seed-*/metrics.json"))) < finished and time.time() < deadline
           and proc.poll() is None):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = {p: p.stat().st_mtime_ns for p in killed.glob("runs/*/seed-*/metrics.json")}
    assert len(done) >= finished and not (killed / "metrics.json").exists()  # nothing that looks complete
    proc = run_cli(*args, "--out", str(killed), "--methods", "average,ties", check=False)
    assert proc.returncode == 2 and "other settings (methods" in proc.stderr  # not mixed with another benchmark
    run_cli(*args, "--out", str(killed))
    assert all(p.stat().st_mtime_ns == t for p, t in done.items())  # finished runs were not redone
    timing = ("seconds", "merge_seconds")
    a, b = _metrics(tmp_path / "full"), _metrics(killed)
    assert [{k: v for k, v in r.items() if k not in timing} for r in a["runs"]] == \
           [{k: v for k, v in r.items() if k not in timing} for r in b["runs"]]
    assert a["summary"] == b["summary"]


def test_the_one_pickle_read_admits_only_arrays():
    import io
    import os
    import pickle

    import numpy as np

    from polytask.data._sources import _ArrayUnpickler
    from polytask.errors import PolytaskError

    arrays = ((np.arange(6, dtype=np.float32).reshape(2, 3), np.array([1, 2])),)
    back = _ArrayUnpickler(io.BytesIO(pickle.dumps(arrays))).load()
    assert np.array_equal(back[0][0], arrays[0][0]) and np.array_equal(back[0][1], arrays[0][1])
    with pytest.raises(PolytaskError, match="not only arrays"):
        _ArrayUnpickler(io.BytesIO(pickle.dumps(os.system))).load()
