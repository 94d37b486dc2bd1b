"""ConFIG (Liu, Chu, Thuerey, 2024, arXiv:2408.11104, "ConFIG: Towards Conflict-free Training
of Physics Informed Neural Networks"), Eq. 2:

    g_u = U^+ 1 / ||U^+ 1||,    update = (sum_i g_i . g_u) g_u

with U the [T, D] matrix of unit task gradients g_i / ||g_i|| and U^+ its pseudo-inverse: g_u
makes the same angle with every task gradient (U g_u is a constant vector when U has full row
rank), so no task is harmed, and its length is the sum of the gradients' projections on it.

Computed on the Gram matrix: U^+ 1 = U^T (U U^T)^+ 1 and U U^T = D^-1 M D^-1 (M = G G^T,
D = diag ||g_i||), so the update is w @ G with beta = D^-1 (U U^T)^+ 1 and
w = (1^T M beta / beta^T M beta) beta. The Gram matrix is formed in float64 here (the
pseudo-inverse squares the condition number), and eigenvalues of U U^T below
(max(T, D) eps)^2 times the largest are dropped -- the same cut-off as torch.linalg.pinv's
default on U (singular values below max(T, D) eps times the largest, eps of the gradients'
dtype) that TorchJD uses.

Checked against TorchJD (src/torchjd/aggregation/_config.py, commit 46962c2, adapted from the
authors' conflictfree package): same direction and length with its default preference vector
(all ones); zero gradients count as zero unit rows there and here. On 200 random J (T = 2..8,
D = 50, float64) TorchJD 0.18.0's update and ours agree to 4.2e-15 relative. Task-specific
parameters get the gradient of sum_t L_t.

Registered as "config". Gradient source: shared parameters (``mode="params"``, default);
``mode="rep"`` uses the shared representation (cheaper).
"""

from __future__ import annotations

import numpy as np
import torch

from polytask.registry import WEIGHTINGS
from polytask.weighting._common import GramianWeighting
from polytask.weighting.base import GradContext


def config_weights(m: np.ndarray, rtol: float) -> np.ndarray:
    """w with w @ G the ConFIG update, given the Gram matrix ``m`` = G G^T and the pseudo-inverse's
    relative cut-off ``rtol`` on the singular values of the unit-gradient matrix."""
    norms = np.sqrt(np.clip(np.diag(m), 0.0, None))
    inv = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)
    units = m * np.outer(inv, inv)
    lam, vec = np.linalg.eigh(units)
    keep = lam > rtol ** 2 * max(float(lam.max()), 0.0)
    if not keep.any():
        return np.zeros_like(norms)
    beta = inv * (vec[:, keep] @ ((vec[:, keep].T @ np.ones(len(norms))) / lam[keep]))
    return float(np.sum(m @ beta)) / float(beta @ m @ beta) * beta


@WEIGHTINGS.register("config")
class ConFIG(GramianWeighting):
    """ConFIG: the direction equally aligned with every task gradient, scaled by their projections (Liu et al. 2024)."""

    method = "config"
    gram_dtype = torch.float64

    def weights(self, m: np.ndarray, ctx: GradContext) -> np.ndarray:
        dims = ctx.grads.shape[1] if ctx.grads is not None else ctx.shared_size
        dtype = ctx.grads.dtype if ctx.grads is not None else ctx.shared[0].dtype
        rtol = max(m.shape[0], dims) * torch.finfo(dtype).eps
        return config_weights(m, rtol)
