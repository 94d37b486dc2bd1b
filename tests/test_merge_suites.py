"""Merge suites and merge evaluation on a tiny digits-merge: deterministic cached builds, fine-tuning
gains, a task-arithmetic merge above chance, and the ``polytask merge-bench`` command end to end."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from polytask import PolytaskError
from polytask.merging import evaluate_merger, load_merge_suite
from polytask.merging.suites import base as suites_base

TINY = {"tasks": ["parity", "mirror", "invert"], "hidden": 32, "pretrain_epochs": 2, "probe_epochs": 5, "epochs": 8}
TINY_CLI = ["--suite-option", "tasks=[parity,mirror,invert]", "--suite-option", "hidden=32",
            "--suite-option", "pretrain_epochs=2", "--suite-option", "probe_epochs=5", "--suite-option", "epochs=8"]


def _hashes(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.glob("*.safetensors"))}


@pytest.fixture(scope="module")
def suite():
    return load_merge_suite("digits-merge", progress=False, **TINY)


def test_build_is_deterministic_bit_for_bit(suite, tmp_path, monkeypatch):
    monkeypatch.setenv("POLYTASK_CACHE", str(tmp_path))
    again = load_merge_suite("digits-merge", progress=False, **TINY)
    assert again.directory != suite.directory
    first, second = _hashes(suite.directory), _hashes(again.directory)
    assert set(first) == {"base.safetensors", "heads.safetensors", "data.safetensors",
                          "parity.safetensors", "mirror.safetensors", "invert.safetensors"}
    assert first == second


def test_second_load_uses_the_cache(suite, monkeypatch):
    calls = []
    monkeypatch.setattr(suites_base, "build_suite", lambda *a, **k: calls.append(a))
    mtime = (suite.directory / "parity.safetensors").stat().st_mtime_ns
    again = load_merge_suite("digits-merge", progress=False, **TINY)
    assert calls == []
    assert (suite.directory / "parity.safetensors").stat().st_mtime_ns == mtime
    assert again.meta["finetuned_accuracy"] == suite.meta["finetuned_accuracy"]


def test_finetuned_models_beat_the_base_on_their_own_task(suite):
    base = suite.load_base()
    for t in suite.tasks:
        tuned = suite.accuracy(suite.load_model(t), t)
        assert tuned == pytest.approx(suite.meta["finetuned_accuracy"][t], abs=1e-6)
        assert tuned > suite.accuracy(base, t) + 0.02
    # the task vectors differ: a model fine-tuned for the mirrored images is worse on the inverted ones
    assert suite.accuracy(suite.load_model("mirror"), "invert") < suite.accuracy(suite.load_model("invert"), "invert")


def test_task_arithmetic_merge_stays_well_above_chance(suite):
    r = evaluate_merger(suite, "task-arithmetic", seed=0)
    chance = {"parity": 0.5, "mirror": 0.1, "invert": 0.1}
    for t in suite.tasks:
        ft = suite.meta["finetuned_accuracy"][t]
        assert r["test"][t]["accuracy"] - chance[t] > 0.4 * (ft - chance[t])
        assert r["normalized_accuracy"][t] == pytest.approx(r["test"][t]["accuracy"] / suite.meta["finetuned_accuracy"][t])
    assert r["average_normalized_accuracy"] > 0.7
    assert r["tuned"]["lam"] in (0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0)


def test_harness_hands_a_merger_what_it_declares(suite):
    from polytask import MERGERS
    from polytask.merging import Merger
    from polytask.merging._data import merge_data

    class FewShot(Merger):
        needs = frozenset({"labeled"})
        data_sizes = {"small": (2, 8), "vision": (2, 8), "text": (2, 8)}

    data = merge_data(suite, FewShot, seed=0)
    assert data.model is suite.body and data.fishers is None and len(data.batches) == len(suite.tasks)
    assert all(len(task) == 2 and len(task[0]) == 2 and task[0][0].shape[0] == 8 for task in data.batches)
    assert merge_data(suite, MERGERS.get("ties"), seed=0) is None
    with pytest.raises(TypeError, match="needs must be a subset"):
        type("Bad", (Merger,), {"needs": frozenset({"labels"})})


def test_unknown_suite_and_option_are_one_line_errors():
    with pytest.raises(PolytaskError, match="unknown merge suite 'digits'.*digits-merge, vision-merge"):
        load_merge_suite("digits")
    with pytest.raises(PolytaskError, match="has no option 'epoch'"):
        load_merge_suite("digits-merge", epoch=3)


def test_merge_bench_cli_end_to_end(suite, cli, tmp_path):
    out = tmp_path / "bench"
    proc = cli("merge-bench", "--suite", "digits-merge", "--methods", "average,ties", "--seeds", "1",
               "--out", str(out), "--no-progress", *TINY_CLI)
    assert "normalised accuracy" in proc.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["route"] == "merge" and metrics["suite"] == "digits-merge"
    assert [r["method"] for r in metrics["runs"]] == ["average", "ties"]
    for r in metrics["runs"]:
        assert {"route", "suite", "method", "seed", "test", "normalized_accuracy",
                "average_normalized_accuracy"} <= set(r)
        assert set(r["test"]) == set(TINY["tasks"])
        per_run = json.loads((out / "runs" / r["method"] / "seed-0" / "metrics.json").read_text())
        assert per_run == r
    assert (out / "results.csv").read_text().startswith("method,seeds,parity,mirror,invert,average")
    assert (out / "normalized_accuracy.png").read_bytes()[:4] == b"\x89PNG"


def test_merge_bench_unknown_method_exits_2_with_one_line(cli, tmp_path):
    proc = cli("merge-bench", "--methods", "ties,magic", "--out", str(tmp_path / "x"), check=False)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "unknown merging method 'magic'" in lines[0] and "task-arithmetic" in lines[0]
    assert not (tmp_path / "x").exists()
