"""The one training loop every route shares.

Seeds, in-memory batching, a per-task masked loss, a :class:`Weighting` that turns task
losses into gradients, hooks for continual strategies, per-epoch validation with
torchmetrics, early stopping, CSV/TensorBoard logs, safetensors checkpoints written
atomically with the optimizer and trainer state beside them, resume, and
DistributedDataParallel (gloo on CPU, NCCL on CUDA) when launched under ``torchrun``.

Hardware (``TrainConfig.device``, ``precision``, ``scheduler``, ``accumulate``,
``optimizer_impl``): the model lives on the device and each batch is moved there per step;
mixed precision runs the forward and the losses under ``torch.autocast`` (a GradScaler for
fp16); the learning rate follows :func:`lr_factor` per optimiser step; ``accumulate`` micro-
batches make one step equal to one larger batch (:func:`micro_batch_shares`). Checkpoints hold
CPU tensors and load on any device.
"""

from __future__ import annotations

import itertools
import math
import os
import re
from contextlib import AbstractContextManager, nullcontext
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
from polytask.tasks import Batch, Inputs, MultiTaskData, Task
from polytask.weighting.base import GradContext, Weighting

OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}

# ---- hardware options (device, precision, schedule, accumulation, optimizer kernels)
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
SCHEDULERS = ("none", "cosine", "linear")
OPTIMIZER_IMPLS = ("auto", "fused", "foreach", "loop")
_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
# Loss weightings whose update over micro-batches equals the larger batch's exactly: their objective is
# linear in the task losses with weights that do not depend on the losses or on the call (see Trainer).
ACCUMULATE_EXACT = ("ew", "dwa", "fixed")


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
    device: str = "cpu"  # cpu, cuda, cuda:N, mps, or auto (cuda > mps > cpu)
    precision: str = "fp32"  # fp32, bf16 or fp16 (autocast; fp16 with a GradScaler)
    scheduler: str = "none"  # none, cosine or linear decay per optimiser step (see lr_factor)
    warmup_steps: int = 0  # linear warm-up over this many optimiser steps
    warmup_fraction: float = 0.0  # ... or over this fraction of all optimiser steps
    accumulate: int = 1  # micro-batches of batch_size per optimiser step
    optimizer_impl: str = "auto"  # fused, foreach, loop, or auto (fused on CUDA, torch's default elsewhere)

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
        self._check_hardware()

    def _check_hardware(self) -> None:
        if not _DEVICE.fullmatch(self.device):
            raise PolytaskError(f"unknown device {self.device!r}; choose one of: auto, cpu, cuda, cuda:N, mps")
        for name, value, choices in (("precision", self.precision, tuple(PRECISIONS)),
                                     ("scheduler", self.scheduler, SCHEDULERS),
                                     ("optimizer_impl", self.optimizer_impl, OPTIMIZER_IMPLS)):
            if value not in choices:
                raise PolytaskError(f"unknown {name} {value!r}; choose one of: {', '.join(choices)}")
        if self.accumulate < 1:
            raise PolytaskError(f"accumulate must be at least 1 (micro-batches per optimiser step), got {self.accumulate}")
        if self.warmup_steps < 0:
            raise PolytaskError(f"warmup_steps must be non-negative, got {self.warmup_steps}")
        if not 0 <= self.warmup_fraction < 1:
            raise PolytaskError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if self.warmup_steps and self.warmup_fraction:
            raise PolytaskError("give warmup_steps or warmup_fraction, not both")

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
        """An extra scalar loss to add this step (e.g. a regulariser or distillation term).

        With ``accumulate > 1`` it is asked once per micro-batch and weighted by that micro-batch's
        share of the step's samples."""
        return None

    def joint_inputs(self, trainer: Trainer, batch: Batch) -> Inputs | None:
        """Inputs to forward in the same pass as the step's batch (e.g. replayed memory, for a model
        whose samples do not interact); :meth:`extra_loss` then finds their outputs in
        ``trainer.joint_outputs[self]``. Under a representation cut the trainer does not ask (the
        cut's rows must be the batch's), so :meth:`extra_loss` forwards its rows itself there."""
        return None

    def after_backward(self, trainer: Trainer, batch: Batch) -> None:
        """Called after gradients are computed, before the optimizer step (e.g. gradient projection); once per
        optimiser step, with its last micro-batch, and with fp16 gradients already unscaled."""

    def after_epoch(self, trainer: Trainer) -> None:
        """Called after each epoch, once its checkpoint is written."""

    def after_fit(self, trainer: Trainer) -> None:
        """Called once after training."""


def _length(x: Inputs) -> int:
    return len(next(iter(x.values()))) if isinstance(x, dict) else len(x)


def _join_inputs(xs: list[Inputs]) -> Inputs:
    """Concatenate inputs along the batch (tensors, or dicts of tensors field by field)."""
    if isinstance(xs[0], dict):
        return {k: torch.cat([x[k] for x in xs]) for k in xs[0]}  # type: ignore[index]
    return torch.cat(xs)  # type: ignore[arg-type]


def _split_outputs(outputs: dict[str, Tensor], sizes: list[int],
                   joint: dict[Hook, Inputs]) -> tuple[dict[str, Tensor], dict[Hook, dict[str, Tensor]]]:
    parts = {k: v.split(sizes) for k, v in outputs.items()}
    own = {k: p[0] for k, p in parts.items()}
    return own, {h: {k: p[i + 1] for k, p in parts.items()} for i, h in enumerate(joint)}


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch so the same seed gives the same numbers on CPU."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def init_distributed(backend: str = "gloo") -> bool:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); gloo on CPU, nccl on CUDA."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group(backend)
    return _world() > 1


# ------------------------------------------------------------------ hardware: device, precision, schedule
def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda, else mps, else cpu; a device this machine lacks is a one-line error.

    Under torchrun a plain ``cuda`` means this process's ``cuda:LOCAL_RANK``.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if _mps_available() else "cpu"
    kind, _, index = name.partition(":")
    present = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": _mps_available()}
    if not present.get(kind, False):
        raise PolytaskError(f"device {name!r} is not available on this machine (torch {torch.__version__} sees no "
                            f"{kind.upper()} device); use device=cpu, or auto for the best one present")
    if kind == "cuda":
        if not index and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            index = os.environ.get("LOCAL_RANK", "0")
        if index and int(index) >= torch.cuda.device_count():
            raise PolytaskError(f"device {name!r} does not exist; this machine has {torch.cuda.device_count()} "
                                "CUDA device(s), cuda:0 to cuda:N-1")
        return torch.device(f"cuda:{index}" if index else "cuda")
    return torch.device(kind)


def autocast(device: torch.device, precision: str) -> AbstractContextManager[Any]:
    """``torch.autocast`` for ``bf16``/``fp16`` on ``device`` (bf16 also runs on CPU); nothing for fp32."""
    dtype = PRECISIONS[precision]
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def to_device(batch: Batch, device: torch.device) -> Batch:
    """``batch`` with every tensor on ``device`` (``non_blocking``; CPU batches are returned as they are)."""
    if device.type == "cpu":
        return batch

    def move(t: Tensor) -> Tensor:
        return t.to(device, non_blocking=True)

    x = {k: move(v) for k, v in batch.x.items()} if isinstance(batch.x, dict) else move(batch.x)
    return Batch(x, {k: move(v) for k, v in batch.y.items()}, {k: move(v) for k, v in batch.mask.items()}, batch.full)


def lr_factor(step: int, total: int, warmup: int, kind: str) -> float:
    """The multiplier of the base learning rate at optimiser step ``step`` (0-based) of ``total``.

    As ``transformers.get_{constant,linear,cosine}_schedule_with_warmup``: ``step / warmup``
    during the warm-up, then with ``p = (step - warmup) / max(1, total - warmup)``

        none:    1
        linear:  max(0, 1 - p)
        cosine:  max(0, (1 + cos(pi p)) / 2)
    """
    if step < warmup:
        return step / warmup
    p = (step - warmup) / max(1, total - warmup)
    if kind == "linear":
        return max(0.0, 1.0 - p)
    if kind == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * p)))
    return 1.0


def micro_batch_shares(tasks: Sequence[Task], batches: Sequence[Batch]) -> tuple[Tensor, list[float]]:
    """How much each micro-batch's losses count in an accumulated step: [k, T] and [k].

    A task's loss over the union of the micro-batches is the mean over all its labelled samples,
    ``L_t = sum_i S_it / sum_i N_it`` (S: summed per-sample loss, N: labelled count), not the mean of
    the micro-batch means ``l_it = S_it / N_it``; so micro-batch ``i`` counts ``N_it / N_t`` and
    ``L_t = sum_i (N_it / N_t) l_it`` exactly. Extra losses (a strategy's regulariser, an
    architecture's auxiliary loss) count by the micro-batch's share of the samples.
    """
    counts = torch.tensor([[float(len(b)) if t.name in b.full else float(b.mask[t.name].sum()) for t in tasks]
                           for b in batches], dtype=torch.float64)
    sizes = [len(b) for b in batches]
    return counts / counts.sum(0).clamp(min=1.0), [n / sum(sizes) for n in sizes]


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
        # hooks that add rows to the step's forward (not under a representation cut, whose rows are the batch's)
        self._joint_hooks = [h for h in self.hooks if type(h).joint_inputs is not Hook.joint_inputs
                             and self.weighting.mode != "rep"]
        self.joint_outputs: dict[Hook, dict[str, Tensor]] = {}
        # ---- hardware: the model and the weighting live on the device; batches move there per step
        self.device = resolve_device(self.config.device)
        if self.device.type == "cuda" and self.device.index is not None:
            torch.cuda.set_device(self.device)
        model.to(self.device)
        self.weighting.to(self.device)
        self.distributed = init_distributed("nccl" if self.device.type == "cuda" else "gloo")
        self.ddp: nn.Module | None = None
        if self.distributed:
            ids = [self.device] if self.device.type == "cuda" else None
            self.ddp = nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)
        check_monitor(self.config.monitor, self.tasks)
        self.optimizer = self._make_optimizer()
        name = weighting if isinstance(weighting, str) else type(weighting).__name__
        self.ctx = GradContext(model, self.weighting.mode, weighting=name) if self.weighting.mode != "none" else None
        # a loss-based rule with a scalar objective: backpropagated in one pass with any extra loss
        self._one_pass = self.ctx is None and type(self.weighting).objective is not Weighting.objective
        self._check_weighting_hardware(name)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.config.precision == "fp16" else None
        self.scheduler: torch.optim.lr_scheduler.LambdaLR | None = None  # built by fit (it needs the step count)
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
        kwargs: dict[str, Any] = {"lr": cfg.lr, "weight_decay": cfg.weight_decay, **self._optimizer_impl()}
        if cfg.optimizer == "sgd":
            kwargs["momentum"] = 0.9
        try:
            return OPTIMIZERS[cfg.optimizer](params, **kwargs)
        except RuntimeError as exc:  # e.g. fused kernels for a device or dtype torch has none for
            raise PolytaskError(f"optimizer {cfg.optimizer!r} with optimizer_impl={cfg.optimizer_impl!r} is not "
                                f"supported here ({' '.join(str(exc).split())[:160]}); use optimizer_impl=auto") from exc

    def _optimizer_impl(self) -> dict[str, bool | None]:
        """torch's ``fused``/``foreach`` flags: ``auto`` is fused on CUDA and torch's own default elsewhere (on the
        CPU that default is the per-tensor loop, named so that torch does not re-derive it at every step)."""
        impl = self.config.optimizer_impl
        if impl == "auto":
            impl = {"cuda": "fused", "cpu": "loop"}.get(self.device.type, "default")
        return {"fused": {"fused": True}.get(impl), "foreach": {"foreach": True, "loop": False}.get(impl)}

    def _check_weighting_hardware(self, name: str) -> None:
        """fp16 and accumulation need a loss weighting backpropagated through its objective (one line otherwise)."""
        if self.config.precision == "fp16" and not self._one_pass:
            raise PolytaskError(f"precision fp16 needs a loss weighting; {name!r} reads per-task gradients, which a "
                                "GradScaler would scale: use precision bf16 (same range as fp32, no scaler)")
        exact = tuple(WEIGHTINGS.get(n) for n in ACCUMULATE_EXACT)
        if self.config.accumulate > 1 and not isinstance(self.weighting, exact):
            raise PolytaskError(f"accumulate > 1 equals one larger batch only for the weightings "
                                f"{', '.join(ACCUMULATE_EXACT)}; {name!r} combines the step's losses or gradients "
                                "non-linearly: raise batch_size instead, or use accumulate=1")

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
        steps_per_epoch = sampling.steps_per_epoch(train, [t.name for t in self.tasks], cfg.batch_size, cfg.sampling)
        self.scheduler = self._make_scheduler(cfg.epochs * math.ceil(steps_per_epoch / cfg.accumulate))
        if resume:
            self.load_checkpoint()
        stopped = resume and cfg.patience is not None and self.bad_epochs >= cfg.patience
        for hook in self.hooks:
            hook.before_fit(self)
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

    def _make_scheduler(self, total: int) -> torch.optim.lr_scheduler.LambdaLR | None:
        """A LambdaLR of :func:`lr_factor` over ``total`` optimiser steps (None without schedule or warm-up)."""
        cfg = self.config
        warmup = cfg.warmup_steps or round(cfg.warmup_fraction * total)
        if cfg.scheduler == "none" and warmup == 0:
            return None
        if warmup >= total:
            raise PolytaskError(f"the warm-up ({warmup} steps) must be shorter than the run's {total} optimiser steps; "
                                "lower warmup_steps/warmup_fraction or train longer")
        kind = cfg.scheduler

        def factor(step: int) -> float:  # a function: the state_dict keeps no horizon, so more epochs on resume stretch it
            return lr_factor(step, total, warmup, kind)

        return torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)

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
        total = torch.zeros(len(self.tasks), device=self.device)
        weight_sum = torch.zeros(len(self.tasks), device=self.device)
        n = 0
        group: list[Batch] = []
        for batch in itertools.chain(self._batches(data), [None]):
            if batch is not None:
                group.append(batch)
            if group and (batch is None or len(group) == self.config.accumulate):  # a full group, or the epoch's rest
                losses = self.train_step(net, group[0] if len(group) == 1 else group)
                self.samples_seen += sum(len(b) for b in group)
                total += losses[0].to(total)
                weight_sum += losses[1].to(weight_sum)
                n += 1
                progress.advance(task_id, len(group))
                group = []
        total, weight_sum = total.cpu(), weight_sum.cpu()
        mean = total / max(n, 1)
        if not torch.isfinite(mean).all():
            bad = self.tasks[int((~torch.isfinite(mean)).nonzero()[0])].name
            raise PolytaskError(f"the loss of task {bad!r} became NaN or infinite in epoch {self.epoch + 1}; "
                                "lower the learning rate (lr=...) or check that task's labels")
        return mean, weight_sum / max(n, 1)

    def train_step(self, net: nn.Module, batch: Batch | Sequence[Batch]) -> tuple[Tensor, Tensor]:
        """One optimisation step on ``batch``, or on a list of micro-batches accumulated into one step
        (:func:`micro_batch_shares`); returns the detached task losses and task weights."""
        micro = [batch] if isinstance(batch, Batch) else list(batch)
        self.optimizer.zero_grad(set_to_none=True)
        # an architecture may redefine the labels its losses are taken on (ESMM/AITM: entire-space chains)
        loss_batches = [self.model.loss_batch(b) if hasattr(self.model, "loss_batch") else b for b in micro]
        shares, sample_shares = micro_batch_shares(self.tasks, loss_batches) if len(micro) > 1 else (None, [1.0])
        step_losses: Tensor | None = None
        for i, (b, lb) in enumerate(zip(micro, loss_batches)):
            dev_b = to_device(b, self.device)
            dev_lb = dev_b if lb is b else to_device(lb, self.device)
            last = i == len(micro) - 1
            sync = self.ddp.no_sync() if self.ddp is not None and not last else nullcontext()  # reduce once per step
            with sync:  # type: ignore[attr-defined]
                losses, weights = self._backward(net, dev_b, dev_lb, None if shares is None else shares[i],
                                                 sample_shares[i])
            step_losses = losses if step_losses is None else step_losses + losses
        assert step_losses is not None
        if self.distributed:
            for p in self.weighting.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= _world()
        if self.scaler is not None:  # hooks and clipping read true gradients
            self.scaler.unscale_(self.optimizer)
        for hook in self.hooks:
            hook.after_backward(self, dev_b)
        if self.config.grad_clip:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self._optimizer_step()
        self.step += 1
        return step_losses, weights.detach()

    def _backward(self, net: nn.Module, batch: Batch, loss_batch: Batch, share: Tensor | None,
                  sample_share: float) -> tuple[Tensor, Tensor]:
        """Forward and backward of one (micro-)batch; ``share`` [T] scales its task losses in an
        accumulated step. Returns its detached (scaled) task losses and the task weights."""
        joint = {h: x for h in self._joint_hooks if (x := h.joint_inputs(self, batch)) is not None}
        with autocast(self.device, self.config.precision):
            with self.model.representation_cut() if self.weighting.mode == "rep" else nullcontext():
                outputs = net(_join_inputs([batch.x, *joint.values()]) if joint else batch.x)
            self.joint_outputs = {}
            if joint:  # the step's rows first, then each hook's
                outputs, self.joint_outputs = _split_outputs(outputs, [len(batch), *map(_length, joint.values())], joint)
            losses = masked_task_losses(self.tasks, outputs, loss_batch)
            extra = self.model.aux_loss if isinstance(self.model, AuxiliaryLoss) else None
            for hook in self.hooks:
                term = hook.extra_loss(self, batch, outputs)
                if term is not None:
                    extra = term if extra is None else extra + term
        if self.config.precision != "fp32":  # weightings and per-task gradients work in float32
            losses = losses.float()
            extra = None if extra is None else extra.float()
        if share is not None:
            losses = losses * share.to(losses)
            extra = None if extra is None else extra * sample_share
        if self._one_pass:
            total, weights = self.weighting.objective(losses)
            loss = total if extra is None else total + extra
            (loss if self.scaler is None else self.scaler.scale(loss)).backward()
        else:
            if extra is not None:
                extra.backward(retain_graph=True)
            if self.ctx is not None:
                self.ctx.reset()
            sync = self.ddp.no_sync() if self.ddp is not None and self.ctx is not None else nullcontext()
            with sync:  # type: ignore[attr-defined]
                weights = self.weighting.backward(losses, self.ctx)
        return losses.detach(), weights

    def _optimizer_step(self) -> None:
        """The optimizer step (through the GradScaler under fp16), then the schedule's step.

        A step the scaler skips (inf/NaN gradients) does not advance the schedule."""
        stepped = True
        if self.scaler is None:
            self.optimizer.step()
        else:
            scale = self.scaler.get_scale()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            stepped = self.scaler.get_scale() >= scale
        if self.scheduler is not None and stepped:
            self.scheduler.step()

    # ----------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self, data: MultiTaskData) -> Results:
        """Per-task torchmetrics over the labelled samples of ``data``, plus each task's loss."""
        return evaluate_model(self.model, self.tasks, data, self.config.eval_batch_size, self.config.precision)

    def _track_best(self, results: Results) -> bool:
        cfg = self.config
        score = monitor_value(results, cfg.monitor, self.tasks)
        if self.best_score is None or score > self.best_score:
            self.best_score = score
            self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
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
        state = {"optimizer": self.optimizer.state_dict(), "weighting": self.weighting.state_dict(),
                 "epoch": self.epoch, "step": self.step, "history": self.history,
                 "best_score": self.best_score, "bad_epochs": self.bad_epochs,
                 "torch_rng": torch.get_rng_state(), "config": asdict(self.config),
                 "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
                 "scaler": None if self.scaler is None else self.scaler.state_dict()}
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        return _to_cpu(state)

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
        self.optimizer.load_state_dict(state["optimizer"])  # moves its tensors to the parameters' device
        for group in self.optimizer.param_groups:  # this run's kernels, not the saved run's (the device may differ)
            group.update(self._optimizer_impl())
        self.weighting.load_state_dict(state["weighting"])
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler") is not None:
            self.scaler.load_state_dict(state["scaler"])
        if self.device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        self.best_state = best
        self.epoch, self.step = state["epoch"], state["step"]
        self.history, self.best_score, self.bad_epochs = state["history"], state["best_score"], state["bad_epochs"]
        torch.set_rng_state(state["torch_rng"])


def _to_cpu(obj: Any) -> Any:
    """``obj`` (nested dicts/lists/tuples) with every tensor on the CPU, so a checkpoint loads on any device."""
    if isinstance(obj, Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


@torch.no_grad()
def evaluate_model(model: nn.Module, tasks: Sequence[Task], data: MultiTaskData, batch_size: int = 2048,
                   precision: str = "fp32") -> Results:
    """Per-task torchmetrics (and mean loss) over the samples that carry each task's label.

    Runs on the device of the model's parameters (batches move there), under ``precision``'s autocast.
    """
    model.eval()
    device = next(itertools.chain(model.parameters(), model.buffers()), torch.empty(0)).device
    metrics = {t.name: t.make_metrics().to(device) for t in tasks}
    loss_sum = {t.name: 0.0 for t in tasks}
    count = {t.name: 0 for t in tasks}
    for batch in data.batches(batch_size):
        batch = to_device(batch, device)
        with autocast(device, precision):
            outputs = model(batch.x)
        for t in tasks:
            m = batch.mask[t.name]
            if not m.any():
                continue
            out, y = outputs[t.name][m], batch.y[t.name][m]
            out = out.float() if out.dtype in (torch.float16, torch.bfloat16) else out
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
