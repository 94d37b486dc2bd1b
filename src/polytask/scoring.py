"""Pure torch helpers the task kinds and their metrics share (no torchmetrics here, so
``import polytask`` stays light): the ignore label of sequence kinds, and the group AUC of ranking."""

from __future__ import annotations

import torch
from torch import Tensor

IGNORE = -100  #: label of a position without a target (padding, a missing label, a subword after the first)


def real_pairs(preds: Tensor, target: Tensor) -> list[tuple[list[int], list[int]]]:
    """(predicted, target) id lists over each sample's labelled positions."""
    keep = target != IGNORE
    p = preds[:, :target.shape[1]]
    return [(p[i][keep[i]].tolist(), target[i][keep[i]].tolist()) for i in range(len(target))]


def id_words(ids: list[int]) -> str:
    return " ".join(map(str, ids))


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


def split_ranking(target: Tensor) -> tuple[Tensor, Tensor]:
    return target[:, 0], target[:, 1].long()
