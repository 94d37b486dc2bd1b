"""Task kinds: everything that differs between binary, multiclass, multilabel, regression, token,
seq2seq and ranking tasks.

A kind owns its outputs, per-sample loss, predictions and metrics, and the targets that other
methods derive from an output: labels sampled from it (EWC's Fisher), the tempered distillation
loss (LwF), the output KL (Controllable) and zero labels for samples without the task (replay
buffers). A new kind is one class here, registered with ``@register``.

Sequence kinds (``token``, ``seq2seq``; ``sequence_output``) take one output per position, [B, L, C],
and label [B, L] with ``IGNORE`` (-100) where a position has no target; a sample without the task
at all is masked as for every kind. ``ranking`` labels are [B, 2]: the relevance and the group the
sample is ranked within, so its metrics (GAUC, NDCG@k) can group the scores.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from polytask.errors import PolytaskError
from polytask.scoring import IGNORE, group_auc  # noqa: F401  (group_auc re-exported from here)

if TYPE_CHECKING:
    import torchmetrics as tm

MetricTable = dict[str, Callable[[], "tm.Metric"]]


class TaskKind(ABC):
    """One kind of prediction target; ``num_classes`` counts classes or labels where ``per_class``."""

    name: ClassVar[str]
    default_metrics: ClassVar[tuple[str, ...]]
    per_class: ClassVar[bool] = False  # one output per class or label
    categorical: ClassVar[bool] = False  # labels are class ids
    sequence_output: ClassVar[bool] = False  # one output per input position [B, L, ...] (a token-level head)

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
        import torchmetrics as tm

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
        import torchmetrics as tm

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
        import torchmetrics as tm

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
        import torchmetrics as tm

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


# ---------------------------------------------------------------- sequence kinds: token and seq2seq



def _per_sample_ce(output: Tensor, target: Tensor) -> Tensor:
    """[B] mean cross-entropy over each sample's labelled positions (0 where none is labelled)."""
    ce = F.cross_entropy(output.transpose(1, 2), target.long(), ignore_index=IGNORE, reduction="none")
    return ce.sum(1) / (target != IGNORE).sum(1).clamp(min=1)


def _aligned(output: Tensor, target: Tensor, kind: str) -> Tensor:
    """``output`` [B, L, C] cut to the target's length L' <= L."""
    if output.dim() != 3 or target.dim() != 2 or target.shape[1] > output.shape[1]:
        raise PolytaskError(f"a {kind} task needs outputs [B, L, C] and labels [B, L'] with L' <= L, not "
                            f"{tuple(output.shape)} and {tuple(target.shape)}; use a backbone with per-token states")
    return output[:, :target.shape[1]]


class _PerPosition(TaskKind):
    """A softmax over classes at every position; positions labelled ``IGNORE`` carry no target."""

    per_class = True
    categorical = True
    sequence_output = True

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        return _per_sample_ce(_aligned(output, target, self.name), target)

    def sample_labels(self, output: Tensor, generator: torch.Generator) -> Tensor:
        """One class per position (every position: the output does not say which are padding)."""
        probs = output.softmax(-1).reshape(-1, output.shape[-1])
        return torch.multinomial(probs, 1, generator=generator).reshape(output.shape[:-1])

    def distillation(self, new: Tensor, old: Tensor, temperature: float) -> Tensor:
        target = (old / temperature).softmax(-1)
        return -(target * F.log_softmax(new / temperature, -1)).sum(-1).mean()

    def output_kl(self, student: Tensor, teacher: Tensor) -> Tensor:
        kl = F.kl_div(student.log_softmax(-1), teacher.log_softmax(-1), reduction="none", log_target=True)
        return kl.sum(-1).mean()

    def metric_target(self, y: Tensor) -> Tensor:
        return y.long()

    def empty_labels(self, n: int, num_classes: int) -> Tensor:
        raise PolytaskError(f"{self.name} labels have one entry per position, so samples without the task cannot "
                            "be stored; use a strategy without a replay buffer, or label every sample")

    def labels(self, y: Tensor, mask: Tensor) -> tuple[Tensor, int]:
        y = y.long()
        real = y[mask][y[mask] != IGNORE]
        return y, (int(real.max().item()) + 1 if real.numel() else 2)


@register
class Token(_PerPosition):
    """Token classification (e.g. a part of speech per word): labels [B, L] with ``IGNORE`` (-100) at
    padding and unlabelled tokens; the loss is each sample's mean cross-entropy over its labelled
    tokens; accuracy and F1 count labelled tokens only."""

    name = "token"
    default_metrics = ("accuracy", "f1")

    def metric_table(self, n: int) -> MetricTable:
        import torchmetrics as tm

        return {"accuracy": lambda: tm.Accuracy(task="multiclass", num_classes=n, average="micro", ignore_index=IGNORE),
                "f1": lambda: tm.F1Score(task="multiclass", num_classes=n, average="macro", ignore_index=IGNORE)}

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        if output.shape[:2] != target.shape:
            raise PolytaskError(f"a token task needs outputs [B, L, C] and labels [B, L], not {tuple(output.shape)} "
                                f"and {tuple(target.shape)}; use a backbone with per-token states (pool='tokens')")
        return _per_sample_ce(output, target)

    def predict(self, output: Tensor) -> Tensor:
        return output.softmax(-1).transpose(1, 2)  # [B, C, L], torchmetrics' multidimensional layout


@register
class Seq2Seq(_PerPosition):
    """Sequence output over a vocabulary of ``num_classes`` tokens: labels [B, L'] target token ids
    (``IGNORE`` after the end); outputs [B, L, V] next-token logits at the target positions (L >= L').
    The loss is each sample's mean cross-entropy over its target tokens. Predictions are the argmax at
    each target position: of teacher-forced logits, or of the logits of the model's own decoding where
    the architecture outputs those at evaluation (``seq2seq-lm``: greedy ``generate``); metrics: exact
    match, token accuracy, BLEU-4 and ROUGE-L over the target token ids."""

    name = "seq2seq"
    default_metrics = ("exact_match", "bleu")

    def metric_table(self, n: int) -> MetricTable:
        import polytask.kind_metrics as km

        return {"exact_match": km.ExactMatch, "token_accuracy": km.TokenAccuracy, "bleu": lambda: km.TokenBLEU(n_gram=4),
                "rouge_l": km.TokenROUGEL}

    def predict(self, output: Tensor) -> Tensor:
        return output.argmax(-1)


# ---------------------------------------------------------------- ranking

@register
class Ranking(TaskKind):
    """Per-group scores (a user's impressions, a query's documents): labels [B, 2] = (relevance in
    [0, 1], group id); one logit per sample, trained pointwise with binary cross-entropy on the
    relevance (CTR training); metrics GAUC, NDCG@k within each group (k = 5, 10) and log loss."""

    name = "ranking"
    default_metrics = ("gauc", "ndcg@10", "logloss")

    def metric_table(self, n: int) -> MetricTable:
        import polytask.kind_metrics as km

        return {"gauc": km.GAUC, "ndcg@5": lambda: km.GroupNDCG(5), "ndcg@10": lambda: km.GroupNDCG(10),
                "logloss": km.LogLoss, "auroc": km.GlobalAUROC}

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        return F.binary_cross_entropy_with_logits(output.reshape(-1), target[:, 0].float(), reduction="none")

    def predict(self, output: Tensor) -> Tensor:
        return output.reshape(-1).sigmoid()

    def metric_target(self, y: Tensor) -> Tensor:
        return y

    def sample_labels(self, output: Tensor, generator: torch.Generator) -> Tensor:
        """Bernoulli relevances; the group column is zero (the output does not carry the groups)."""
        rel = torch.bernoulli(output.reshape(-1).sigmoid(), generator=generator)
        return torch.stack([rel, torch.zeros_like(rel)], 1)

    def distillation(self, new: Tensor, old: Tensor, temperature: float) -> Tensor:
        return F.binary_cross_entropy_with_logits(new / temperature, torch.sigmoid(old / temperature))

    def output_kl(self, student: Tensor, teacher: Tensor) -> Tensor:
        return KINDS["binary"].output_kl(student, teacher)

    def empty_labels(self, n: int, num_classes: int) -> Tensor:
        return torch.zeros((n, 2), dtype=torch.float32)

    def labels(self, y: Tensor, mask: Tensor) -> tuple[Tensor, int]:
        y = y.double()
        if y.dim() != 2 or y.shape[1] != 2:
            raise PolytaskError(f"ranking labels are [N, 2] (relevance, group id), not {tuple(y.shape)}")
        groups = y[mask][:, 1]
        if bool((groups != groups.round()).any()) or (groups.numel() and float(groups.abs().max()) >= 2 ** 24):
            raise PolytaskError("ranking group ids must be whole numbers below 2**24 (they are stored as float32); "
                                "renumber the groups 0..G-1")
        return y.float(), 1
