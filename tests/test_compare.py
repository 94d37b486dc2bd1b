"""polytask compare: one suite read by every route, the report's arithmetic, resumable cells, bad input."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from conftest import run_cli
from polytask.comparison import CompareConfig, compare, parse_methods
from polytask.comparison.report import score, summarize
from polytask.errors import PolytaskError

SMALL = {"joint": ["shared-bottom+ew"], "continual": ["finetune"], "merge": ["task-arithmetic"]}


def test_normalisation_and_delta_m_by_hand():
    ceiling = {"x": 0.8, "y": 0.5}
    cell = {"route": "merge", "method": "ties", "seed": 0, "accuracy": {"x": 0.6, "y": 0.5}, "data_access": "none"}
    s = score(cell, ceiling)
    assert s["normalized"] == pytest.approx({"x": 0.75, "y": 1.0})
    assert s["average_normalized"] == pytest.approx(0.875)
    assert s["average_accuracy"] == pytest.approx(0.55)
    assert s["delta_m"] == pytest.approx(100 * ((0.6 - 0.8) / 0.8 + 0) / 2)  # -12.5
    other = {**cell, "seed": 1, "accuracy": {"x": 0.8, "y": 0.25}, "train_seconds": 2.0}
    (row,) = summarize([cell, other], ceiling)
    assert row["seeds"] == 2 and row["average_normalized"] == pytest.approx((0.875 + 0.75) / 2)
    assert row["average_normalized_std"] == pytest.approx(0.0625)
    assert row["train_seconds"] == pytest.approx(2.0)  # the mean of the seeds that report it


def test_method_lists_parse_by_route():
    assert parse_methods("joint:mmoe+uw, merge:ties,merge:atlas") == {"joint": ["mmoe+uw"], "merge": ["ties", "atlas"]}
    with pytest.raises(PolytaskError, match="ROUTE:METHOD"):
        parse_methods("ties")


@pytest.mark.slow
def test_one_suite_is_read_by_all_three_routes(tmp_path):
    payload = compare(CompareConfig(suite="digits-merge", methods=SMALL, epochs=1), tmp_path)
    rows = {(r["route"], r["method"]): r for r in payload["summary"]}
    assert set(rows) == {("reference", "individual"), ("reference", "probe"), ("joint", "shared-bottom+ew"),
                         ("continual", "finetune"), ("merge", "task-arithmetic")}
    tasks = payload["tasks"]
    assert len(tasks) == 6
    assert rows["reference", "individual"]["average_normalized"] == pytest.approx(1.0)
    assert rows["reference", "probe"]["accuracy"] == pytest.approx(payload["floor"])
    for row in rows.values():
        assert set(row["accuracy"]) == set(tasks) and all(0 <= a <= 1 for a in row["accuracy"].values())
    # costs: one model for joint/continual/merge; T bodies for the individual models
    assert rows["joint", "shared-bottom+ew"]["stored_parameters"] == rows["merge", "task-arithmetic"]["stored_parameters"]
    assert rows["reference", "individual"]["stored_parameters"] > 5 * rows["merge", "task-arithmetic"]["stored_parameters"]
    # the same budget: one epoch over every task's data, whether all at once or one task after another
    steps = rows["joint", "shared-bottom+ew"]["gradient_steps"], rows["continual", "finetune"]["gradient_steps"]
    assert abs(steps[0] - steps[1]) <= len(tasks)
    for name in ("report.md", "report.json", "results.csv", "pareto_cost.png", "pareto_params.png", "per_task.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert len((tmp_path / "results.csv").read_text().splitlines()) == 1 + 5


def test_trained_routes_start_from_the_builds_own_linear_probes():
    """LP-FT for every route: before training, body + probe heads score exactly the recorded floor."""
    from polytask import ARCHITECTURES
    from polytask.comparison.cells import with_probe_heads
    from polytask.comparison.suite import comparison_suite
    from polytask.merging import load_merge_suite
    from polytask.trainer import evaluate_model

    suite = comparison_suite(load_merge_suite("digits-merge", progress=False))
    model = ARCHITECTURES.create("shared-bottom", suite.suite.tasks, suite.suite.input_spec, backbone=suite.body(),
                                 bottom=[], tower=[])
    res = evaluate_model(with_probe_heads(model, suite), suite.suite.tasks, suite.suite.test, 256)
    assert {t: r["accuracy"] for t, r in res.items()} == pytest.approx(suite.reference("probe"), abs=1e-6)


@pytest.mark.parametrize("args, message", [
    (["--suite", "digits-multi"], "cannot serve all three routes"),
    (["--methods", "continual:nosuch"], "unknown strategy 'nosuch'"),
    (["--methods", "joint:mmoe"], "must be ARCH+WEIGHTING"),
    (["--routes", "joint,sideways"], "unknown route 'sideways'"),
    (["--routes", "joint", "--methods", "merge:ties"], "not among the routes"),
    (["--seeds", "0"], "Invalid value for '--seeds'"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, args, message):
    proc = run_cli("compare", *args, "--out", str(tmp_path / "out"), check=False)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_killed_compare_redoes_only_unfinished_cells(tmp_path):
    methods = "joint:shared-bottom+ew,continual:finetune,continual:ewc,merge:ties"
    args = ["compare", "--suite", "digits-merge", "--methods", methods, "--epochs", "2", "--no-progress"]
    run_cli(*args, "--out", str(tmp_path / "full"))
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "polytask", *args, "--out", str(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = killed / "cells" / "joint" / "shared-bottom+ew" / "seed-0.json"
    deadline = time.time() + 240
    while not first.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert first.exists() and not (killed / "report.json").exists()
    stamp = first.stat().st_mtime_ns
    run_cli(*args, "--out", str(killed))
    assert first.stat().st_mtime_ns == stamp  # the finished cell was not run again
    a = json.loads((tmp_path / "full" / "report.json").read_text())
    b = json.loads((killed / "report.json").read_text())
    strip = ("train_seconds", "inference_seconds", "merge_seconds")
    for ra, rb in zip(a["summary"], b["summary"]):
        assert {k: v for k, v in ra.items() if k not in strip} == {k: v for k, v in rb.items() if k not in strip}


def test_the_python_entry_point_is_the_command_s_equal():
    import polytask
    from polytask import comparison

    assert polytask.compare is comparison.compare and polytask.CompareConfig is CompareConfig
    with pytest.raises(PolytaskError, match="seeds must be at least 1"):
        polytask.compare(suite="digits-merge", seeds=0)
