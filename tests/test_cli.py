"""The polytask command end to end, as a user runs it (fresh processes)."""

import json

import pytest
from safetensors.torch import load_file

from conftest import kill_at_checkpoint, run_cli, safetensors_equal

TRAIN = ["train", "--suite", "synthetic-mmoe", "--arch", "mmoe", "--weighting", "uw", "--epochs", "2", "--seed", "0",
         "--suite-option", "num_samples=1000", "--no-progress"]


def test_list_names_the_foundation_methods():
    out = run_cli("list").stdout
    for name in ("shared-bottom", "mmoe", "ew", "uw", "synthetic-mmoe", "digits-multi"):
        assert name in out


def test_list_unknown_family_is_one_line():
    proc = run_cli("list", "nonsense", check=False)
    assert proc.returncode == 2
    assert "unknown family 'nonsense'" in proc.stderr and "Traceback" not in proc.stderr


def test_train_writes_model_config_metrics_and_eval_prints_them(tmp_path):
    out = tmp_path / "run"
    run_cli(*TRAIN, "--out", str(out))
    weights = load_file(str(out / "model.safetensors"))
    assert any(k.startswith("experts.") for k in weights)
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["test"]) == {"task1", "task2"} and isinstance(metrics["delta_m"], float)
    assert "arch: mmoe" in (out / "config.yaml").read_text()
    shown = run_cli("eval", str(out)).stdout
    assert f"{metrics['test']['task1']['mse']:.4f}" in shown


def test_config_file_and_flag_override(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("suite: synthetic-mmoe\narch: shared-bottom\nsuite_options: {num_samples: 500}\n"
                   "baseline: none\ntrain: {epochs: 1, batch_size: 64}\n")
    out = tmp_path / "run"
    run_cli("train", "--config", str(cfg), "--epochs", "2", "--out", str(out), "--no-progress")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs_trained"] == 2 and metrics["arch"] == "shared-bottom" and metrics["delta_m"] is None


@pytest.mark.parametrize("args, message", [
    (["--suite", "nope"], "unknown suite 'nope'; choose one of:"),
    (["--suite", "synthetic-mmoe", "--arch", "mmeo"], "did you mean 'mmoe'"),
    (["--suite", "synthetic-mmoe", "--weighting", "xx"], "unknown weighting 'xx'"),
    (["--suite", "synthetic-mmoe", "--arch-option", "experts=3"], "has no option 'experts'"),
    (["--suite", "synthetic-mmoe", "--suite-option", "num_samples"], "is not key=value"),
    (["--suite", "synthetic-mmoe", "--suite-option", "num_samples=0"], "num_samples must be at least 10"),
    (["--suite", "synthetic-mmoe", "--lr", "-1"], "lr must be positive"),
])
def test_bad_input_is_one_line_and_leaves_nothing(tmp_path, args, message):
    out = tmp_path / "run"
    proc = run_cli("train", *args, "--out", str(out), check=False)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_bad_yaml_and_missing_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("suite: [unclosed\n")
    proc = run_cli("train", "--config", str(bad), "--out", str(tmp_path / "o"), check=False)
    assert proc.returncode == 2 and "not valid YAML at line" in proc.stderr
    missing = tmp_path / "missing.yaml"
    missing.write_text("arch: mmoe\n")
    proc = run_cli("train", "--config", str(missing), "--out", str(tmp_path / "o"), check=False)
    assert proc.returncode == 2 and "no suite given" in proc.stderr


def test_existing_run_is_not_overwritten(tmp_path):
    out = tmp_path / "run"
    run_cli(*TRAIN, "--epochs", "1", "--baseline", "none", "--out", str(out))
    proc = run_cli(*TRAIN, "--out", str(out), check=False)
    assert proc.returncode == 2 and "--overwrite" in proc.stderr
    assert (out / "metrics.json").exists()


def test_eval_of_a_non_run_directory(tmp_path):
    proc = run_cli("eval", str(tmp_path), check=False)
    assert proc.returncode == 2 and "not a polytask run directory" in proc.stderr


def test_killed_run_resumes_to_the_same_metrics(tmp_path):
    args = ["train", "--suite", "synthetic-mmoe", "--arch", "mmoe", "--epochs", "6", "--baseline", "none",
            "--suite-option", "num_samples=6000", "--no-progress"]
    full = tmp_path / "full"
    run_cli(*args, "--out", str(full))
    killed = tmp_path / "killed"
    kill_at_checkpoint(args, killed, range(1, 4), poll=0.01)
    proc = run_cli("eval", str(killed), check=False)
    assert proc.returncode == 2 and "--resume" in proc.stderr
    run_cli("train", "--out", str(killed), "--resume", "--no-progress")
    a = json.loads((full / "metrics.json").read_text())
    b = json.loads((killed / "metrics.json").read_text())
    assert a["test"] == b["test"] and b["epochs_trained"] == 6
    assert safetensors_equal(full / "model.safetensors", killed / "model.safetensors")


@pytest.mark.parametrize("suite, options", [("penguins", []), ("wordnet", ["--suite-option", "subset=200"]),
                                            ("multi-mnist", ["--suite-option", "subset=200"])])
def test_train_runs_on_real_suites_with_default_architecture(tmp_path, suite, options):
    pytest.importorskip("transformers")  # the data extra; CI installs it
    out = tmp_path / suite
    run_cli("train", "--suite", suite, *options, "--epochs", "1", "--baseline", "none", "--no-progress", "--out", str(out))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["arch"] == "shared-bottom" and len(metrics["test"]) >= 2


def test_option_types_are_checked_before_anything_runs(tmp_path):
    out = tmp_path / "run"
    proc = run_cli("train", "--suite", "synthetic-mmoe", "--suite-option", "correlation=abc", "--out", str(out), check=False)
    assert proc.returncode == 2 and "option 'correlation' must be float" in proc.stderr and not out.exists()
    proc = run_cli("train", "--suite", "penguins", "--monitor", "species/auroc", "--out", str(out), check=False)
    assert proc.returncode == 2 and "cannot monitor 'species/auroc'" in proc.stderr and not out.exists()
