"""DualProj (Quinton & Rey, 2024, arXiv:2406.16232, "Jacobian Descent for Multi-Objective
Optimization"; TorchJD's docstring relates it to Eq. 11 of GEM, Lopez-Paz & Ranzato, NeurIPS
2017): project the mean task gradient onto the dual cone of the task gradients,

    update = pi_J((1/T) sum_i g_i),    pi_J(x) = argmin_{y : J y >= 0} ||y - x||    (pi_J: Eq. 3)

with J the [T, D] matrix of task gradients. By Proposition 1 of Quinton & Rey, the update is
J^T v with v = argmin_{v >= 1/T} v^T (J J^T) v, one quadratic program on the Gram matrix,
solved exactly here (``_common.project_to_dual_cone``): the update has a non-negative inner
product with every task gradient, and equals the mean when the mean already has.

Checked against TorchJD (src/torchjd/aggregation/_dualproj.py at commit 46962c2, and the 0.18.0
release): same weights (mean preference vector, the QP of Proposition 1); task-specific
parameters get the gradient of sum_t L_t. Deviations on purpose, as in ``upgrad``: no
``reg_eps`` = 1e-4 regularisation of the trace-normalised Gram matrix and no ``norm_eps``
cut-off. On 200 random J (T = 2..8, D = 50) TorchJD 0.18.0 differs from ours by at most 3.6e-4
relative with its defaults (its update then conflicts with a task by up to 1.4e-5 ||J||_F^2)
and 3.9e-16 with reg_eps = 0.

Gradient source: shared parameters (``mode="params"``, default); ``mode="rep"`` uses the
shared representation (cheaper).
"""

from __future__ import annotations

import numpy as np

from polytask.registry import WEIGHTINGS
from polytask.weighting._common import GramianWeighting, project_to_dual_cone
from polytask.weighting.base import GradContext


def dualproj_weights(m: np.ndarray) -> np.ndarray:
    """v with J^T v = pi_J(mean of the rows of J), given the Gram matrix ``m`` = J J^T."""
    t = m.shape[0]
    return project_to_dual_cone(m, np.full(t, 1.0 / t))


@WEIGHTINGS.register("dualproj")
class DualProj(GramianWeighting):
    """DualProj: the mean gradient projected onto the dual cone of the task gradients (Quinton & Rey 2024)."""

    method = "dualproj"

    def weights(self, m: np.ndarray, ctx: GradContext) -> np.ndarray:
        return dualproj_weights(m)
