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


# ---------------------------------------------------------------- sequence kinds: token and seq2seq

IGNORE = -100  #: label of a position without a target (padding, a missing label, a subword after the first)


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
        return {"accuracy": lambda: tm.Accuracy(task="multiclass", num_classes=n, average="micro", ignore_index=IGNORE),
                "f1": lambda: tm.F1Score(task="multiclass", num_classes=n, average="macro", ignore_index=IGNORE)}

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        if output.shape[:2] != target.shape:
            raise PolytaskError(f"a token task needs outputs [B, L, C] and labels [B, L], not {tuple(output.shape)} "
                                f"and {tuple(target.shape)}; use a backbone with per-token states (pool='tokens')")
        return _per_sample_ce(output, target)

    def predict(self, output: Tensor) -> Tensor:
        return output.softmax(-1).transpose(1, 2)  # [B, C, L], torchmetrics' multidimensional layout


def _real(preds: Tensor, target: Tensor) -> list[tuple[list[int], list[int]]]:
    """(predicted, target) id lists over each sample's labelled positions."""
    keep = target != IGNORE
    p = preds[:, :target.shape[1]]
    return [(p[i][keep[i]].tolist(), target[i][keep[i]].tolist()) for i in range(len(target))]


def _words(ids: list[int]) -> str:
    return " ".join(map(str, ids))


class ExactMatch(tm.Metric):
    """Share of sequences whose every labelled position is predicted exactly."""

    higher_is_better = True

    def __init__(self) -> None:
        super().__init__()
        self.add_state("exact_hits", torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("exact_count", torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        hit = ((preds[:, :target.shape[1]] == target) | (target == IGNORE)).all(1)
        self.exact_hits += hit.sum()
        self.exact_count += len(target)

    def compute(self) -> Tensor:
        return self.exact_hits / self.exact_count.clamp(min=1)


class TokenAccuracy(tm.Metric):
    """Share of labelled positions predicted exactly."""

    higher_is_better = True

    def __init__(self) -> None:
        super().__init__()
        self.add_state("token_hits", torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("token_count", torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        keep = target != IGNORE
        self.token_hits += ((preds[:, :target.shape[1]] == target) & keep).sum()
        self.token_count += keep.sum()

    def compute(self) -> Tensor:
        return self.token_hits / self.token_count.clamp(min=1)


class TokenBLEU(tm.text.BLEUScore):
    """torchmetrics' corpus BLEU (Papineni et al., ACL 2002) with the token ids as words."""

    def update(self, preds: Tensor, target: Tensor) -> None:  # type: ignore[override]
        pairs = _real(preds, target)
        super().update([_words(p) for p, _ in pairs], [[_words(t)] for _, t in pairs])


class TokenROUGEL(tm.text.ROUGEScore):
    """torchmetrics' ROUGE-L F-measure (Lin, 2004; longest common subsequence) with the token ids as words."""

    def __init__(self) -> None:
        super().__init__(rouge_keys=("rougeL",), tokenizer=str.split)

    def update(self, preds: Tensor, target: Tensor) -> None:  # type: ignore[override]
        pairs = _real(preds, target)
        super().update([_words(p) for p, _ in pairs], [_words(t) for _, t in pairs])

    def compute(self) -> Tensor:  # type: ignore[override]
        return super().compute()["rougeL_fmeasure"]


@register
class Seq2Seq(_PerPosition):
    """Sequence output over a vocabulary of ``num_classes`` tokens: labels [B, L'] target token ids
    (``IGNORE`` after the end); outputs [B, L, V] next-token logits at the target positions (L >= L').
    The loss is each sample's mean cross-entropy over its target tokens. Predictions are the argmax at
    each target position (teacher forcing, no decoding); metrics: exact match, token accuracy, BLEU-4
    and ROUGE-L over the target token ids."""

    name = "seq2seq"
    default_metrics = ("exact_match", "bleu")

    def metric_table(self, n: int) -> MetricTable:
        return {"exact_match": ExactMatch, "token_accuracy": TokenAccuracy, "bleu": lambda: TokenBLEU(n_gram=4),
                "rouge_l": TokenROUGEL}

    def predict(self, output: Tensor) -> Tensor:
        return output.argmax(-1)


# ---------------------------------------------------------------- ranking

def group_auc(scores: Tensor, labels: Tensor, groups: Tensor) -> Tensor:
    """GAUC (Zhou et al., "Deep Interest Network for Click-Through Rate Prediction", KDD 2018, Sec. 6.1):
    the impression-weighted mean of the per-group AUCs,

        GAUC = Σ_g n_g AUC_g / Σ_g n_g,

    over the groups g (users, queries) that have both positive and negative samples; AUC_g is the
    Mann-Whitney statistic with ties counted one half. NaN if no group has both."""
    labels = labels > 0.5
    order = torch.argsort(scores, stable=True)
    order = order[torch.argsort(groups[order], stable=True)]  # by group, then by score
    g, s, y = groups[order], scores[order], labels[order]
    _, group_of, group_size = torch.unique_consecutive(g, return_inverse=True, return_counts=True)
    start = torch.cumsum(group_size, 0) - group_size
    # average 1-based rank within the group, ties shared: runs of equal (group, score)
    new_run = torch.ones(len(s), dtype=torch.bool)
    new_run[1:] = (g[1:] != g[:-1]) | (s[1:] != s[:-1])
    run = torch.cumsum(new_run, 0) - 1
    run_first = torch.nonzero(new_run).squeeze(1)
    run_size = torch.bincount(run)
    position = run_first[run].double() + (run_size[run].double() - 1) / 2 - start[group_of].double() + 1
    n_groups = len(group_size)
    pos = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, group_of, y.double())
    neg = group_size.double() - pos
    rank_sum = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, group_of, position * y.double())
    both = (pos > 0) & (neg > 0)
    auc = (rank_sum[both] - pos[both] * (pos[both] + 1) / 2) / (pos[both] * neg[both])
    weight = group_size[both].double()
    return (auc * weight).sum() / weight.sum() if bool(both.any()) else torch.tensor(float("nan"))


def _split_ranking(target: Tensor) -> tuple[Tensor, Tensor]:
    return target[:, 0], target[:, 1].long()


class GAUC(tm.Metric):
    """:func:`group_auc` over all updates (scores, (label, group) targets)."""

    higher_is_better = True

    def __init__(self) -> None:
        super().__init__()
        for state in ("gauc_scores", "gauc_labels", "gauc_groups"):
            self.add_state(state, default=[], dist_reduce_fx="cat")

    def update(self, preds: Tensor, target: Tensor) -> None:
        labels, groups = _split_ranking(target)
        self.gauc_scores.append(preds.float())
        self.gauc_labels.append(labels.float())
        self.gauc_groups.append(groups)

    def compute(self) -> Tensor:
        cat = tm.utilities.dim_zero_cat
        return group_auc(cat(self.gauc_scores), cat(self.gauc_labels), cat(self.gauc_groups)).float()


class GroupNDCG(tm.retrieval.RetrievalNormalizedDCG):
    """torchmetrics' NDCG@k (Järvelin & Kekäläinen, 2002) per group, averaged over the groups with a
    relevant sample; graded relevances allowed."""

    def __init__(self, top_k: int) -> None:
        super().__init__(top_k=top_k, empty_target_action="skip")

    def update(self, preds: Tensor, target: Tensor) -> None:  # type: ignore[override]
        labels, groups = _split_ranking(target)
        super().update(preds, labels, indexes=groups)


class LogLoss(tm.Metric):
    """Mean binary cross-entropy of the predicted probabilities against the labels (in [0, 1])."""

    higher_is_better = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("logloss_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("logloss_count", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        p = preds.double().clamp(1e-7, 1 - 1e-7)
        self.logloss_sum += F.binary_cross_entropy(p, target[:, 0].double().clamp(0, 1), reduction="sum")
        self.logloss_count += len(p)

    def compute(self) -> Tensor:
        return (self.logloss_sum / self.logloss_count.clamp(min=1)).float()


@register
class Ranking(TaskKind):
    """Per-group scores (a user's impressions, a query's documents): labels [B, 2] = (relevance in
    [0, 1], group id); one logit per sample, trained pointwise with binary cross-entropy on the
    relevance (CTR training); metrics GAUC, NDCG@k within each group (k = 5, 10) and log loss."""

    name = "ranking"
    default_metrics = ("gauc", "ndcg@10", "logloss")

    def metric_table(self, n: int) -> MetricTable:
        return {"gauc": GAUC, "ndcg@5": lambda: GroupNDCG(5), "ndcg@10": lambda: GroupNDCG(10), "logloss": LogLoss,
                "auroc": _GlobalAUROC}

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


class _GlobalAUROC(tm.classification.BinaryAUROC):
    """AUROC over all samples, ignoring the groups."""

    def update(self, preds: Tensor, target: Tensor) -> None:  # type: ignore[override]
        super().update(preds, (target[:, 0] > 0.5).long())
