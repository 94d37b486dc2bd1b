"""The torchmetrics the sequence and ranking kinds add (exact match, token accuracy, BLEU, ROUGE-L,
GAUC, NDCG@k, log loss, global AUROC). :mod:`polytask.kinds` imports this module on first use, so
``import polytask`` does not load torchmetrics."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchmetrics as tm
from torch import Tensor

from polytask.scoring import IGNORE, group_auc, id_words, real_pairs, split_ranking


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
        pairs = real_pairs(preds, target)
        super().update([id_words(p) for p, _ in pairs], [[id_words(t)] for _, t in pairs])


class TokenROUGEL(tm.text.ROUGEScore):
    """torchmetrics' ROUGE-L F-measure (Lin, 2004; longest common subsequence) with the token ids as words."""

    def __init__(self) -> None:
        super().__init__(rouge_keys=("rougeL",), tokenizer=str.split)

    def update(self, preds: Tensor, target: Tensor) -> None:  # type: ignore[override]
        pairs = real_pairs(preds, target)
        super().update([id_words(p) for p, _ in pairs], [id_words(t) for _, t in pairs])

    def compute(self) -> Tensor:  # type: ignore[override]
        return super().compute()["rougeL_fmeasure"]


class GAUC(tm.Metric):
    """:func:`group_auc` over all updates (scores, (label, group) targets)."""

    higher_is_better = True

    def __init__(self) -> None:
        super().__init__()
        for state in ("gauc_scores", "gauc_labels", "gauc_groups"):
            self.add_state(state, default=[], dist_reduce_fx="cat")

    def update(self, preds: Tensor, target: Tensor) -> None:
        labels, groups = split_ranking(target)
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
        labels, groups = split_ranking(target)
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


class GlobalAUROC(tm.classification.BinaryAUROC):
    """AUROC over all samples, ignoring the groups."""

    def update(self, preds: Tensor, target: Tensor) -> None:  # type: ignore[override]
        super().update(preds, (target[:, 0] > 0.5).long())
