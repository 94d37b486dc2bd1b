"""Run a strategy through a scenario with the shared Trainer: one ``Trainer.fit`` per
experience, the accuracy matrix after each, a checkpoint after each (resumable), and the
metrics, CSV and plots at the end.

Each experience gets a fresh optimizer (Adam state is not carried across experiences, the
usual protocol, e.g. van de Ven & Tolias 2019). A task-free scenario is trained as one
unshuffled pass over the concatenated stream (one ``fit``); its boundaries are used only to
evaluate, from a hook that measures the accuracy row when the stream crosses one. A
task-free run is therefore checkpointed once, at the end.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from polytask.continual.base import Strategy
from polytask.continual.metrics import plot_heatmap, plot_over_time, summarize, write_matrix_csv
from polytask.continual.multilabel import group_map, is_multilabel_ci, step_scores, summarize_steps
from polytask.continual.scenario import Scenario
from polytask.checkpoints import CheckpointDir, load_state, save_state
from polytask.config import RouteConfig
from polytask.errors import PolytaskError
from polytask.io import load_safetensors, save_safetensors, write_json, write_yaml
from polytask.rundir import RunDir, check_run_dir, open_run_dir
from polytask.registry import ARCHITECTURES, SCENARIOS, STRATEGIES
from polytask.tasks import Batch
from polytask.trainer import Hook, TrainConfig, Trainer, evaluate_model, seed_everything


@dataclass
class ContinualConfig(RouteConfig):
    """Scenario, strategy and model by name with their options, plus training (and its seed).

    ``train`` may be a :class:`TrainConfig` (used as is) or a mapping of TrainConfig fields; the
    fields a mapping leaves out take the scenario's recommended training settings, and the resolved
    config is what the run saves as ``config.yaml``.
    """

    scenario: str
    strategy: str = "finetune"
    arch: str = "shared-bottom"
    backbone: str = "auto"
    scenario_options: dict[str, Any] = field(default_factory=dict)
    strategy_options: dict[str, Any] = field(default_factory=dict)
    arch_options: dict[str, Any] = field(default_factory=dict)
    backbone_options: dict[str, Any] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=lambda: TrainConfig.partial({}))

    def __post_init__(self) -> None:
        if isinstance(self.train, dict):
            self.train = TrainConfig.partial(self.train)

    @property
    def seed(self) -> int:
        return self.train.seed

    required = ("scenario", "split-digits")
    option_fields = ("scenario_options", "strategy_options", "arch_options", "backbone_options")

    @classmethod
    def train_config(cls, d: dict[str, Any]) -> TrainConfig:
        return TrainConfig.partial(d)


@dataclass
class ContinualResult:
    config: ContinualConfig
    scenario: Scenario
    strategy: Strategy
    model: nn.Module
    metrics: dict[str, Any]
    out: Path | None


def experience_accuracy(model: nn.Module, scenario: Scenario, j: int, batch_size: int = 2048) -> float:
    """The mean main metric (accuracy for classification) over experience ``j``'s tasks, on its test set
    (for a multi-label class-incremental scenario: the mAP over experience j's classes)."""
    if is_multilabel_ci(scenario):
        return group_map(model, scenario, j, batch_size)
    tasks = scenario.experience_tasks(j)
    res = evaluate_model(model, tasks, scenario[j].test, batch_size)
    return float(sum(res[t.name][t.main_metric] for t in tasks) / len(tasks))


def accuracy_row(model: nn.Module, scenario: Scenario, strategy: Strategy, batch_size: int = 2048) -> list[float]:
    strategy.before_eval(model)
    was_training = model.training
    row = [experience_accuracy(model, scenario, j, batch_size) for j in range(len(scenario))]
    model.train(was_training)
    return row


def resolve_train(config: ContinualConfig, scenario: Scenario) -> TrainConfig:
    """The run's TrainConfig: what the user set, the scenario's recommendations for the rest."""
    defaults = {"progress": False, "num_threads": 1, **scenario.defaults.get("train", {})}
    train = config.train.filled(defaults)
    # strategies keep their state and data on the CPU and act once per batch (precision and schedules do apply)
    if train.device != "cpu":
        raise PolytaskError(f"the continual route trains on the CPU only (its strategies keep CPU state), not "
                            f"device {train.device!r}; leave device out or set device: cpu")
    if train.accumulate != 1:
        raise PolytaskError("the continual route takes one batch per optimiser step (strategy hooks and stream "
                            "evaluation count batches); leave accumulate out and raise batch_size instead")
    return train


def build_default_model(config: ContinualConfig, scenario: Scenario) -> nn.Module:
    options = dict(scenario.defaults.get("arch_options", {})) if config.arch == "shared-bottom" else {}
    options.update(config.arch_options)
    return ARCHITECTURES.create(config.arch, scenario.tasks, scenario.input_spec, backbone=config.backbone,
                                backbone_options=config.backbone_options, **options)


class _StreamEval(Hook):
    """Measures an accuracy row each time a task-free stream crosses an experience boundary."""

    def __init__(self, scenario: Scenario, strategy: Strategy, boundary_steps: list[int], rows: list[list[float]],
                 batch_size: int) -> None:
        self.scenario, self.strategy, self.steps, self.rows = scenario, strategy, boundary_steps, rows
        self.batch_size = batch_size

    def after_backward(self, trainer: Trainer, batch: Batch) -> None:
        if trainer.step in self.steps:  # trainer.step optimizer steps are done: the model as of that point
            self.rows.append(accuracy_row(trainer.model, self.scenario, self.strategy, self.batch_size))


def _load_components(config: ContinualConfig, scenario: Scenario | None) -> tuple[Scenario, Strategy]:
    strategy = STRATEGIES.create(config.strategy, **config.strategy_options)
    if scenario is None:
        scenario = SCENARIOS.create(config.scenario, seed=config.seed, **config.scenario_options)
    if scenario.task_free and strategy.needs_boundaries:
        ok = [n for n in STRATEGIES.names() if not STRATEGIES.get(n).needs_boundaries]
        raise PolytaskError(f"strategy {config.strategy!r} needs experience boundaries, which the task-free scenario "
                            f"{scenario.name!r} hides; use one of: {', '.join(ok)}")
    return scenario, strategy


def run_continual(config: ContinualConfig, out: str | os.PathLike[str] | None = None, *, resume: bool = False,
                  overwrite: bool = False, scenario: Scenario | None = None,
                  model: Callable[[], nn.Module] | None = None) -> ContinualResult:
    """Train ``config.strategy`` through the scenario; write metrics, matrix, plots and checkpoints to ``out``.

    ``scenario`` may be a user-built :class:`Scenario` (then ``config.scenario`` is only its label);
    ``model`` builds the network instead of ``config.arch`` (e.g. a pretrained body with one head per task).
    """
    out_path = Path(out) if out is not None else None
    if out_path is not None:
        check_run_dir(out_path, resume, overwrite, "continual run")
        if resume:
            config = ContinualConfig.from_yaml(out_path / "config.yaml")
    scen, strategy = _load_components(config, scenario)
    train_cfg = resolve_train(config, scen)
    config = replace(config, train=train_cfg)
    if out_path is None:
        return _run(config, scen, strategy, train_cfg, None, resume, model, None)
    with open_run_dir(out_path, resume, overwrite, "continual run") as run_dir:
        if not resume:
            write_yaml(out_path / "config.yaml", config.to_dict())
        return _run(config, scen, strategy, train_cfg, out_path, resume, model, run_dir)


def _run(config: ContinualConfig, scenario: Scenario, strategy: Strategy, train_cfg: TrainConfig,
         out: Path | None, resume: bool, build: Callable[[], nn.Module] | None,
         run_dir: RunDir | None) -> ContinualResult:
    torch.set_num_threads(train_cfg.num_threads or 1)
    seed_everything(config.seed)
    strategy.setup(scenario, config.seed)
    model = strategy.build_model(build or (lambda: build_default_model(config, scenario)))
    random_init = accuracy_row(model, scenario, strategy, train_cfg.eval_batch_size)
    rows: list[list[float]] = []
    seconds: list[float] = []
    multilabel = is_multilabel_ci(scenario) and not scenario.task_free
    ml_steps: list[dict[str, float]] | None = [] if multilabel else None  # per-step mAP/CF1/OF1, seen classes
    start = 0
    if resume and out is not None:
        start, rows, seconds, ml_steps = _load_checkpoint(out, model, strategy, ml_steps)
    n = len(scenario)
    if scenario.task_free:
        if start == 0:
            t0 = time.perf_counter()
            data, ends = scenario.stream()
            cfg = replace(train_cfg, epochs=1, shuffle=False)
            steps = [math.ceil(e / cfg.batch_size) for e in ends[:-1]]
            strategy.begin(0, scenario.tasks)
            evaluator = _StreamEval(scenario, strategy, steps, rows, cfg.eval_batch_size)
            Trainer(model, scenario.tasks, "ew", cfg, hooks=[strategy, evaluator]).fit(data)
            strategy.end(n - 1)
            rows.append(accuracy_row(model, scenario, strategy, cfg.eval_batch_size))
            seconds = [time.perf_counter() - t0]
            _save_checkpoint(out, n - 1, model, strategy, rows, seconds, run_dir)
    else:
        for i in range(start, n):
            t0 = time.perf_counter()
            strategy.begin(i, scenario.experience_tasks(i))
            tasks, data = strategy.train_data(i)
            Trainer(model, tasks, "ew", train_cfg, hooks=[strategy]).fit(data)
            strategy.end(i)
            seconds.append(time.perf_counter() - t0)
            rows.append(accuracy_row(model, scenario, strategy, train_cfg.eval_batch_size))
            if ml_steps is not None:
                ml_steps.append(step_scores(model, scenario, i, train_cfg.eval_batch_size))
            _save_checkpoint(out, i, model, strategy, rows, seconds, run_dir, ml_steps)
    metrics = {"route": "continual", "scenario": config.scenario, "strategy": config.strategy, "seed": config.seed,
               "kind": scenario.kind, "task_free": scenario.task_free, "num_experiences": n,
               **summarize(rows, random_init),
               "experience_seconds": [round(s, 3) for s in seconds], "train_seconds": round(sum(seconds), 3),
               "metric": "mean main metric of each experience's tasks (accuracy for classification)"}
    if ml_steps is not None:
        metrics["metric"] = "mAP over each experience's classes (multi-label class-incremental)"
        metrics["multilabel"] = summarize_steps(ml_steps)
    if out is not None:
        _write_outputs(out, config, scenario, model, metrics)
    return ContinualResult(config, scenario, strategy, model, metrics, out)


def _write_outputs(out: Path, config: ContinualConfig, scenario: Scenario, model: nn.Module,
                   metrics: dict[str, Any]) -> None:
    names = [e.name for e in scenario]
    write_matrix_csv(out / "accuracy_matrix.csv", metrics["accuracy_matrix"], names)
    title = f"{config.strategy} on {config.scenario} (seed {config.seed})"
    plot_heatmap(out / "accuracy_matrix.png", metrics["accuracy_matrix"], title)
    plot_over_time(out / "accuracy_over_time.png", {config.strategy: metrics["accuracy_matrix"]}, title)
    save_safetensors(out / "model.safetensors", model.state_dict(),
                     metadata={"polytask_route": "continual", "polytask_strategy": config.strategy})
    write_json(out / "metrics.json", metrics)


def _checkpoints(out: Path) -> CheckpointDir:
    return CheckpointDir(out / "checkpoints", "exp", width=3, keep=2)


def _save_checkpoint(out: Path | None, index: int, model: nn.Module, strategy: Strategy,
                     rows: list[list[float]], seconds: list[float], run_dir: RunDir | None,
                     steps: list[dict[str, float]] | None = None) -> None:
    """checkpoints/exp-XXX: model and strategy tensors (safetensors), loop and strategy state (JSON)."""
    if out is None:
        return
    with _checkpoints(out).write(index) as folder:
        save_safetensors(folder / "model.safetensors", {k: v.clone() for k, v in model.state_dict().items()})
        save_state(folder, {"finished": index + 1, "accuracy_matrix": rows, "experience_seconds": seconds,
                            "strategy": strategy.state_meta(), "strategy_tensors": strategy.state_tensors(),
                            "torch_rng": torch.get_rng_state(),
                            **({"multilabel_steps": steps} if steps is not None else {})})
    if run_dir is not None:
        run_dir.commit()


def _load_checkpoint(out: Path, model: nn.Module, strategy: Strategy, steps: list[dict[str, float]] | None
                     ) -> tuple[int, list[list[float]], list[float], list[dict[str, float]] | None]:
    """Restore the newest good experience checkpoint (damaged ones are skipped with a warning)."""
    loaded: dict[str, Any] = {}

    def load(folder: Path) -> None:
        state = load_state(folder)
        weights = load_safetensors(folder / "model.safetensors", root=folder)
        strategy.load_state(state["strategy_tensors"], state["strategy"], model)
        model.load_state_dict(weights)
        loaded.update(state)

    if _checkpoints(out).restore(load) is None:
        return 0, [], [], steps
    torch.set_rng_state(loaded["torch_rng"])
    restored = loaded.get("multilabel_steps", steps) if steps is not None else None
    return int(loaded["finished"]), loaded["accuracy_matrix"], loaded["experience_seconds"], restored


def run(scenario: str | Scenario, strategy: str = "finetune", *, epochs: int | None = None, seed: int = 0,
        out: str | os.PathLike[str] | None = None, arch: str = "shared-bottom", **options: Any) -> ContinualResult:
    """One call: ``polytask.continual.run("split-digits", "replay", epochs=2)`` or a :class:`Scenario`.

    ``options`` may hold TrainConfig fields (``lr``, ``batch_size``, ...) and ``scenario_options``,
    ``strategy_options``, ``arch_options``, ``backbone``, ``backbone_options``.
    """
    keys = {"scenario_options", "strategy_options", "arch_options", "backbone", "backbone_options"}
    run_opts = {k: options.pop(k) for k in list(options) if k in keys}
    train = dict(options)
    if epochs is not None:
        train["epochs"] = epochs
    name = scenario.name if isinstance(scenario, Scenario) else scenario
    cfg = ContinualConfig(scenario=name, strategy=strategy, arch=arch, train={**train, "seed": seed}, **run_opts)
    return run_continual(cfg, out, scenario=scenario if isinstance(scenario, Scenario) else None)
