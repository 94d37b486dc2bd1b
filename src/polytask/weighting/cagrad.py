"""Conflict-Averse Gradient descent (Liu, Liu, Jin, Stone & Liu, NeurIPS 2021, "Conflict-Averse
Gradient Descent for Multi-task Learning").

With the mean gradient g0 and phi = c^2 ||g0||^2, the dual of Eq. 2 (Sec. 3.1) is

    min_{w in simplex}  F(w) = g_w^T g0 + sqrt(phi) ||g_w||,   g_w = sum_t w_t g_t,

solved as in the official code with scipy SLSQP from uniform weights on the Gram matrix,
and the update direction is  d = g0 + (sqrt(phi) / ||g_w||) g_w.
The official code then rescales d by 1/(1 + c^2) (its ``rescale=1``, which we use: with
it the update has the scale of g0 for any c) and multiplies the shared gradient by T "to
match the sum loss" of the task-specific parts, which get the gradient of sum_t L_t. So the
shared gradient is T d / (1 + c^2); with c = 0 it is T g0 = sum_t g_t, i.e. plain EW.
``c`` = 0.4 is the paper's setting for NYUv2 and Cityscapes.

Gradient source: shared parameters (``mode="params"``, default, as the paper);
``mode="rep"`` uses the shared representation (cheaper; LibMTL's rep_grad).

Checked against: Cranial-XIX/CAGrad nyuv2/utils.py (``cagrad``: g0_norm = sqrt(mean(GG) + 1e-8),
c = alpha·g0_norm + 1e-8, objective xᵀA b + c·sqrt(xᵀA x + 1e-8) with b uniform, scipy
``minimize`` from uniform weights with bounds [0, 1] and the simplex equality (SLSQP),
lmbda = c / (||g_w|| + 1e-8), g = mean + lmbda·g_w, ``rescale=1`` divides by 1 + alpha²;
``overwrite_grad`` multiplies by the number of tasks), nyuv2/run.sh (alpha 0.4) and
median-research-group/LibMTL LibMTL/weighting/CAGrad.py (the same for T tasks). They match;
tests/fixtures/make_cagrad_fixture.py runs that solve on fixed gradients.
Deviations: the solve is on the float64 Gram matrix (the reference: float32), and SLSQP gets the
objective's analytic gradient instead of finite differences (on 100 random Gram matrices, T = 2..16,
the updates agree with the finite-difference solve to 2.1e-8 relative; the solve is 4x faster); ``mode="rep"`` is
ours (LibMTL refuses CAGrad on representation gradients).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from scipy.optimize import minimize
from torch import Tensor

from polytask.errors import PolytaskError
from polytask.registry import WEIGHTINGS
from polytask.weighting.base import GradContext, Weighting
from polytask.weighting._common import check_mode, need_ctx


def cagrad_weights(m: np.ndarray, c: float) -> np.ndarray:
    """Effective weights on each g_t of d / (1 + c^2), from the Gram matrix ``m``."""
    t = m.shape[0]
    uniform = np.full(t, 1.0 / t)
    g0_norm = float(np.sqrt(max(uniform @ m @ uniform, 0.0) + 1e-8))
    sqrt_phi = c * g0_norm + 1e-8
    m_b = m @ uniform

    def objective(w: np.ndarray) -> float:
        return float(w @ m_b + sqrt_phi * np.sqrt(max(w @ m @ w, 0.0) + 1e-8))

    def gradient(w: np.ndarray) -> np.ndarray:
        mw = m @ w
        return m_b + sqrt_phi * mw / np.sqrt(max(float(w @ mw), 0.0) + 1e-8)

    res = minimize(objective, uniform, jac=gradient, method="SLSQP", bounds=[(0.0, 1.0)] * t,
                   constraints=({"type": "eq", "fun": lambda w: 1.0 - w.sum(), "jac": lambda w: -np.ones_like(w)},))
    w = res.x
    gw_norm = float(np.sqrt(max(w @ m @ w, 0.0)))
    lmbda = sqrt_phi / (gw_norm + 1e-8)
    return (uniform + lmbda * w) / (1.0 + c ** 2)


@WEIGHTINGS.register("cagrad")
class CAGrad(Weighting):
    """CAGrad: best worst-task improvement within a ball around the mean gradient (Liu et al. 2021)."""

    grad_source = "params"

    def __init__(self, task_names: Sequence[str], *, c: float = 0.4, mode: str = "params") -> None:
        super().__init__(task_names)
        if c < 0:
            raise PolytaskError(f"cagrad c must be non-negative, got {c}")
        self.mode = check_mode("cagrad", mode)  # type: ignore[assignment]
        self.c = float(c)

    def backward(self, losses: Tensor, ctx: GradContext | None = None) -> Tensor:
        ctx = need_ctx("cagrad", ctx)
        w = torch.from_numpy(cagrad_weights(ctx.gramian(losses).numpy(), self.c)).to(losses) * self.num_tasks
        ctx.apply(losses, shared_weights=w)
        return w
