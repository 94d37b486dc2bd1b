"""Gradient Sign Dropout (Chen, Ngiam, Huang, Luong, Kretzschmar, Chai & Anguelov, NeurIPS
2020, "Just Pick a Sign: Optimizing Deep Multitask Models with Gradient Sign Dropout"),
Algorithm 1, applied at the shared representation A (the architecture's ``boundary``):

    G_i = sum over the batch of sgn(A) * grad_A L_i                (batch-separated form)
    P   = 1/2 (1 + sum_i G_i / sum_i |G_i|)                       (Eq. 1, sign purity)
    U ~ Uniform(0, 1) per element
    M_i = 1[P > U] 1[G_i > 0] + 1[P < U] 1[G_i < 0]
    new grad_A = sum_i (l + (1 - l) M_i) * grad_A L_i              (l = ``leak``, 0 in the paper's MTL runs)

So each element keeps the gradients of one sign, positive with probability P. The new
gradient of A is then back-propagated into the shared part. GradDrop is defined on
activations, so only ``mode="rep"`` exists; task-specific parameters get the sum of the
losses' gradients. U comes from a private generator seeded by ``seed``.

Checked against: median-research-group/LibMTL LibMTL/weighting/GradDrop.py (commit 4336804):
the same batch-separated sign purity P (with 1e-7), the same mask and leak, applied to the
representation gradient. tests/test_reference_libmtl.py runs it on fixed activations and
per-task gradients, records its ``torch.rand_like`` draw U and gets the same gradient from
``graddrop_gradient``. No code by the paper's authors was found.
Deviations: U comes from our seeded generator. (The GradDrop in OptMN-Lab/fairgrad's
weight_methods.py works on parameter gradients, without the sign(A) factor; we follow the
paper's activation form, as LibMTL.)
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from polytask.errors import PolytaskError
from polytask.registry import WEIGHTINGS
from polytask.weighting.base import GradContext, Weighting
from polytask.weighting._common import SeededRandom, need_ctx


def graddrop_gradient(per_task: Tensor, rep: Tensor, uniform: Tensor, leak: float = 0.0) -> Tensor:
    """The combined [B, R] gradient from per-task gradients [T, B, R], activations [B, R] and U [R]."""
    signed = (per_task * rep.sign()).sum(1)                                 # G_i, [T, R]
    purity = 0.5 * (1.0 + signed.sum(0) / (signed.abs().sum(0) + 1e-7))     # P, [R]
    mask = (purity > uniform) & (signed > 0) | (purity < uniform) & (signed < 0)
    keep = leak + (1.0 - leak) * mask.to(per_task.dtype)
    return (per_task * keep[:, None, :]).sum(0)


@WEIGHTINGS.register("graddrop")
class GradDrop(SeededRandom, Weighting):
    """GradDrop: keep one gradient sign per activation, chosen by sign purity (Chen et al. 2020)."""

    grad_source = "rep"

    def __init__(self, task_names: Sequence[str], *, leak: float = 0.0, seed: int = 0) -> None:
        super().__init__(task_names)
        if not 0.0 <= leak <= 1.0:
            raise PolytaskError(f"graddrop leak must lie in [0, 1], got {leak}")
        self.leak = float(leak)
        self._seed(seed)

    def backward(self, losses: Tensor, ctx: GradContext | None = None) -> Tensor:
        ctx = need_ctx("graddrop", ctx)
        grads = ctx.task_grads(losses)
        rep = ctx.model.last_rep.detach()
        batch = rep.reshape(rep.shape[0], -1)
        per_task = grads.reshape(self.num_tasks, *batch.shape)
        uniform = torch.rand(batch.shape[1], generator=self.generator).to(grads)
        combined = graddrop_gradient(per_task, batch, uniform, self.leak)
        ctx.apply(losses, None, combined.reshape(-1))
        return torch.ones_like(losses).detach()
