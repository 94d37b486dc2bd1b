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

As in the official code, M is divided by its Frobenius norm before solving (alpha is not
rescaled back), the solve starts from the previous alpha (ones at first), alpha is
recomputed every ``update_weights_every`` steps (reused in between, skipping the per-task
gradients), every parameter gets the gradient of sum_t alpha_t L_t, and the shared
gradient is clipped to norm ``max_norm`` (1.0 in the official code; 0 disables).

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
from polytask.weighting._common import check_mode, gram, need_ctx


def nash_weights(m: np.ndarray, start: np.ndarray, max_iter: int = 100, tol: float = 1e-9) -> np.ndarray | None:
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
            grads = ctx.task_grads(losses)
            m = gram(grads).numpy()
            scale = float(np.linalg.norm(m))
            solved = nash_weights(m / scale, self.alpha.numpy()) if scale > 0 else None
            if solved is not None:
                self.alpha.copy_(torch.from_numpy(solved))
        self.step += 1
        w = self.alpha.to(losses)
        ctx.apply(losses, w)
        if self.max_norm > 0:
            torch.nn.utils.clip_grad_norm_(ctx.shared, self.max_norm)
        return w.detach()
