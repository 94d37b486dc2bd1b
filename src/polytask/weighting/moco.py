"""MoCo (Fernando, Shen, Liu, Chaudhury, Murugesan & Chen, ICLR 2023, "Mitigating Gradient Bias
in Multi-objective Learning: A Provably Convergent Approach"), Algorithm 1: a tracked estimate
Y of the [T, D] task gradients G_k corrects the bias of stochastic MGDA,

    Y_k      = Y_{k-1} - beta_k (Y_{k-1} - G_k)                                  (tracking)
    lambda_k = Proj_simplex(lambda_{k-1} - gamma_k (Y_k Y_k^T + rho I) lambda_{k-1})
    update   = Y_k^T lambda_k

with beta_k = beta / k^beta_sigma and gamma_k = gamma / k^gamma_sigma (k = 1, 2, ...), Y_0 = 0
and lambda_0 uniform. On a fixed gradient sequence G_k = G, Y_k - G = prod_j (1 - beta_j) (-G)
goes to 0.

Checked against LibMTL's weighting/MoCo.py (median-research-group/LibMTL, commit 4336804,
"implemented based on the author's sharing code"), whose defaults we take (beta = 0.5,
beta_sigma = 0.5, gamma = 0.1, gamma_sigma = 0.5, rho = 0) and whose rescaling of every task
gradient to g_t L_t / (||g_t|| + 1e-8) before tracking we apply by default (``normalize``;
False tracks the raw gradients as in Algorithm 1). Deviation on purpose: LibMTL maps lambda back
with a softmax; we use the Euclidean projection onto the simplex that the paper's update
states. As there, task-specific parameters get the gradient of sum_t L_t.

Gradient source: shared parameters only (the tracked Y needs a fixed coordinate system across
steps; LibMTL refuses representation gradients as well). Y is saved with the weighting's state.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from polytask.errors import PolytaskError
from polytask.registry import WEIGHTINGS
from polytask.weighting.base import GradContext, Weighting
from polytask.weighting._common import need_ctx


def project_to_simplex(v: Tensor) -> Tensor:
    """The Euclidean projection of ``v`` onto the probability simplex (sort-based, exact)."""
    s, _ = torch.sort(v, descending=True)
    cum = s.cumsum(0) - 1.0
    k = torch.arange(1, len(v) + 1, dtype=v.dtype, device=v.device)
    rho = int((s - cum / k > 0).nonzero().max())
    return (v - cum[rho] / (rho + 1)).clamp_min(0.0)


def moco_step(y: Tensor, lam: Tensor, grads: Tensor, beta: float, gamma: float, rho: float) -> tuple[Tensor, Tensor]:
    """One MoCo step: the new tracked gradients Y and weights lambda."""
    y = y - beta * (y - grads)
    lam = project_to_simplex(lam - gamma * (y @ (y.T @ lam) + rho * lam))
    return y, lam


@WEIGHTINGS.register("moco")
class MoCo(Weighting):
    """MoCo: MGDA-style weights on a tracked, bias-corrected estimate of the task gradients (Fernando et al. 2023)."""

    grad_source = "params"

    def __init__(self, task_names: Sequence[str], *, beta: float = 0.5, beta_sigma: float = 0.5,
                 gamma: float = 0.1, gamma_sigma: float = 0.5, rho: float = 0.0, normalize: bool = True) -> None:
        super().__init__(task_names)
        if not 0.0 < beta <= 1.0:
            raise PolytaskError(f"moco beta must lie in (0, 1] (the tracking step), got {beta}")
        if gamma <= 0:
            raise PolytaskError(f"moco gamma must be positive (the step size of lambda), got {gamma}")
        if beta_sigma < 0 or gamma_sigma < 0:
            raise PolytaskError(f"moco beta_sigma and gamma_sigma must be non-negative, "
                                f"got {beta_sigma} and {gamma_sigma}")
        if rho < 0:
            raise PolytaskError(f"moco rho must be non-negative (the l2 regularisation of lambda), got {rho}")
        self.beta, self.beta_sigma = float(beta), float(beta_sigma)
        self.gamma, self.gamma_sigma = float(gamma), float(gamma_sigma)
        self.rho = float(rho)
        self.normalize = bool(normalize)
        self.register_buffer("lam", torch.full((self.num_tasks,), 1.0 / self.num_tasks, dtype=torch.float64))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.y: Tensor | None = None

    def get_extra_state(self) -> Any:
        return {"y": self.y}

    def set_extra_state(self, state: Any) -> None:
        self.y = state["y"]

    def backward(self, losses: Tensor, ctx: GradContext | None = None) -> Tensor:
        ctx = need_ctx("moco", ctx)
        grads = ctx.task_grads(losses)
        if self.normalize:
            grads = grads / (grads.norm(dim=1, keepdim=True) + 1e-8) * losses.detach().unsqueeze(1)
        self.step += 1
        k = float(self.step)
        y = torch.zeros_like(grads) if self.y is None else self.y
        self.y, lam = moco_step(y, self.lam.to(grads), grads, self.beta / k ** self.beta_sigma,
                                self.gamma / k ** self.gamma_sigma, self.rho)
        self.lam.copy_(lam)
        ctx.apply(losses, None, lam @ self.y)
        return lam.detach()
