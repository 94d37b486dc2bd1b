"""Task kinds: everything that differs between binary, multiclass, multilabel and regression tasks.

A kind owns its outputs, per-sample loss, predictions and metrics, and the targets that other
methods derive from an output: labels sampled from it (EWC's Fisher), the tempered distillation
loss (LwF), the output KL (Controllable) and zero labels for samples without the task (replay
buffers). A new kind is one class here, registered with ``@register``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, ClassVar

import torch
import torch.nn.functional as F
import torchmetrics as tm
from torch import Tensor

from polytask.errors import PolytaskError

MetricTable = dict[str, Callable[[], tm.Metric]]


class TaskKind(ABC):
    """One kind of prediction target; ``num_classes`` counts classes or labels where ``per_class``."""

    name: ClassVar[str]
    default_metrics: ClassVar[tuple[str, ...]]
    per_class: ClassVar[bool] = False  # one output per class or label
    categorical: ClassVar[bool] = False  # labels are class ids

    def out_dim(self, num_classes: int) -> int:
        return num_classes if self.per_class else 1

    @abstractmethod
    def metric_table(self, n: int) -> MetricTable:
        """Factories of the torchmetrics that apply to this kind, for ``n`` outputs."""

    def metric(self, name: str, n: int) -> tm.Metric:
        """The torchmetrics object for metric ``name`` with ``n`` outputs."""
        table = self.metric_table(n)
        if name not in table:
            raise PolytaskError(f"metric {name!r} does not apply to a {self.name} task; use one of: {', '.join(sorted(table))}")
        return table[name]()

    @abstractmethod
    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        """Per-sample loss, shape [B]."""

    @abstractmethod
    def predict(self, output: Tensor) -> Tensor:
        """Raw outputs as the metrics consume them (probabilities or values)."""

    @abstractmethod
    def metric_target(self, y: Tensor) -> Tensor:
        """Labels as the metrics consume them."""

    @abstractmethod
    def sample_labels(self, output: Tensor, generator: torch.Generator) -> Tensor:
        """Labels drawn from the predictive distribution p(y|x) given by ``output``."""

    @abstractmethod
    def distillation(self, new: Tensor, old: Tensor, temperature: float) -> Tensor:
        """Batch mean of the tempered distillation loss pulling ``new`` outputs towards ``old`` (LwF)."""

    @abstractmethod
    def output_kl(self, student: Tensor, teacher: Tensor) -> Tensor:
        """KL(teacher || student) of the predictive distributions (squared error for values)."""

    def empty_labels(self, n: int, num_classes: int) -> Tensor:
        """Zero labels for ``n`` samples that do not carry the task."""
        return torch.zeros((n,), dtype=torch.float32)

    def labels(self, y: Tensor, mask: Tensor) -> tuple[Tensor, int]:
        """Raw labels in this kind's dtype and the ``num_classes`` they imply (``mask``: labelled rows)."""
        return y.float(), 1


KINDS: dict[str, TaskKind] = {}


def register(cls: type[TaskKind]) -> type[TaskKind]:
    """Class decorator: make kind ``cls.name`` available to ``Task``."""
    KINDS[cls.name] = cls()
    return cls


def get_kind(name: str, task: str) -> TaskKind:
    """The kind called ``name`` (of task ``task``, for the error message)."""
    if name not in KINDS:
        raise PolytaskError(f"task {task!r} has kind {name!r}; use one of: {', '.join(KINDS)}")
    return KINDS[name]


class _Sigmoid(TaskKind):
    """Independent sigmoid outputs: tempered-sigmoid distillation and a Bernoulli KL."""

    def distillation(self, new: Tensor, old: Tensor, temperature: float) -> Tensor:
        return F.binary_cross_entropy_with_logits(new / temperature, torch.sigmoid(old / temperature))

    def output_kl(self, student: Tensor, teacher: Tensor) -> Tensor:
        p = torch.sigmoid(teacher)
        kl = (p * (F.logsigmoid(teacher) - F.logsigmoid(student))
              + (1 - p) * (F.logsigmoid(-teacher) - F.logsigmoid(-student)))
        return kl.sum(-1).mean()


@register
class Binary(_Sigmoid):
    """One logit, binary cross-entropy."""

    name = "binary"
    default_metrics = ("auroc", "accuracy")

    def metric_table(self, n: int) -> MetricTable:
        return {"auroc": lambda: tm.AUROC(task="binary"), "accuracy": lambda: tm.Accuracy(task="binary"),
                "f1": lambda: tm.F1Score(task="binary"), "ap": lambda: tm.AveragePrecision(task="binary")}

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        return F.binary_cross_entropy_with_logits(output.reshape(-1), target.float().reshape(-1), reduction="none")

    def predict(self, output: Tensor) -> Tensor:
        return output.reshape(-1).sigmoid()

    def metric_target(self, y: Tensor) -> Tensor:
        return y.long().reshape(-1)

    def sample_labels(self, output: Tensor, generator: torch.Generator) -> Tensor:
        return torch.bernoulli(output.sigmoid(), generator=generator).reshape(-1)


@register
class Multiclass(TaskKind):
    """One of ``num_classes`` classes: softmax cross-entropy."""

    name = "multiclass"
    default_metrics = ("accuracy", "f1")
    per_class = True
    categorical = True

    def metric_table(self, n: int) -> MetricTable:
        return {"accuracy": lambda: tm.Accuracy(task="multiclass", num_classes=n, average="micro"),
                "f1": lambda: tm.F1Score(task="multiclass", num_classes=n, average="macro"),
                "auroc": lambda: tm.AUROC(task="multiclass", num_classes=n)}

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(output, target.long(), reduction="none")

    def predict(self, output: Tensor) -> Tensor:
        return output.softmax(-1)

    def metric_target(self, y: Tensor) -> Tensor:
        return y.long()

    def sample_labels(self, output: Tensor, generator: torch.Generator) -> Tensor:
        return torch.multinomial(output.softmax(-1), 1, generator=generator).reshape(-1)

    def distillation(self, new: Tensor, old: Tensor, temperature: float) -> Tensor:
        target = (old / temperature).softmax(-1)
        return -(target * F.log_softmax(new / temperature, -1)).sum(-1).mean()

    def output_kl(self, student: Tensor, teacher: Tensor) -> Tensor:
        return F.kl_div(student.log_softmax(-1), teacher.log_softmax(-1), reduction="batchmean", log_target=True)

    def empty_labels(self, n: int, num_classes: int) -> Tensor:
        return torch.zeros((n,), dtype=torch.long)

    def labels(self, y: Tensor, mask: Tensor) -> tuple[Tensor, int]:
        y = y.long()
        return y, (int(y[mask].max().item()) + 1 if mask.any() else 2)


@register
class Multilabel(_Sigmoid):
    """``num_classes`` independent labels: binary cross-entropy averaged over the labels."""

    name = "multilabel"
    default_metrics = ("auroc", "f1")
    per_class = True

    def metric_table(self, n: int) -> MetricTable:
        return {"auroc": lambda: tm.AUROC(task="multilabel", num_labels=n),
                "f1": lambda: tm.F1Score(task="multilabel", num_labels=n, average="macro"),
                "accuracy": lambda: tm.Accuracy(task="multilabel", num_labels=n),
                "ap": lambda: tm.AveragePrecision(task="multilabel", num_labels=n)}

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        return F.binary_cross_entropy_with_logits(output, target.float(), reduction="none").mean(-1)

    def predict(self, output: Tensor) -> Tensor:
        return output.sigmoid()

    def metric_target(self, y: Tensor) -> Tensor:
        return y.long()

    def sample_labels(self, output: Tensor, generator: torch.Generator) -> Tensor:
        return torch.bernoulli(output.sigmoid(), generator=generator)

    def empty_labels(self, n: int, num_classes: int) -> Tensor:
        return torch.zeros((n, num_classes), dtype=torch.float32)

    def labels(self, y: Tensor, mask: Tensor) -> tuple[Tensor, int]:
        y = y.float()
        return y, (y.shape[1] if y.dim() == 2 else 0)


@register
class Regression(TaskKind):
    """One value: squared error; sampled labels add unit Gaussian noise."""

    name = "regression"
    default_metrics = ("mse", "mae")

    def metric_table(self, n: int) -> MetricTable:
        return {"mse": lambda: tm.MeanSquaredError(), "rmse": lambda: tm.MeanSquaredError(squared=False),
                "mae": lambda: tm.MeanAbsoluteError(), "r2": lambda: tm.R2Score()}

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        return F.mse_loss(output.reshape(-1), target.float().reshape(-1), reduction="none")

    def predict(self, output: Tensor) -> Tensor:
        return output.reshape(-1)

    def metric_target(self, y: Tensor) -> Tensor:
        return y.float()

    def sample_labels(self, output: Tensor, generator: torch.Generator) -> Tensor:
        return output.reshape(-1) + torch.randn(output.shape[0], generator=generator)

    def distillation(self, new: Tensor, old: Tensor, temperature: float) -> Tensor:
        return F.mse_loss(new, old)

    def output_kl(self, student: Tensor, teacher: Tensor) -> Tensor:
        return F.mse_loss(student, teacher)
