"""Sequentially dependent binary tasks (impression -> click -> conversion), shared by ESMM and AITM.

A chain t_1 -> ... -> t_T says step t can happen only after step t-1: y_t = 1 implies y_{t-1} = 1.
Both architectures predict every chain step on the *entire impression space*: their output for
t_k is the logit of P(y_1 = ... = y_k = 1 | x) (for click -> conversion: pCTCVR), and its loss
is taken on every impression whose product label is known,

    label_k = y_1 · ... · y_k,   known where every step is labelled or an earlier step is 0,

so in synthetic-recsys (conversion labelled on clicks only) the conversion loss covers all
impressions, non-clicked ones with label 0. :meth:`ChainedTasks.loss_batch` rewrites a batch that
way; the Trainer takes the task losses on ``model.loss_batch(batch)`` where a model has one.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from polytask.errors import PolytaskError
from polytask.tasks import Batch, Task

DEFAULT_CHAIN = ("click", "conversion")


def resolve_chain(tasks: Sequence[Task], chain: Sequence[str] | None, arch: str) -> list[str]:
    """The chain's task names: ``chain`` checked against ``tasks``; None = click -> conversion where both exist."""
    names = [t.name for t in tasks]
    if chain is None:
        if not all(n in names for n in DEFAULT_CHAIN):
            return []
        chain = DEFAULT_CHAIN
    chain = list(chain)
    unknown = [n for n in chain if n not in names]
    if unknown:
        raise PolytaskError(f"{arch} chain names task {unknown[0]!r}, which the suite lacks; "
                            f"pass chain=[...] from: {', '.join(names)}")
    if len(chain) < 2 or len(set(chain)) != len(chain):
        raise PolytaskError(f"{arch} chain must list at least two distinct tasks in order, got {chain}; "
                            "pass e.g. chain=[click,conversion]")
    kinds = {t.name: t.kind for t in tasks}
    bad = [n for n in chain if kinds[n] != "binary"]
    if bad:
        raise PolytaskError(f"{arch} chains binary tasks only; task {bad[0]!r} is {kinds[bad[0]]}")
    return chain


def entire_space_batch(batch: Batch, chain: Sequence[str]) -> Batch:
    """``batch`` with every chain step's label replaced by the product label on the entire space."""
    y, mask = dict(batch.y), dict(batch.mask)
    label = known = None
    for name in chain:
        y_t = torch.where(batch.mask[name], batch.y[name], torch.zeros_like(batch.y[name]))
        if label is None:
            label, known = y_t, batch.mask[name]
        else:
            earlier_zero = known & (label == 0)
            label = label * y_t
            known = (known & batch.mask[name]) | earlier_zero
        y[name], mask[name] = label, known
    full = frozenset(n for n in batch.full if n not in chain) | frozenset(n for n in chain if bool(mask[n].all()))
    return Batch(batch.x, y, mask, full)


def product_logit(logits: Sequence[Tensor]) -> Tensor:
    """logit(Π_k σ(a_k)) computed in log space (log p - log(1 - p))."""
    log_p = torch.stack([F.logsigmoid(a) for a in logits]).sum(0).clamp(max=-1e-7)
    return log_p - torch.log(-torch.expm1(log_p))


class ChainedTasks:
    """Mixin: ``self.chain`` (task names in order) and the entire-space :meth:`loss_batch`."""

    chain: list[str]

    def loss_batch(self, batch: Batch) -> Batch:
        """The batch the task losses are taken on: chain steps labelled on the entire space."""
        return entire_space_batch(batch, self.chain) if self.chain else batch
