"""Gradient Vaccine (Wang, Tsvetkov, Firat & Cao, ICLR 2021, "Gradient Vaccine: Investigating
and Improving Multi-task Optimization in Massively Multilingual Models"), Algorithm 1.

For each task i and each other task j (random order), with phi_ij = cos(g_i, g_j) and the
EMA target phi^_ij (initialised to 0):

    if phi_ij < phi^_ij:
        g_i <- g_i + ||g_i|| (phi^_ij sqrt(1 - phi_ij^2) - phi_ij sqrt(1 - phi^_ij^2))
                     / (||g_j|| sqrt(1 - phi^_ij^2)) * g_j                            (Eq. 3)
    phi^_ij <- (1 - beta) phi^_ij + beta phi_ij                                        (Eq. 4)

After the adjustment cos(g_i, g_j) equals phi^_ij exactly. g_i is the running (already
adjusted) gradient of task i, g_j the original one; update = sum_i g_i. As in PCGrad we run
it on coefficient vectors with the Gram matrix. The paper also applies it per layer group;
we use one group (the whole shared gradient), as LibMTL does.

Gradient source: shared parameters (``mode="params"``, default, as the paper);
``mode="rep"`` uses the shared representation. Task-specific parameters get the sum of
the losses' gradients. ``beta`` = 0.01 as in the paper's experiments.

Checked against: median-research-group/LibMTL LibMTL/weighting/GradVac.py (commit 4336804,
``GradVac_group_type=0``, the whole model): the same Eq. 3 coefficient computed from the running
g_i and the original g_j, the EMA update of the target after every pair (adjusted or not), and a
random order of the other tasks. tests/test_reference_libmtl.py runs three steps (targets carried
over) with LibMTL's recorded shuffles and gets the same updates from ``gradvac_coefficients``.
No code by the paper's authors was found.
Deviations: default beta 0.01 (the paper's setting) where LibMTL defaults to 0.5; only the
whole-model group (LibMTL also offers per-layer and per-matrix groups); LibMTL's 1e-8 guards are
replaced by skipping zero gradients and clamping 1 - phi^_ij^2 at 1e-12; the order comes from our
seeded generator.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from polytask.errors import PolytaskError
from polytask.registry import WEIGHTINGS
from polytask.weighting.base import GradContext, Weighting
from polytask.weighting._common import SeededRandom, check_mode, need_ctx


def gradvac_coefficients(m: Tensor, targets: Tensor, orders: Sequence[Sequence[int]], beta: float) -> Tensor:
    """Rows c_i with adjusted g_i = c_i @ G; updates the EMA ``targets`` [T, T] in place."""
    a = m.detach().cpu().double().numpy()   # numpy: T^2 tiny steps cost microseconds, not torch dispatches
    ema = targets.detach().cpu().double().numpy().copy()
    c = np.eye(a.shape[0])
    for i, order in enumerate(orders):
        for j in order:
            norm_i = float(c[i] @ a @ c[i]) ** 0.5
            norm_j = float(a[j, j]) ** 0.5
            if norm_i == 0.0 or norm_j == 0.0:
                continue
            phi = float(c[i] @ a[:, j]) / (norm_i * norm_j)
            target = float(ema[i, j])
            if phi < target:
                root_t = math.sqrt(max(1.0 - target ** 2, 1e-12))
                coef = norm_i * (target * math.sqrt(max(1.0 - phi ** 2, 0.0)) - phi * root_t) / (norm_j * root_t)
                c[i, j] += coef
            ema[i, j] = (1.0 - beta) * target + beta * phi
    targets.copy_(torch.from_numpy(ema))
    return torch.from_numpy(c).to(m.dtype)


@WEIGHTINGS.register("gradvac")
class GradVac(SeededRandom, Weighting):
    """Gradient Vaccine: raise task-gradient similarities toward their EMA targets (Wang et al. 2021)."""

    grad_source = "params"

    def __init__(self, task_names: Sequence[str], *, beta: float = 0.01, mode: str = "params", seed: int = 0) -> None:
        super().__init__(task_names)
        if not 0.0 < beta <= 1.0:
            raise PolytaskError(f"gradvac beta must lie in (0, 1], got {beta}")
        self.mode = check_mode("gradvac", mode)  # type: ignore[assignment]
        self.beta = float(beta)
        self._seed(seed)
        self.register_buffer("targets", torch.zeros(self.num_tasks, self.num_tasks, dtype=torch.float64))

    def backward(self, losses: Tensor, ctx: GradContext | None = None) -> Tensor:
        ctx = need_ctx("gradvac", ctx)
        m = ctx.gramian(losses)
        t = self.num_tasks
        orders = [[j for j in self.permutation(t) if j != i] for i in range(t)]
        w = gradvac_coefficients(m, self.targets, orders, self.beta).sum(0).to(losses)
        ctx.apply(losses, shared_weights=w)
        return w
