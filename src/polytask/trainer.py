"""The one training loop every route shares.

Seeds, in-memory batching, a per-task masked loss, a :class:`Weighting` that turns task
losses into gradients, hooks for continual strategies, per-epoch validation with
torchmetrics, early stopping, CSV/TensorBoard logs, safetensors checkpoints written
atomically with the optimizer and trainer state beside them, resume, and
DistributedDataParallel (gloo on CPU) when launched under ``torchrun``.
"""

from __future__ import annotations

import copy
import os
from contextlib import nullcontext
import random
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.distributed as dist
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import Tensor, nn

from polytask.checkpoints import CheckpointDir, load_state, save_state
from polytask.errors import PolytaskError
from polytask.io import load_safetensors, save_safetensors, write_text
from polytask.metrics import Results, masked_task_losses
from polytask.models.arch.base import AuxiliaryLoss
import polytask.sampling as sampling
from polytask.registry import WEIGHTINGS, check_fields, check_type
from polytask.tasks import Batch, MultiTaskData, Task
from polytask.weighting.base import GradContext, Weighting

OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}


@dataclass
class TrainConfig:
    """Everything about how a model is trained (saved in the run's config.yaml)."""

    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    optimizer: str = "adam"
    weight_decay: float = 0.0
    seed: int = 0
    monitor: str = "loss"
    patience: int | None = None
    restore_best: bool = True
    grad_clip: float | None = None
    eval_batch_size: int = 2048
    num_threads: int | None = None
    progress: bool = True
    tensorboard: bool = False
    shuffle: bool = True  # False: batches in data order (task-free continual streams)
    sampling: str = "proportional"  # per-task data: "per-task" or "round-robin" (see polytask.sampling)

    def __post_init__(self) -> None:
        for f in fields(self):
            check_type("training options", f.name, getattr(self, f.name), f.type)
        if self.epochs < 1:
            raise PolytaskError(f"epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 1:
            raise PolytaskError(f"batch_size must be at least 1, got {self.batch_size}")
        if not self.lr > 0:
            raise PolytaskError(f"lr must be positive, got {self.lr}")
        if self.optimizer not in OPTIMIZERS:
            raise PolytaskError(f"unknown optimizer {self.optimizer!r}; choose one of: {', '.join(OPTIMIZERS)}")
        for name in ("patience", "num_threads", "eval_batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise PolytaskError(f"{name} must be at least 1, got {value}")
        if self.weight_decay < 0:
            raise PolytaskError(f"weight_decay must be non-negative, got {self.weight_decay}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise PolytaskError(f"grad_clip must be positive (or left out to disable clipping), got {self.grad_clip}")
        sampling.check_sampling(self.sampling)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        check_fields(cls, d, "training options")
        return cls(**d)

    @classmethod
    def partial(cls, d: dict[str, Any]) -> TrainConfig:
        """A config in which only the fields of ``d`` count as set; :meth:`filled` supplies the rest."""
        cfg = cls.from_dict(d)
        cfg._set = frozenset(d)
        return cfg

    def filled(self, defaults: dict[str, Any]) -> TrainConfig:
        """Fields not set explicitly take ``defaults`` (e.g. a scenario's recommended training).

        A config built directly (``TrainConfig(epochs=3)``) counts as fully set and is returned as is.
        """
        given: frozenset[str] | None = getattr(self, "_set", None)
        if given is None:
            return self
        return TrainConfig.from_dict({**defaults, **{k: getattr(self, k) for k in given}})


class Hook:
    """Callbacks around the loop (continual strategies are built from these)."""

    def before_fit(self, trainer: Trainer) -> None:
        """Called once before the first epoch."""

    def extra_loss(self, trainer: Trainer, batch: Batch, outputs: dict[str, Tensor]) -> Tensor | None:
        """An extra scalar loss to add this step (e.g. a regulariser or distillation term)."""
        return None

    def after_backward(self, trainer: Trainer, batch: Batch) -> None:
        """Called after gradients are computed, before the optimizer step (e.g. gradient projection)."""

    def after_epoch(self, trainer: Trainer) -> None:
        """Called after each epoch, once its checkpoint is written."""

    def after_fit(self, trainer: Trainer) -> None:
        """Called once after training."""


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch so the same seed gives the same numbers on CPU."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def init_distributed() -> bool:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); gloo on CPU."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
    return _world() > 1


class Trainer:
    """Train a multi-task ``model`` on ``tasks`` with a weighting rule.

    ``out_dir`` (optional) receives ``checkpoints/`` (one folder per finished epoch,
    the newest named in ``checkpoints/LATEST``), ``log.csv`` and TensorBoard events.
    """

    def __init__(self, model: nn.Module, tasks: Sequence[Task], weighting: str | Weighting = "ew",
                 config: TrainConfig | None = None, out_dir: str | os.PathLike[str] | None = None,
                 hooks: Iterable[Hook] = (), weighting_options: dict[str, Any] | None = None) -> None:
        self.config = config or TrainConfig()
        if self.config.num_threads:
            torch.set_num_threads(self.config.num_threads)
        self.model = model
        self.tasks = list(tasks)
        names = [t.name for t in self.tasks]
        self.weighting = (weighting if isinstance(weighting, Weighting)
                          else WEIGHTINGS.create(weighting, names, **(weighting_options or {})))
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.hooks = list(hooks)
        self.distributed = init_distributed()
        self.ddp: nn.Module | None = None
        if self.distributed:
            self.ddp = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
        check_monitor(self.config.monitor, self.tasks)
        self.optimizer = self._make_optimizer()
        name = weighting if isinstance(weighting, str) else type(weighting).__name__
        self.ctx = GradContext(model, self.weighting.mode, weighting=name) if self.weighting.mode != "none" else None
        self.epoch = 0
        self.step = 0
        self.samples_seen = 0
        self.history: list[dict[str, Any]] = []
        self.best_score: float | None = None
        self.best_state: dict[str, Tensor] | None = None
        self.bad_epochs = 0
        self._tb: Any = None

    # ----------------------------------------------------------------- setup
    def _make_optimizer(self) -> torch.optim.Optimizer:
        cfg = self.config
        params = [p for p in self.model.parameters() if p.requires_grad]
        params += [p for p in self.weighting.parameters() if p.requires_grad]
        if not params:
            raise PolytaskError("the model has no trainable parameters; unfreeze part of it")
        kwargs: dict[str, Any] = {"lr": cfg.lr, "weight_decay": cfg.weight_decay}
        if cfg.optimizer == "sgd":
            kwargs["momentum"] = 0.9
        return OPTIMIZERS[cfg.optimizer](params, **kwargs)

    @property
    def checkpoints(self) -> CheckpointDir:
        assert self.out_dir is not None
        return CheckpointDir(self.out_dir / "checkpoints", "epoch", keep=2)

    @property
    def is_main(self) -> bool:
        return _rank() == 0

    # ------------------------------------------------------------- training
    def fit(self, train: MultiTaskData, val: MultiTaskData | None = None, resume: bool = False) -> list[dict[str, Any]]:
        """Train for ``config.epochs`` epochs (continuing from the last checkpoint if ``resume``)."""
        cfg = self.config
        self._check_data(train)
        if resume:
            self.load_checkpoint()
        stopped = resume and cfg.patience is not None and self.bad_epochs >= cfg.patience
        for hook in self.hooks:
            hook.before_fit(self)
        steps_per_epoch = sampling.steps_per_epoch(train, [t.name for t in self.tasks], cfg.batch_size, cfg.sampling)
        with self._progress() as progress:
            task_id = progress.add_task("train", total=cfg.epochs * steps_per_epoch,
                                        completed=self.epoch * steps_per_epoch, info="")
            while self.epoch < cfg.epochs and not stopped:
                start = time.perf_counter()
                mean_losses, weights = self._train_epoch(train, progress, task_id)
                record: dict[str, Any] = {"epoch": self.epoch + 1, "time": time.perf_counter() - start}
                for t, loss, w in zip(self.tasks, mean_losses.tolist(), weights.tolist()):
                    record[f"train/{t.name}/loss"] = loss
                    record[f"weight/{t.name}"] = w
                self.weighting.end_epoch(self.epoch, mean_losses)
                stop = False
                if val is not None:
                    results = self.evaluate(val)
                    record.update({f"val/{k}": v for k, v in flatten_results(results).items()})
                    stop = self._track_best(results)
                self.epoch += 1
                self.history.append(record)
                progress.update(task_id, info=_describe(record))
                self._log(record)
                self.save_checkpoint()
                for hook in self.hooks:
                    hook.after_epoch(self)
                if stop:
                    break
        if cfg.restore_best and self.best_state is not None:
            self.model.load_state_dict(self.best_state)
        for hook in self.hooks:
            hook.after_fit(self)
        return self.history

    def _check_data(self, data: MultiTaskData) -> None:
        missing = [t.name for t in self.tasks if t.name not in data.y]
        if missing:
            raise PolytaskError(f"the training data has no labels for task {missing[0]!r}; add them or drop the task")

    def _batches(self, data: MultiTaskData) -> Iterable[Batch]:
        gen = torch.Generator().manual_seed(self.config.seed * 1_000_003 + self.epoch)
        world, rank = _world(), _rank()
        cfg = self.config
        for batch in sampling.batches(data, [t.name for t in self.tasks], cfg.batch_size, cfg.sampling, cfg.shuffle, gen):
            if world > 1:  # every rank takes its share of the same global batch
                batch = batch.subset(torch.arange(rank, len(batch.mask[self.tasks[0].name]), world))
            yield batch

    def _train_epoch(self, data: MultiTaskData, progress: Progress, task_id: Any) -> tuple[Tensor, Tensor]:
        self.model.train()
        net = self.ddp or self.model
        total = torch.zeros(len(self.tasks))
        weight_sum = torch.zeros(len(self.tasks))
        n = 0
        for batch in self._batches(data):
            losses = self.train_step(net, batch)
            self.samples_seen += len(batch)
            total += losses[0]
            weight_sum += losses[1]
            n += 1
            progress.advance(task_id)
        mean = total / max(n, 1)
        if not torch.isfinite(mean).all():
            bad = self.tasks[int((~torch.isfinite(mean)).nonzero()[0])].name
            raise PolytaskError(f"the loss of task {bad!r} became NaN or infinite in epoch {self.epoch + 1}; "
                                "lower the learning rate (lr=...) or check that task's labels")
        return mean, weight_sum / max(n, 1)

    def train_step(self, net: nn.Module, batch: Batch) -> tuple[Tensor, Tensor]:
        """One optimisation step; returns the detached task losses and task weights."""
        self.optimizer.zero_grad(set_to_none=True)
        with self.model.representation_cut() if self.weighting.mode == "rep" else nullcontext():
            outputs = net(batch.x)
        # an architecture may redefine the labels its losses are taken on (ESMM/AITM: entire-space chains)
        loss_batch = self.model.loss_batch(batch) if hasattr(self.model, "loss_batch") else batch
        losses = masked_task_losses(self.tasks, outputs, loss_batch)
        extra = self.model.aux_loss if isinstance(self.model, AuxiliaryLoss) else None
        for hook in self.hooks:
            term = hook.extra_loss(self, batch, outputs)
            if term is not None:
                extra = term if extra is None else extra + term
        if self.ctx is None and type(self.weighting).objective is not Weighting.objective:
            total, weights = self.weighting.objective(losses)  # a loss-based rule: one backward pass with the extra loss
            (total if extra is None else total + extra).backward()
        else:
            if extra is not None:
                extra.backward(retain_graph=True)
            if self.ctx is not None:
                self.ctx.reset()
            sync = self.ddp.no_sync() if self.ddp is not None and self.ctx is not None else nullcontext()
            with sync:  # type: ignore[attr-defined]
                weights = self.weighting.backward(losses, self.ctx)
        if self.distributed:
            for p in self.weighting.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= _world()
        for hook in self.hooks:
            hook.after_backward(self, batch)
        if self.config.grad_clip:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.optimizer.step()
        self.step += 1
        return losses.detach(), weights.detach()

    # ----------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self, data: MultiTaskData) -> Results:
        """Per-task torchmetrics over the labelled samples of ``data``, plus each task's loss."""
        return evaluate_model(self.model, self.tasks, data, self.config.eval_batch_size)

    def _track_best(self, results: Results) -> bool:
        cfg = self.config
        score = monitor_value(results, cfg.monitor, self.tasks)
        if self.best_score is None or score > self.best_score:
            self.best_score = score
            self.best_state = copy.deepcopy(self.model.state_dict())
            self.bad_epochs = 0
        else:
            self.bad_epochs += 1
        return cfg.patience is not None and self.bad_epochs >= cfg.patience

    # ----------------------------------------------------- logs, checkpoints
    def _progress(self) -> Progress:
        return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                        disable=not (self.config.progress and self.is_main), transient=False)

    def _log(self, record: dict[str, Any]) -> None:
        if self.out_dir is None or not self.is_main:
            return
        keys = list(dict.fromkeys(k for r in self.history for k in r))
        lines = [",".join(keys)] + [",".join(_fmt(r.get(k, "")) for k in keys) for r in self.history]
        write_text(self.out_dir / "log.csv", "\n".join(lines) + "\n")
        if self.config.tensorboard:
            if self._tb is None:
                try:
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError as exc:
                    raise PolytaskError("tensorboard logging needs the tensorboard package; "
                                        "run: pip install 'polytask[tensorboard]'") from exc
                self._tb = SummaryWriter(str(self.out_dir / "tensorboard"))
            for k, v in record.items():
                if k != "epoch" and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, record["epoch"])
            self._tb.flush()

    def state(self) -> dict[str, Any]:
        """Optimizer, weighting, RNG and loop state (saved beside the weights)."""
        return {"optimizer": self.optimizer.state_dict(), "weighting": self.weighting.state_dict(),
                "epoch": self.epoch, "step": self.step, "history": self.history,
                "best_score": self.best_score, "bad_epochs": self.bad_epochs,
                "torch_rng": torch.get_rng_state(), "config": asdict(self.config)}

    def save_checkpoint(self) -> None:
        """Write checkpoint ``epoch-N`` (model + best model safetensors, trainer state), then point LATEST at it."""
        if self.out_dir is None or not self.is_main:
            return
        with self.checkpoints.write(self.epoch) as folder:
            save_safetensors(folder / "model.safetensors", self.model.state_dict())
            if self.best_state is not None:
                save_safetensors(folder / "best.safetensors", self.best_state)
            save_state(folder, self.state())

    def load_checkpoint(self) -> bool:
        """Restore the newest good checkpoint in ``out_dir`` (a damaged one is skipped, with a
        warning); returns False if there is none."""
        if self.out_dir is None:
            raise PolytaskError("resume needs an output directory holding checkpoints")
        return self.checkpoints.restore(self._restore) is not None

    def _restore(self, folder: Path) -> None:
        weights = load_safetensors(folder / "model.safetensors", root=folder)
        best = load_safetensors(folder / "best.safetensors", root=folder) if (folder / "best.safetensors").exists() else None
        state = load_state(folder)
        self.model.load_state_dict(weights)
        self.optimizer.load_state_dict(state["optimizer"])
        self.weighting.load_state_dict(state["weighting"])
        self.best_state = best
        self.epoch, self.step = state["epoch"], state["step"]
        self.history, self.best_score, self.bad_epochs = state["history"], state["best_score"], state["bad_epochs"]
        torch.set_rng_state(state["torch_rng"])


@torch.no_grad()
def evaluate_model(model: nn.Module, tasks: Sequence[Task], data: MultiTaskData, batch_size: int = 2048) -> Results:
    """Per-task torchmetrics (and mean loss) over the samples that carry each task's label."""
    model.eval()
    metrics = {t.name: t.make_metrics() for t in tasks}
    loss_sum = {t.name: 0.0 for t in tasks}
    count = {t.name: 0 for t in tasks}
    for batch in data.batches(batch_size):
        outputs = model(batch.x)
        for t in tasks:
            m = batch.mask[t.name]
            if not m.any():
                continue
            out, y = outputs[t.name][m], batch.y[t.name][m]
            loss_sum[t.name] += float(t.loss(out, y).sum())
            count[t.name] += int(m.sum())
            metrics[t.name].update(t.predict(out), t.kind_impl.metric_target(y))
    results: Results = {}
    for t in tasks:
        if count[t.name] == 0:
            raise PolytaskError(f"no sample in the evaluation data carries a label for task {t.name!r}")
        results[t.name] = {k: float(v) for k, v in metrics[t.name].compute().items()}
        results[t.name]["loss"] = loss_sum[t.name] / count[t.name]
    model.train()
    return results


def monitor_value(results: Results, monitor: str, tasks: Sequence[Task]) -> float:
    """Score to maximise: ``loss`` (minus the summed task losses) or ``TASK/METRIC``."""
    if monitor == "loss":
        return -sum(r["loss"] for r in results.values())
    task, _, metric = monitor.partition("/")
    if task not in results or metric not in results[task]:
        valid = ["loss"] + [f"{t}/{m}" for t, r in results.items() for m in r]
        raise PolytaskError(f"cannot monitor {monitor!r}; choose one of: {', '.join(valid)}")
    value = results[task][metric]
    return value if Task.higher_is_better(metric) else -value


def check_monitor(monitor: str, tasks: Sequence[Task]) -> None:
    """Reject a monitor that no evaluation will produce, before any training."""
    valid = ["loss"] + [f"{t.name}/{m}" for t in tasks for m in (*t.metrics, "loss")]
    if monitor not in valid:
        raise PolytaskError(f"cannot monitor {monitor!r}; choose one of: {', '.join(valid)}")


def flatten_results(results: Results) -> dict[str, float]:
    return {f"{t}/{m}": v for t, r in results.items() for m, v in r.items()}


def _fmt(v: Any) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def _describe(record: dict[str, Any]) -> str:
    vals = [f"{k[4:]}={v:.4g}" for k, v in record.items() if k.startswith("val/") and not k.endswith("/loss")]
    return " ".join(vals[:4])
