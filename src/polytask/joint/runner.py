"""The joint route's runner: build, train, save, load and evaluate a run."""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from torch import nn

import polytask.data  # noqa: F401  (registers the suites)
import polytask.models.arch  # noqa: F401
import polytask.weighting  # noqa: F401
from polytask.joint.config import RunConfig
from polytask.errors import PolytaskError
from polytask.io import cache_dir, load_safetensors, save_safetensors, write_json, write_yaml
from polytask.metrics import Results, delta_m
from polytask.registry import ARCHITECTURES, SUITES, WEIGHTINGS
from polytask.tasks import TaskSuite
from polytask.rundir import RunDir, check_run_dir, open_run_dir
from polytask.trainer import Hook, TrainConfig, Trainer, evaluate_model, seed_everything


@dataclass
class RunResult:
    config: RunConfig
    suite: TaskSuite
    model: nn.Module
    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    out: Path | None


def build_suite(config: RunConfig) -> TaskSuite:
    return SUITES.create(config.suite, **config.suite_options)


def build_model(config: RunConfig, suite: TaskSuite) -> nn.Module:
    """Seed, then create the architecture for ``suite`` (same seed -> same initial weights)."""
    seed_everything(config.train.seed)
    return ARCHITECTURES.create(config.arch, suite.tasks, suite.input_spec, backbone=config.backbone,
                                backbone_options=config.backbone_options, **config.arch_options)


# What a resumed run may change: how long it trains, when it stops early, how it reports, and the
# hardware it runs on (checkpoints hold CPU tensors; the optimizer kernels follow the device). Precision,
# schedule, warm-up and accumulation change the training itself and stay as they were.
RESUMABLE = frozenset({"train.epochs", "train.patience", "train.progress", "train.num_threads",
                       "train.tensorboard", "train.eval_batch_size", "baseline",
                       "train.device", "train.optimizer_impl"})


def resume_config(stored: RunConfig, given: RunConfig | None) -> RunConfig:
    """The config a resumed run continues with: ``stored``, with the changes of ``given`` that can
    apply to a run already under way (:data:`RESUMABLE`); any other change is a one-line error."""
    if given is None:
        return stored
    old, new = _flat(stored.to_dict()), _flat(given.to_dict())
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key) and key not in RESUMABLE:
            raise PolytaskError(f"{key} cannot change when resuming a run (it is {old.get(key)!r}, not {new.get(key)!r}); "
                                "leave it out, or start a new run with another out= or overwrite=True")
    return given


def _flat(d: dict[str, Any]) -> dict[str, Any]:
    return {**{k: v for k, v in d.items() if k != "train"}, **{f"train.{k}": v for k, v in d["train"].items()}}


class _CommitOnCheckpoint(Hook):
    """Tells the run folder that the new run has its first checkpoint (an overwritten run may go)."""

    def __init__(self, run_dir: RunDir) -> None:
        self.run_dir = run_dir

    def after_epoch(self, trainer: Trainer) -> None:
        self.run_dir.commit()


def run(config: RunConfig | None, out: str | os.PathLike[str] | None = None, resume: bool = False,
        overwrite: bool = False) -> RunResult:
    """Train ``config`` and evaluate on the test split; write model, config and metrics to ``out``.

    With ``resume=True`` the run in ``out`` continues from its last good checkpoint; ``config`` may
    be None (continue as configured) or the stored config with longer training or new stopping
    rules (:func:`resume_config`). Every input is validated before anything in ``out`` changes.
    """
    out_path = Path(out) if out is not None else None
    if out_path is not None:
        check_run_dir(out_path, resume, overwrite)
        if resume:
            config = resume_config(RunConfig.from_yaml(out_path / "config.yaml"), config)
    if config is None:
        raise PolytaskError("run needs a RunConfig (config=None is only for resume=True with an out= folder)")
    suite = build_suite(config)
    train_config, weighting_options = main_task_settings(config, suite)
    model = build_model(config, suite)
    trainer = Trainer(model, suite.tasks, config.weighting, train_config, out_dir=out_path,
                      weighting_options=weighting_options)
    baselines_file = read_baselines(config.baseline, suite) if config.baseline not in ("auto", "none") else None
    if out_path is None:
        return _train_and_test(config, suite, model, trainer, None, resume, baselines_file)
    with open_run_dir(out_path, resume, overwrite) as run_dir:
        trainer.hooks.append(_CommitOnCheckpoint(run_dir))
        return _train_and_test(config, suite, model, trainer, out_path, resume, baselines_file)


def main_task_settings(config: RunConfig, suite: TaskSuite) -> tuple[TrainConfig, dict[str, Any]]:
    """The training config and weighting options a run with a ``main`` task uses: the main task's
    first metric drives model selection (unless ``monitor`` already names one of its metrics), and a
    weighting that takes a ``main`` option (``fixed``, ``gradsim``) gets this one unless given another."""
    options = dict(config.weighting_options)
    if config.main is None:
        return config.train, options
    task = next((t for t in suite.tasks if t.name == config.main), None)
    if task is None:
        raise PolytaskError(f"main task {config.main!r} is not a task of suite {config.suite!r}; choose one of: "
                            f"{', '.join(t.name for t in suite.tasks)}")
    train = config.train
    if train.monitor == "loss":
        train = replace(train, monitor=f"{task.name}/{task.metrics[0]}")
    elif train.monitor.partition("/")[0] != task.name:
        raise PolytaskError(f"monitor {train.monitor!r} is not a metric of the main task {task.name!r}; "
                            f"leave monitor out or give {task.name}/METRIC")
    if "main" in inspect.signature(WEIGHTINGS.get(config.weighting)).parameters:
        options.setdefault("main", task.name)
    return train, options


def _train_and_test(config: RunConfig, suite: TaskSuite, model: nn.Module, trainer: Trainer, out_path: Path | None,
                    resume: bool, baselines_file: Results | None) -> RunResult:
    if out_path is not None and trainer.is_main:
        write_yaml(out_path / "config.yaml", config.to_dict())
    start = time.perf_counter()
    history = trainer.fit(suite.train, suite.val, resume=resume)
    seconds = time.perf_counter() - start
    test = trainer.evaluate(suite.test)
    baselines = baselines_file if baselines_file is not None else resolve_baselines(config, suite)
    metrics = {
        "route": "joint", "suite": config.suite, "arch": config.arch, "weighting": config.weighting,
        "seed": config.train.seed, "epochs_trained": len(history), "train_seconds": round(seconds, 3),
        "test": test, "delta_m": delta_m(test, baselines, suite.tasks) if baselines else None,
        "baselines": baselines,
    }
    if config.main is not None:  # Δm of the main task alone; the all-task figure is kept beside it
        main = [t for t in suite.tasks if t.name == config.main]
        metrics.update({"main": config.main, "delta_m_all_tasks": metrics["delta_m"],
                        "delta_m": delta_m(test, baselines, main) if baselines else None})
    if out_path is not None and trainer.is_main:
        save_safetensors(out_path / "model.safetensors", model.state_dict(),
                         metadata={"polytask_arch": config.arch, "polytask_suite": config.suite})
        write_json(out_path / "metrics.json", metrics)
    return RunResult(config, suite, model, metrics, history, out_path)


def train(suite: str, arch: str = "shared-bottom", weighting: str = "ew", *, epochs: int = 10, seed: int = 0,
          out: str | os.PathLike[str] | None = None, baseline: str = "auto", **options: Any) -> RunResult:
    """One-call training: ``polytask.train("digits-multi", "mmoe", "uw", epochs=5)``.

    ``options`` may hold any TrainConfig field (``lr``, ``batch_size``, ...) and the
    ``suite_options``/``arch_options``/``weighting_options``/``backbone``/``backbone_options`` of RunConfig.
    """
    run_keys = {"suite_options", "arch_options", "weighting_options", "backbone", "backbone_options"}
    run_opts = {k: options.pop(k) for k in list(options) if k in run_keys}
    options.setdefault("progress", False)
    cfg = RunConfig(suite=suite, arch=arch, weighting=weighting, baseline=baseline,
                    train=TrainConfig.from_dict({"epochs": epochs, "seed": seed, **options}), **run_opts)
    return run(cfg, out)


def load_run(path: str | os.PathLike[str]) -> tuple[RunConfig, TaskSuite, nn.Module]:
    """Rebuild the suite and model of a finished run directory and load its weights."""
    p = Path(path)
    if not (p / "config.yaml").exists():
        raise PolytaskError(f"{str(p)!r} is not a polytask run directory (no config.yaml); pass the out directory of a train run")
    if not (p / "model.safetensors").exists():
        raise PolytaskError(f"the run in {str(p)!r} did not finish (no model.safetensors); continue its training with out={p} resume=True")
    config = RunConfig.from_yaml(p / "config.yaml")
    suite = build_suite(config)
    model = build_model(config, suite)
    load_weights(model, load_safetensors(p / "model.safetensors", root=p), f"{p / 'model.safetensors'}")
    return config, suite, model


def load_weights(model: nn.Module, weights: dict[str, Any], what: str) -> None:
    """``model.load_state_dict(weights)`` with a one-line error when they belong to another model."""
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        expected = model.state_dict()
        missing = sorted(set(expected) - set(weights))
        extra = sorted(set(weights) - set(expected))
        if missing or extra:
            detail = f"missing {missing[0]!r}" if missing else f"unexpected {extra[0]!r}"
        else:
            key = next(k for k in expected if expected[k].shape != weights[k].shape)
            detail = f"{key!r} has shape {tuple(weights[key].shape)}, the model needs {tuple(expected[key].shape)}"
        raise PolytaskError(f"{what} does not fit the model its config.yaml describes ({detail}); "
                            "it comes from another run or architecture") from exc


def evaluate_run(path: str | os.PathLike[str], split: str = "test") -> Results:
    if split not in ("train", "val", "test"):
        raise PolytaskError(f"unknown split {split!r}; choose train, val or test")
    config, suite, model = load_run(path)
    return evaluate_model(model, suite.tasks, getattr(suite, split), config.train.eval_batch_size)


def resolve_baselines(config: RunConfig, suite: TaskSuite) -> Results | None:
    """Single-task baselines for Δm: ``none``, a JSON file, or ``auto`` (trained once, cached)."""
    if config.baseline == "none":
        return None
    if config.baseline != "auto":
        return read_baselines(config.baseline, suite)
    return single_task_baselines(config, suite)


def read_baselines(path: str, suite: TaskSuite) -> Results:
    """Per-task baseline metrics from a JSON file: ``{task: {metric: value}}`` or a run's metrics.json."""
    p = Path(path)
    hint = "pass 'auto', 'none' or the metrics.json of a run"
    if not p.is_file():
        raise PolytaskError(f"baseline file {path!r} does not exist; {hint}")
    try:
        data = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PolytaskError(f"baseline file {path!r} is not valid JSON; {hint}") from exc
    data = data.get("test", data) if isinstance(data, dict) else data
    for task in suite.tasks:
        metrics = data.get(task.name) if isinstance(data, dict) else None
        if not isinstance(metrics, dict) or not all(isinstance(v, (int, float)) for v in metrics.values()):
            raise PolytaskError(f"baseline file {path!r} has no metrics for task {task.name!r} "
                                "(expected {task: {metric: number}}); " + hint)
    return data


def single_task_baselines(config: RunConfig, suite: TaskSuite) -> Results:
    """Train one ``shared-bottom`` network per task with the run's backbone and training
    settings (cached under :func:`cache_dir` by configuration)."""
    train_cfg = replace(config.train, progress=False)
    results: Results = {}
    for task in suite.tasks:
        key = json.dumps({"suite": config.suite, "suite_options": config.suite_options, "task": task.name,
                          "backbone": config.backbone, "backbone_options": config.backbone_options,
                          "train": {k: v for k, v in train_cfg.__dict__.items() if k != "progress"}},
                         sort_keys=True, default=str)
        path = cache_dir() / "baselines" / f"{hashlib.sha256(key.encode()).hexdigest()[:20]}.json"
        if path.exists():
            results[task.name] = json.loads(path.read_text())
            continue
        single = suite.restrict([task.name])
        cfg = RunConfig(suite=config.suite, arch="shared-bottom", backbone=config.backbone,
                        backbone_options=config.backbone_options, train=train_cfg)
        model = build_model(cfg, single)
        trainer = Trainer(model, single.tasks, "ew", train_cfg)
        trainer.fit(single.train, single.val)
        results[task.name] = trainer.evaluate(single.test)[task.name]
        write_json(path, results[task.name])
    return results
