"""The bad-input battery: every command, fed what a user gets wrong, answers with exit code 2, no
traceback, one ``error:`` line that says what was wrong and what to pass instead, and leaves no
file or folder behind that was not there before."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import save_file

from conftest import run_cli

SMALL = ["--suite", "synthetic-mmoe", "--suite-option", "num_samples=200", "--epochs", "1", "--baseline", "none",
         "--no-progress"]


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _fake_run(d: Path, model: dict[str, torch.Tensor] | bytes | None = None) -> Path:
    """A run folder with a valid config.yaml and, optionally, a model file (tensors or raw bytes)."""
    _write(d / "config.yaml", "suite: synthetic-mmoe\nsuite_options: {num_samples: 200}\narch: shared-bottom\n"
                              "baseline: none\ntrain: {epochs: 1}\n")
    if isinstance(model, bytes):
        (d / "model.safetensors").write_bytes(model)
    elif model is not None:
        save_file(model, str(d / "model.safetensors"))
    return d


def _models(tmp: Path, second: dict[str, torch.Tensor]) -> list[str]:
    save_file({"w": torch.zeros(3, 2), "b": torch.zeros(2)}, str(tmp / "base.safetensors"))
    save_file({"w": torch.ones(3, 2), "b": torch.ones(2)}, str(tmp / "a.safetensors"))
    save_file(second, str(tmp / "b.safetensors"))
    return ["--base", str(tmp / "base.safetensors"), str(tmp / "a.safetensors"), str(tmp / "b.safetensors")]


def _lying_header(tmp: Path) -> Path:
    save_file({"w": torch.zeros(4)}, str(tmp / "ok.safetensors"))
    raw = (tmp / "ok.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header["w"]["data_offsets"] = [0, 4000]  # claims more bytes than the file holds
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    (tmp / "lie.safetensors").write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n:])
    (tmp / "ok.safetensors").unlink()
    return tmp / "lie.safetensors"


Setup = Callable[[Path], list[str]]
CASES: list[tuple[str, Setup, str]] = [
    # ---- train: names and options
    ("unknown suite", lambda t: ["train", "--suite", "nope", "--out", f"{t}/run"], "unknown suite 'nope'"),
    ("misspelt arch", lambda t: ["train", *SMALL, "--arch", "mmeo", "--out", f"{t}/run"], "did you mean 'mmoe'"),
    ("unknown weighting", lambda t: ["train", *SMALL, "--weighting", "xx", "--out", f"{t}/run"], "unknown weighting 'xx'"),
    ("unknown arch option", lambda t: ["train", *SMALL, "--arch-option", "experts=3", "--out", f"{t}/run"],
     "has no option 'experts'"),
    ("option not key=value", lambda t: ["train", *SMALL, "--suite-option", "num_samples", "--out", f"{t}/run"],
     "is not key=value"),
    ("option of the wrong type", lambda t: ["train", *SMALL, "--suite-option", "correlation=abc", "--out", f"{t}/run"],
     "option 'correlation' must be float"),
    ("zero samples", lambda t: ["train", "--suite", "synthetic-mmoe", "--suite-option", "num_samples=0", "--out", f"{t}/run"],
     "num_samples must be at least"),
    ("zero experts", lambda t: ["train", *SMALL, "--arch", "mmoe", "--arch-option", "num_experts=0", "--out", f"{t}/run"],
     "num_experts must be at least 1"),
    ("negative lr", lambda t: ["train", *SMALL, "--lr", "-1", "--out", f"{t}/run"], "lr must be positive"),
    ("zero epochs", lambda t: ["train", *SMALL[:4], "--epochs", "0", "--out", f"{t}/run"], "--epochs"),
    ("negative threads", lambda t: ["train", *SMALL, "--threads", "-1", "--out", f"{t}/run"], "num_threads must be at least 1"),
    ("negative patience", lambda t: ["train", *SMALL, "--patience", "-1", "--out", f"{t}/run"], "patience must be at least 1"),
    ("unknown monitor", lambda t: ["train", *SMALL, "--monitor", "a/auroc", "--out", f"{t}/run"], "cannot monitor 'a/auroc'"),
    ("unknown flag", lambda t: ["train", *SMALL, "--epoch", "3", "--out", f"{t}/run"], "No such option: --epoch"),
    ("no suite", lambda t: ["train", "--out", f"{t}/run"], "no suite given"),
    ("missing baseline", lambda t: ["train", *SMALL[:6], "--baseline", f"{t}/none.json", "--out", f"{t}/run"],
     "does not exist"),
    ("malformed baseline", lambda t: ["train", *SMALL[:6], "--baseline", str(_write(t / "b.json", "{oops")),
                                      "--out", f"{t}/run"], "is not valid JSON"),
    ("baseline without the tasks", lambda t: ["train", *SMALL[:6], "--baseline", str(_write(t / "b.json", '{"x": 1}')),
                                              "--out", f"{t}/run"], "has no metrics for task"),
    ("loss becomes NaN", lambda t: ["train", *SMALL, "--lr", "1e30", "--out", f"{t}/run"], "became NaN or infinite"),
    # ---- train: YAML configs
    ("malformed YAML", lambda t: ["train", "--config", str(_write(t / "c.yaml", "suite: [oops\n")), "--out", f"{t}/run"],
     "not valid YAML at line"),
    ("unknown YAML key", lambda t: ["train", "--config", str(_write(t / "c.yaml", "suite: penguins\nepochz: 3\n")),
                                    "--out", f"{t}/run"], "unknown field 'epochz'"),
    ("suite of the wrong type", lambda t: ["train", "--config", str(_write(t / "c.yaml", "suite: 3\n")), "--out", f"{t}/run"],
     "suite must be a string"),
    ("fractional epochs", lambda t: ["train", "--config", str(_write(t / "c.yaml", "suite: penguins\ntrain: {epochs: 2.5}\n")),
                                     "--out", f"{t}/run"], "epochs must be an integer"),
    ("string lr", lambda t: ["train", "--config", str(_write(t / "c.yaml", "suite: penguins\ntrain: {lr: fast}\n")),
                             "--out", f"{t}/run"], "lr must be a number"),
    ("python tag", lambda t: ["train", "--config", str(_write(t / "c.yaml", "suite: !!python/object/apply:os.getcwd []\n")),
                              "--out", f"{t}/run"], "YAML tag polytask does not load"),
    ("missing config", lambda t: ["train", "--config", f"{t}/nope.yaml", "--out", f"{t}/run"], "does not exist"),
    # ---- train: the output folder
    ("out is a file", lambda t: ["train", *SMALL, "--out", str(_write(t / "file", "x"))], "is a file, not a folder"),
    ("out under a file", lambda t: ["train", *SMALL, "--out", f"{_write(t / 'file', 'x')}/run"], "is a file; choose another"),
    ("out not writable", lambda t: ["train", *SMALL, "--out", "/proc/polytask-run"], "cannot be written"),
    ("out holds a run", lambda t: ["train", *SMALL, "--out", str(_write(t / "run" / "metrics.json", "{}").parent)],
     "already holds a finished run"),
    ("resume a missing folder", lambda t: ["train", "--resume", "--out", f"{t}/nothing"], "holds no run to resume"),
    ("resume an empty folder", lambda t: [(t / "empty").mkdir() or "train", "--resume", "--out", f"{t}/empty"],
     "holds no run to resume"),
    ("resume a foreign folder", lambda t: ["train", "--resume", "--out", str(_write(t / "other" / "notes.txt", "hi").parent)],
     "holds no run to resume"),
    ("resume with a new lr", lambda t: ["train", "--resume", "--lr", "0.5", "--out", str(_fake_run(t / "run"))],
     "train.lr cannot change when resuming"),
    # ---- eval
    ("eval a non-run", lambda t: ["eval", str(t)], "not a polytask run directory"),
    ("eval an unfinished run", lambda t: ["eval", str(_fake_run(t / "run"))], "did not finish"),
    ("eval a corrupt model", lambda t: ["eval", str(_fake_run(t / "run", b"\x00" * 40))], "not a readable safetensors file"),
    ("eval a lying header", lambda t: ["eval", str(_fake_run(t / "run", _lying_header(t).read_bytes()))],
     "not a readable safetensors file"),
    ("eval another architecture", lambda t: ["eval", str(_fake_run(t / "run", {"other.weight": torch.zeros(2)}))],
     "does not fit the model"),
    ("eval a link out of the run", lambda t: ["eval", str(_link_run(t))], "points outside"),
    ("eval an unknown split", lambda t: ["eval", "--split", "dev", str(t)], "unknown split 'dev'"),
    # ---- continual
    ("unknown scenario", lambda t: ["continual", "--scenario", "nope", "--out", f"{t}/run"], "unknown scenario 'nope'"),
    ("unknown strategy", lambda t: ["continual", "--scenario", "split-digits", "--strategy", "nope", "--out", f"{t}/run"],
     "unknown strategy 'nope'"),
    ("no scenario", lambda t: ["continual", "--out", f"{t}/run"], "no scenario given"),
    ("continual resume with flags", lambda t: ["continual", "--resume", "--epochs", "3", "--out", f"{t}/run"],
     "drop --epochs"),
    ("continual resume of nothing", lambda t: ["continual", "--resume", "--out", f"{t}/run"], "holds no continual run"),
    # ---- merge
    ("merge mismatched shapes", lambda t: ["merge", *_models(t, {"w": torch.ones(2, 3), "b": torch.ones(2)}),
                                           "--out", f"{t}/m.safetensors"], "'w'"),
    ("merge mismatched keys", lambda t: ["merge", *_models(t, {"w": torch.ones(3, 2)}), "--out", f"{t}/m.safetensors"], "'b'"),
    ("merge a truncated file", lambda t: ["merge", *_models(t, {"w": torch.ones(3, 2), "b": torch.ones(2)})[:3],
                                          str(_write(t / "t.safetensors", "\x10\x00")), "--out", f"{t}/m.safetensors"],
     "t.safetensors"),
    ("merge a text file", lambda t: ["merge", *_models(t, {"w": torch.ones(3, 2), "b": torch.ones(2)})[:3],
                                     str(_write(t / "notes.txt", "not a model")), "--out", f"{t}/m.safetensors"], "notes.txt"),
    ("merge an unknown method", lambda t: ["merge", *_models(t, {"w": torch.ones(3, 2), "b": torch.ones(2)}),
                                           "--method", "nope", "--out", f"{t}/m.safetensors"], "unknown merger 'nope'"),
    ("merge a density out of range", lambda t: ["merge", *_models(t, {"w": torch.ones(3, 2), "b": torch.ones(2)}),
                                                "--method", "ties", "--option", "density=2",
                                                "--out", f"{t}/m.safetensors"], "density"),
    ("merge without models", lambda t: ["merge", "--out", f"{t}/m.safetensors"], "--base"),
    # ---- merge-bench, compare, list
    ("merge-bench unknown suite", lambda t: ["merge-bench", "--suite", "nope", "--out", f"{t}/mb"], "unknown merge suite 'nope'"),
    ("merge-bench unknown method", lambda t: ["merge-bench", "--methods", "ties,nope", "--out", f"{t}/mb"],
     "unknown merging method 'nope'"),
    ("merge-bench zero seeds", lambda t: ["merge-bench", "--seeds", "0", "--out", f"{t}/mb"], "--seeds"),
    ("compare unknown suite", lambda t: ["compare", "--suite", "nope", "--out", f"{t}/cmp"], "nope"),
    ("compare unknown route", lambda t: ["compare", "--routes", "joint,teleport", "--out", f"{t}/cmp"], "teleport"),
    ("compare negative threads", lambda t: ["compare", "--threads", "-1", "--out", f"{t}/cmp"], "--threads"),
    ("list an unknown family", lambda t: ["list", "nothing"], "unknown family 'nothing'"),
]


def _link_run(t: Path) -> Path:
    run = _fake_run(t / "run")
    save_file({"x": torch.zeros(1)}, str(t / "elsewhere.safetensors"))
    os.symlink(t / "elsewhere.safetensors", run / "model.safetensors")
    return run


def _snapshot(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_the_battery_has_at_least_forty_cases():
    assert len(CASES) >= 40


@pytest.mark.parametrize("name, setup, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(tmp_path, name, setup, message):
    args = setup(tmp_path)
    before = _snapshot(tmp_path)
    proc = run_cli(*args, check=False)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    assert message in lines[0], lines[0]
    assert _snapshot(tmp_path) == before, sorted(_snapshot(tmp_path) ^ before)


def test_python_api_errors_are_polytask_errors():
    import numpy as np

    import polytask
    from polytask import PolytaskError, TaskSuite

    x = np.random.default_rng(0).normal(size=(40, 3))
    bad_x = x.copy()
    bad_x[2, 1] = np.nan
    suite = TaskSuite.from_tensors(x, {"a": np.arange(40) % 2}, {"a": "binary"})
    calls = [
        (lambda: polytask.train("nope"), "unknown suite 'nope'"),
        (lambda: polytask.MERGERS.create("ties", density=2.0), "density"),
        (lambda: polytask.TrainConfig(epochs=2.5), "epochs must be an integer"),
        (lambda: TaskSuite.from_tensors(bad_x, {"a": np.arange(40) % 2}, {"a": "binary"}), "NaN or infinite features"),
        (lambda: TaskSuite.from_tensors(np.zeros((0, 3)), {"a": np.zeros(0)}, {"a": "binary"}), "the dataset is empty"),
        (lambda: TaskSuite.from_tensors(x, {"a": np.arange(40) % 3}, {"a": "binary"}), "labels other than 0 and 1"),
        (lambda: TaskSuite.from_tensors(x, {"a": np.arange(40) % 2}, {"a": "binary"}, masks={"a": np.zeros(40, bool)}),
         "has no labelled sample"),
        (lambda: polytask.run(None, "unused", resume=False), "needs a RunConfig"),
        (lambda: polytask.ARCHITECTURES.create("mmoe", suite.tasks, suite.input_spec, expert=[0]), "layer sizes must be positive"),
    ]
    for call, message in calls:
        with pytest.raises(PolytaskError, match=message.replace("(", r"\(")):
            call()
