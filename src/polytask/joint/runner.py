"""The joint route's runner: build, train, save, load and evaluate a run."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from safetensors.torch import load_file
from torch import nn

import polytask.data  # noqa: F401  (registers the suites)
import polytask.models.arch  # noqa: F401
import polytask.weighting  # noqa: F401
from polytask.joint.config import RunConfig
from polytask.errors import PolytaskError
from polytask.io import cache_dir, prepare_run_dir, save_safetensors, write_json, write_yaml
from polytask.metrics import Results, delta_m
from polytask.registry import ARCHITECTURES, SUITES
from polytask.tasks import TaskSuite
from polytask.trainer import TrainConfig, Trainer, evaluate_model, seed_everything


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


def run(config: RunConfig, out: str | os.PathLike[str] | None = None, resume: bool = False,
        overwrite: bool = False) -> RunResult:
    """Train ``config`` and evaluate on the test split; write model, config and metrics to ``out``."""
    out_path = Path(out) if out is not None else None
    created = False
    if out_path is not None:
        prepare_run_dir(out_path, resume, overwrite)
        created = not out_path.exists()
        if resume:
            config = RunConfig.from_yaml(out_path / "config.yaml")
    suite = build_suite(config)
    model = build_model(config, suite)
    trainer = Trainer(model, suite.tasks, config.weighting, config.train, out_dir=out_path,
                      weighting_options=config.weighting_options)
    try:
        if out_path is not None and trainer.is_main:
            write_yaml(out_path / "config.yaml", config.to_dict())
        start = time.perf_counter()
        history = trainer.fit(suite.train, suite.val, resume=resume)
        seconds = time.perf_counter() - start
        test = trainer.evaluate(suite.test)
        baselines = resolve_baselines(config, suite)
        metrics = {
            "route": "joint", "suite": config.suite, "arch": config.arch, "weighting": config.weighting,
            "seed": config.train.seed, "epochs_trained": len(history), "train_seconds": round(seconds, 3),
            "test": test, "delta_m": delta_m(test, baselines, suite.tasks) if baselines else None,
            "baselines": baselines,
        }
        if out_path is not None and trainer.is_main:
            save_safetensors(out_path / "model.safetensors", model.state_dict(),
                             metadata={"polytask_arch": config.arch, "polytask_suite": config.suite})
            write_json(out_path / "metrics.json", metrics)
    except PolytaskError:
        if created and out_path is not None:
            shutil.rmtree(out_path, ignore_errors=True)
        raise
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
    model.load_state_dict(load_file(str(p / "model.safetensors")))
    return config, suite, model


def evaluate_run(path: str | os.PathLike[str], split: str = "test") -> Results:
    config, suite, model = load_run(path)
    if split not in ("train", "val", "test"):
        raise PolytaskError(f"unknown split {split!r}; choose train, val or test")
    return evaluate_model(model, suite.tasks, getattr(suite, split), config.train.eval_batch_size)


def resolve_baselines(config: RunConfig, suite: TaskSuite) -> Results | None:
    """Single-task baselines for Δm: ``none``, a JSON file, or ``auto`` (trained once, cached)."""
    if config.baseline == "none":
        return None
    if config.baseline != "auto":
        p = Path(config.baseline)
        if not p.is_file():
            raise PolytaskError(f"baseline file {config.baseline!r} does not exist; pass 'auto', 'none' or a metrics JSON path")
        data = json.loads(p.read_text())
        return data.get("test", data)
    return single_task_baselines(config, suite)


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
