"""GradNorm (Chen, Badrinarayanan, Lee & Rabinovich, ICML 2018, "GradNorm: Gradient
Normalization for Adaptive Loss Balancing in Deep Multitask Networks").

Learnable task weights w_i(t). With G_W^(i) = ||grad_W w_i L_i||_2, its mean G_bar_W,
the inverse training rate L~_i = L_i(t) / L_i(0) and r_i = L~_i / mean_j L~_j, Eq. 2 is

    L_grad(t; w) = sum_i | G_W^(i)(t) - G_bar_W(t) * [r_i(t)]^alpha |_1

where the target G_bar_W r_i^alpha is a constant. L_grad is differentiated w.r.t. the w_i
only (the trainer's optimiser steps them with the model), the network gets the gradient
of sum_i w_i L_i, and the weights are renormalised so that sum_i w_i = T. The paper
renormalises right after the step; we do it at the start of the next ``backward``, before
the weights are read, which gives the same weights at every use.

Gradient source: the paper takes W = "the last shared layer" to save compute. ``mode=
"params"`` (default) uses all shared parameters (exact, the general definition);
``mode="rep"`` uses the gradient w.r.t. the shared representation (the output of the last
shared layer, LibMTL's ``rep_grad``). L_i(0) are the losses of the first step. The norms are the
square roots of the Gramian's diagonal and the update is w @ G, so in ``params`` mode G is never
formed (:meth:`GradContext.gramian`, ``_gramian.py``).

Checked against: median-research-group/LibMTL LibMTL/weighting/GradNorm.py (commit 4336804); no
code by the paper's authors was found in the stored repositories. LibMTL's G_W^(i) =
||w_i grad L_i||, the r_i^alpha target held constant, the L1 sum and the network update
sum_i w_i g_i are the same as ours; tests/test_reference_libmtl.py feeds LibMTL's weights
to polytask and checks the shared gradient and that LibMTL's gradient on its logits is our
gradient on w through the softmax Jacobian.
Deviations, all on purpose: LibMTL parametrises w = T softmax(p) (always positive, sums to T)
where the paper learns w_i directly and renormalises after each step, as we do; LibMTL takes
L_i(0) as the mean loss of the first epoch and runs EW during it, we take the losses of the first
step (the paper's "initial loss"); our default gradient source is all shared parameters, not the
last shared layer (the paper's cost-saving choice) nor LibMTL's representation option.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from polytask.registry import WEIGHTINGS
from polytask.weighting.base import GradContext, Weighting
from polytask.weighting._common import check_mode, need_ctx


@WEIGHTINGS.register("gradnorm")
class GradNorm(Weighting):
    """GradNorm: learn task weights so gradient norms follow each task's training rate (Chen et al. 2018)."""

    grad_source = "params"

    def __init__(self, task_names: Sequence[str], *, alpha: float = 1.5, mode: str = "params") -> None:
        super().__init__(task_names)
        self.mode = check_mode("gradnorm", mode)  # type: ignore[assignment]
        self.alpha = float(alpha)
        self.weights = nn.Parameter(torch.ones(self.num_tasks))
        self.register_buffer("initial_losses", torch.zeros(self.num_tasks))
        self.register_buffer("started", torch.zeros((), dtype=torch.bool))

    def backward(self, losses: Tensor, ctx: GradContext | None = None) -> Tensor:
        ctx = need_ctx("gradnorm", ctx)
        with torch.no_grad():  # renormalise: sum_i w_i = T
            self.weights.mul_(self.num_tasks / self.weights.sum())
        current = losses.detach().to(self.initial_losses)
        if not bool(self.started):
            self.initial_losses.copy_(current)
            self.started.fill_(True)
        norms = ctx.gramian(losses).diagonal().clamp_min(0.0).sqrt().to(self.weights)   # ||grad_W L_i||
        g_w = self.weights * norms                                  # G_W^(i) = w_i ||grad_W L_i||
        inverse_rate = current / self.initial_losses.clamp_min(1e-12)
        r = inverse_rate / inverse_rate.mean()
        target = (g_w.mean() * r ** self.alpha).detach()
        (grad_w,) = torch.autograd.grad((g_w - target).abs().sum(), [self.weights])
        self.weights.grad = grad_w if self.weights.grad is None else self.weights.grad + grad_w
        w = self.weights.detach().clone()
        ctx.apply(losses, w)
        return w
