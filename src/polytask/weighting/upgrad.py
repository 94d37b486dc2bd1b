"""UPGrad (Quinton & Rey, 2024, arXiv:2406.16232, "Jacobian Descent for Multi-Objective
Optimization"): project every task gradient onto the dual cone of all of them and average,

    update = (1/T) sum_i pi_J(g_i),    pi_J(x) = argmin_{y : J y >= 0} ||y - x||    (pi_J: their Eq. 3)

with J the [T, D] matrix of task gradients. By their Proposition 1, pi_J(J^T u) = J^T v with
v = argmin_{v >= u} v^T (J J^T) v, so the update is J^T w, w = sum_i v_i with u = e_i / T:
T small quadratic programs on the Gram matrix, solved exactly here (``_common.project_to_dual_cone``,
an active-set NNLS), so every projection -- and hence the update -- has a non-negative inner
product with every task gradient. Gradients that do not conflict are their own projections,
so the update is then the plain mean.

Checked against TorchJD (src/torchjd/aggregation/_upgrad.py and _utils/dual_cone.py at commit
46962c2; the 0.18.0 release moves the QP into a QuadprogProjector with the same defaults):
same weights, i.e. the mean preference vector and the QP of Proposition 1, and as there the
task-specific parameters get the gradient of sum_t L_t. Deviations on purpose: TorchJD divides
the Gram matrix by its trace and adds ``reg_eps`` = 1e-4 times the identity before calling
quadprog, and replaces a Gram matrix of trace below ``norm_eps`` = 1e-4 by zero (the update is
then the mean); we solve the unregularised problem at any scale. On 200 random J (T = 2..8,
D = 50) TorchJD 0.18.0's update differs from ours by at most 6.3e-4 relative with its
defaults and 3.5e-16 with reg_eps = 0.

Gradient source: shared parameters (``mode="params"``, default, as the paper);
``mode="rep"`` uses the shared representation (cheaper).
"""

from __future__ import annotations

import numpy as np

from polytask.registry import WEIGHTINGS
from polytask.weighting._common import GramianWeighting, project_to_dual_cone
from polytask.weighting.base import GradContext


def upgrad_weights(m: np.ndarray) -> np.ndarray:
    """w with J^T w = (1/T) sum_i pi_J(g_i), given the Gram matrix ``m`` = J J^T."""
    t = m.shape[0]
    return sum((project_to_dual_cone(m, row) for row in np.eye(t) / t), np.zeros(t))


@WEIGHTINGS.register("upgrad")
class UPGrad(GramianWeighting):
    """UPGrad: the mean of the task gradients' projections onto their dual cone (Quinton & Rey 2024)."""

    method = "upgrad"

    def weights(self, m: np.ndarray, ctx: GradContext) -> np.ndarray:
        return upgrad_weights(m)
