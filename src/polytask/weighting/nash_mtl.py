"""Nash-MTL (Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik & Fetaya, ICML 2022,
"Multi-Task Learning as a Bargaining Game").

The Nash bargaining solution of Sec. 3 is the update sum_t alpha_t g_t with alpha > 0 solving

    G^T G alpha = 1 / alpha                                         (Eq. 5, element-wise)

Solver (our choice): this is exactly the stationarity condition of the strictly convex
potential f(alpha) = 1/2 alpha^T M alpha - sum_t log alpha_t (M = G^T G), so its unique
solution is f's minimiser. We find it with damped Newton steps (Hessian M + diag(1/alpha^2),
backtracking to stay positive and decrease f): quadratic convergence to the exact solution
in a handful of T x T solves, no cvxpy dependency. The paper instead runs a sequence of
convex approximations (CCP, its Sec. 3.2) with cvxpy/ECOS, which approaches the same point
in up to 20 conic solves; when the gradients are linearly dependent neither has a solution
and, as the official code does on solver failure, we keep the previous alpha.

Checked against the official code (AvivNavon/nash-mtl, methods/weight_methods.py, class
NashMTL at commit cce1840; LibMTL's weighting/Nash_MTL.py is the same code): it divides
G^T G by its Frobenius norm s before the solve, but its constraints
-log(alpha_i s) - log((G^T G / s) alpha)_i <= 0 and its objective (1/s times the raw one)
put s back, so its CCP solves the raw Eq. 5, alpha_i (M alpha)_i = 1, and its warm start
is the previous raw alpha. Re-run with cvxpy 1.9/ECOS on five random 3-task Gram matrices
(||M||_F from 29 to 2081), that CCP's alpha matched ours to 2.3e-7 relative. We do the same:
solve on M/s for conditioning and rescale the solution by 1/sqrt(s), starting from the
previous alpha (ones at first) mapped to that scale.
Deviations: the official stopping test ||(M/s) alpha - 1/alpha|| < 1e-3 is written on the
normalised matrix but applied to the raw alpha (so in practice it stops on its other tests:
alpha moving less than 1e-6, or 20 CCP steps); ours solves to 1e-9 on M/s. Otherwise as
official: alpha is recomputed every ``update_weights_every`` steps (reused in between,
skipping the per-task gradients), every parameter gets the gradient of sum_t alpha_t L_t, and
the shared gradient is clipped to norm ``max_norm`` (1.0 in the official code; 0 disables).

Gradient source: shared parameters (``mode="params"``, default, as the paper);
``mode="rep"`` uses the shared representation (cheaper).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from polytask.errors import PolytaskError
from polytask.registry import WEIGHTINGS
from polytask.weighting.base import GradContext, Weighting
from polytask.weighting._common import check_mode, need_ctx


def _newton(m: np.ndarray, start: np.ndarray, max_iter: int, tol: float) -> np.ndarray | None:
    """alpha > 0 with m alpha = 1/alpha (damped Newton on the convex potential), or None if it fails."""
    alpha = np.asarray(start, dtype=np.float64).copy()

    def potential(a: np.ndarray) -> float:
        return 0.5 * float(a @ m @ a) - float(np.log(a).sum())

    for _ in range(max_iter):
        grad = m @ alpha - 1.0 / alpha
        if np.linalg.norm(grad) < tol:
            return alpha
        try:
            step = np.linalg.solve(m + np.diag(1.0 / alpha ** 2), grad)
        except np.linalg.LinAlgError:
            return None
        f0, slope, size = potential(alpha), float(grad @ step), 1.0
        while size > 1e-12:
            new = alpha - size * step
            if (new > 0).all() and potential(new) <= f0 - 1e-4 * size * slope:
                break
            size *= 0.5
        else:
            return None
        alpha = new
    converged = np.linalg.norm(m @ alpha - 1.0 / alpha) < 1e-3  # the official stopping tolerance
    return alpha if converged and np.isfinite(alpha).all() else None


def nash_weights(m: np.ndarray, start: np.ndarray, max_iter: int = 100, tol: float = 1e-9) -> np.ndarray | None:
    """alpha > 0 with m alpha = 1/alpha (Eq. 5 on the Gram matrix ``m`` itself), or None if there is none.

    Solved on m/s, s = ||m||_F, for conditioning, from ``start`` (an alpha for ``m``) mapped to
    that scale, then mapped back: (m/s) a = 1/a  <=>  m (a/sqrt(s)) = 1/(a/sqrt(s)).
    ``tol`` applies to the scaled system.
    """
    scale = float(np.linalg.norm(m))
    if not np.isfinite(scale) or scale <= 0:
        return None
    root = np.sqrt(scale)
    solved = _newton(m / scale, np.asarray(start, dtype=np.float64) * root, max_iter, tol)
    return None if solved is None else solved / root


@WEIGHTINGS.register("nash-mtl")
class NashMTL(Weighting):
    """Nash-MTL: task weights from the Nash bargaining solution G^T G a = 1/a (Navon et al. 2022)."""

    grad_source = "params"

    def __init__(self, task_names: Sequence[str], *, mode: str = "params", update_weights_every: int = 1,
                 max_norm: float = 1.0) -> None:
        super().__init__(task_names)
        if update_weights_every < 1:
            raise PolytaskError(f"nash-mtl update_weights_every must be at least 1, got {update_weights_every}")
        if max_norm < 0:
            raise PolytaskError(f"nash-mtl max_norm must be non-negative (0 disables clipping), got {max_norm}")
        self.mode = check_mode("nash-mtl", mode)  # type: ignore[assignment]
        self.update_weights_every = int(update_weights_every)
        self.max_norm = float(max_norm)
        self.register_buffer("alpha", torch.ones(self.num_tasks, dtype=torch.float64))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def backward(self, losses: Tensor, ctx: GradContext | None = None) -> Tensor:
        ctx = need_ctx("nash-mtl", ctx)
        if int(self.step) % self.update_weights_every == 0:
            solved = nash_weights(ctx.gramian(losses).numpy(), self.alpha.numpy())
            if solved is not None:
                self.alpha.copy_(torch.from_numpy(solved))
        self.step += 1
        w = self.alpha.to(losses)
        ctx.apply(losses, w)
        if self.max_norm > 0:
            torch.nn.utils.clip_grad_norm_(ctx.shared, self.max_norm)
        return w.detach()
