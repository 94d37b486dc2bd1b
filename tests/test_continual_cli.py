"""``polytask continual`` end to end, as a user runs it (fresh processes)."""

import json

import pytest
from safetensors.torch import load_file

from conftest import kill_at_checkpoint, run_cli, safetensors_equal

ARGS = ["continual", "--scenario", "split-digits", "--seed", "0", "--no-progress"]


def test_continual_writes_metrics_matrix_plots_and_checkpoint(tmp_path):
    out = tmp_path / "run"
    proc = run_cli(*ARGS, "--strategy", "replay", "--epochs", "2", "--strategy-option", "memory=200", "--out", str(out))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["route"] == "continual" and metrics["scenario"] == "split-digits" and metrics["strategy"] == "replay"
    assert metrics["seed"] == 0 and len(metrics["accuracy_matrix"]) == 5
    for key in ("average_accuracy", "backward_transfer", "forward_transfer", "forgetting"):
        assert isinstance(metrics[key], float)
    assert f"{metrics['average_accuracy']:.4f}" in proc.stdout
    rows = (out / "accuracy_matrix.csv").read_text().strip().splitlines()
    assert len(rows) == 6 and rows[0].startswith("after,exp0")
    for png in ("accuracy_matrix.png", "accuracy_over_time.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert "heads.class.0.weight" in load_file(str(out / "model.safetensors"))
    state = load_file(str(out / "checkpoints" / "exp-004" / "state.safetensors"))
    assert state["/strategy_tensors/buffer/x"].shape == (200, 64)  # the replay memory is saved beside the weights
    assert "memory: 200" in (out / "config.yaml").read_text()


@pytest.mark.parametrize("args, message", [
    (["--strategy", "ewcc"], "did you mean 'ewc'"),
    (["--strategy", "ewc", "--scenario", "task-free-digits"], "needs experience boundaries"),
    (["--scenario-option", "setting=diagonal"], "setting 'diagonal' is unknown"),
])
def test_bad_input_is_one_line_and_leaves_nothing(tmp_path, args, message):
    out = tmp_path / "run"
    proc = run_cli(*ARGS, *args, "--out", str(out), check=False)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_metrics(tmp_path):
    args = [*ARGS, "--strategy", "der++", "--epochs", "10"]
    full = tmp_path / "full"
    run_cli(*args, "--out", str(full))
    killed = tmp_path / "killed"
    kill_at_checkpoint(args, killed, range(0, 3), poll=0.01)
    proc = run_cli(*args, "--out", str(killed), check=False)
    assert proc.returncode == 2 and "--resume" in proc.stderr
    run_cli("continual", "--out", str(killed), "--resume", "--no-progress")
    a = json.loads((full / "metrics.json").read_text())
    b = json.loads((killed / "metrics.json").read_text())
    for key in ("accuracy_matrix", "random_init_accuracy", "average_accuracy", "backward_transfer", "forgetting"):
        assert a[key] == b[key], key
    assert safetensors_equal(full / "model.safetensors", killed / "model.safetensors")
