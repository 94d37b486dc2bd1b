"""Aligned-MTL (Senushkin, Patakin, Kuznetsov & Konushin, CVPR 2023, "Independent Component
Alignment for Multi-Task Learning"), Sec. 4 / Algorithm 1.

The task gradients G (rows g_t) are replaced by an aligned set G^ whose Gram matrix is
sigma^2 I, i.e. whose condition number is 1. With the eigendecomposition of the Gram matrix
M = G G^T = V Lambda V^T (eigenvalues below the numerical rank tolerance dropped),

    B = sigma V Lambda^{-1/2} V^T,   G^ = B G,   update = sum_t g^_t = (B 1)^T G,

and G^ G^^T = sigma^2 V V^T. ``scale="min"`` (default, the paper's choice) takes sigma as
the smallest singular value sqrt(lambda_min); the official code also offers "median" and
"rmse" (root mean square of the singular values). Task-specific parameters get the plain
sum of the losses' gradients, as in the official balancer.

Gradient source: shared parameters (``mode="params"``, default); ``mode="rep"`` is the
paper's Aligned-MTL-UB on the shared representation.

Checked against: the official SamsungLabs/MTL code/optim/aligned/solver.py (``ProcrustesSolver``:
eigendecomposition of the Gram matrix, rank tolerance lambda_max * T * float32 eps, scale modes
min/median/rmse) and balancer.py, and median-research-group/LibMTL LibMTL/weighting/Aligned_MTL.py
(commit 4336804, the "min" mode; alpha = B.sum(0)). tests/test_reference_libmtl.py runs LibMTL's
code (with the removed ``torch.symeig`` replaced by ``torch.linalg.eigh``) on four gradient sets,
one of rank 2 < T, and gets the same alpha and update from ``alignment_matrix``.
Deviations: the eigendecomposition is done in float64 (the references: the gradients' dtype);
the official "median" takes torch's lower median of the eigenvalues, ours of their roots (the
same element).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from polytask.registry import WEIGHTINGS
from polytask.weighting.base import GradContext, Weighting
from polytask.weighting._common import check_choice, check_mode, need_ctx

SCALES = ("min", "median", "rmse")


def alignment_matrix(m: Tensor, scale: str = "min") -> Tensor:
    """B [T, T] with B G the aligned gradients, from the Gram matrix ``m``."""
    lam, vec = torch.linalg.eigh(m)
    tol = lam.max().clamp_min(0) * m.shape[0] * torch.finfo(torch.float32).eps
    keep = lam > tol
    if not keep.any():
        return torch.zeros_like(m)
    lam, vec = lam[keep], vec[:, keep]
    sigma = {"min": lam.min().sqrt(), "median": lam.sqrt().median(), "rmse": lam.mean().sqrt()}[scale]
    return sigma * (vec / lam.sqrt()) @ vec.T


@WEIGHTINGS.register("aligned-mtl")
class AlignedMTL(Weighting):
    """Aligned-MTL: align task gradients to a condition number of one (Senushkin et al. 2023)."""

    grad_source = "params"

    def __init__(self, task_names: Sequence[str], *, mode: str = "params", scale: str = "min") -> None:
        super().__init__(task_names)
        self.mode = check_mode("aligned-mtl", mode)  # type: ignore[assignment]
        self.scale = check_choice("aligned-mtl", "scale", scale, SCALES)

    def backward(self, losses: Tensor, ctx: GradContext | None = None) -> Tensor:
        ctx = need_ctx("aligned-mtl", ctx)
        w = alignment_matrix(ctx.gramian(losses), self.scale).sum(0).to(losses)
        ctx.apply(losses, shared_weights=w)
        return w
