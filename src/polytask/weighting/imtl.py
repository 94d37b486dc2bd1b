"""Impartial Multi-Task Learning (Liu, Li, Kuang, Xue, Chen, Yang, Liao & Zhang, ICLR 2021,
"Towards Impartial Multi-task Learning").

IMTL-G (Sec. 3.2, Eq. 9-10): find alpha with sum_t alpha_t = 1 such that the aggregated
gradient g = sum_t alpha_t g_t has equal projections on every unit gradient u_t = g_t/||g_t||.
With D = [g_1 - g_2, ..., g_1 - g_T]^T and U = [u_1 - u_2, ..., u_1 - u_T]^T the closed form is

    alpha_{2:T} = g_1 U^T (D U^T)^{-1},   alpha_1 = 1 - sum_{t>=2} alpha_t.

All products are inner products of task gradients, so we evaluate it on the Gram matrix.

IMTL-L (Sec. 3.1, Eq. 4), on by default (``loss_scale=True``, the paper's full "IMTL"):
each loss becomes e^{s_t} L_t - s_t with a learnable s_t (trained by the trainer's optimiser,
gradient e^{s_t} L_t - 1); IMTL-G then acts on the gradients of the scaled losses, and the
task-specific parameters get the gradient of the summed scaled losses (Algorithm 1).

Gradient source: the paper uses the gradients w.r.t. the shared feature z (``mode="rep"``,
default); ``mode="params"`` uses the shared parameters (exact IMTL-G on the parameters).

Checked against: median-research-group/LibMTL LibMTL/weighting/IMTL.py (commit 4336804): the
scaled losses e^s L - s (s = 0 at start, trained by the optimiser), D, U and alpha = g_1 U^T
(D U^T)^{-1} on the gradients of the scaled losses, task-specific parts getting the sum of the
scaled losses. tests/test_reference_libmtl.py checks alpha, the shared gradient and the gradient
on s against LibMTL's output. No code by the paper's authors was found.
Deviations: we solve alpha D U^T = g_1 U^T by least squares on the Gram matrix instead of
inverting D U^T, so two parallel gradients give a finite answer instead of an error.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from polytask.registry import WEIGHTINGS
from polytask.weighting.base import GradContext, Weighting
from polytask.weighting._common import check_mode, need_ctx


def imtl_g_weights(m: Tensor) -> Tensor:
    """IMTL-G's alpha [T] from the Gram matrix ``m`` [T, T] of the task gradients."""
    t = m.shape[0]
    if t == 1:
        return torch.ones(1, dtype=m.dtype)
    norms = m.diagonal().clamp_min(1e-24).sqrt()
    n = m / norms[None, :]                          # n[a, b] = g_a . u_b
    row = n[0, 0] - n[0, 1:]                        # g_1 U^T
    du = n[0, 0] - n[0, 1:][None, :] - n[1:, 0][:, None] + n[1:, 1:]   # D U^T
    rest = torch.linalg.lstsq(du.T, row[:, None]).solution[:, 0]       # alpha D U^T = g_1 U^T
    return torch.cat([(1.0 - rest.sum()).reshape(1), rest])


@WEIGHTINGS.register("imtl")
class IMTL(Weighting):
    """IMTL: equal projections of the update on every task gradient, plus learned loss scales (Liu et al. 2021)."""

    grad_source = "rep"

    def __init__(self, task_names: Sequence[str], *, mode: str = "rep", loss_scale: bool = True) -> None:
        super().__init__(task_names)
        self.mode = check_mode("imtl", mode)  # type: ignore[assignment]
        self.log_scale = nn.Parameter(torch.zeros(self.num_tasks)) if loss_scale else None

    def backward(self, losses: Tensor, ctx: GradContext | None = None) -> Tensor:
        ctx = need_ctx("imtl", ctx)
        scale = torch.ones_like(losses.detach())
        if self.log_scale is not None:
            s = self.log_scale.detach().to(losses)
            scale = torch.exp(s)
            grad_s = (scale * losses.detach() - 1.0).to(self.log_scale)   # d(e^s L - s)/ds
            self.log_scale.grad = grad_s if self.log_scale.grad is None else self.log_scale.grad + grad_s
        # the scaled losses e^s_t L_t - s_t have gradients e^s_t g_t: their Gram matrix is D M D, D = diag(e^s),
        # taken from the raw losses (so the per-task passes start from each task's own loss)
        d = scale.double().cpu()
        alpha = imtl_g_weights(ctx.gramian(losses) * torch.outer(d, d)).to(losses)
        ctx.apply(losses, scale, shared_weights=alpha * scale)
        return alpha
