"""Uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018, "Multi-Task Learning Using
Uncertainty to Weigh Losses for Scene Geometry and Semantics").

Eq. 7 (Gaussian likelihood) gives L_t / (2 sigma_t^2) + log sigma_t per task. With the
learned log-variance s_t = log sigma_t^2 and the overall factor 2 dropped:

    L = sum_t  exp(-s_t) * L_t + s_t

whose minimiser in s_t is s_t = log L_t: the learned variance tracks the loss scale.

Checked against: median-research-group/LibMTL LibMTL/weighting/UW.py (commit 4336804), whose loss
is sum_t L_t / (2 e^{s_t}) + s_t / 2 with s_t initialised to -0.5, and the ``Uncertainty`` baseline
in OptMN-Lab/fairgrad methods/weight_methods.py (sum_t 0.5 (e^{-s_t} L_t + s_t), s_t = 0 at start).
Both are exactly half of ours at the same s_t; tests/test_reference_libmtl.py checks that factor
(loss, gradients w.r.t. the losses and w.r.t. s, and the reported weights) against LibMTL's output.
Deviations: the overall factor 1/2 is dropped (stated above), so our weights e^{-s_t} and the
gradient on s_t are twice LibMTL's; the minimiser s_t = log L_t is the same. We start from s = 0
(weight 1, as EW; that baseline's start), LibMTL from s = -0.5 (weight 0.82); ``init``
sets it.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from polytask.registry import WEIGHTINGS
from polytask.weighting.base import Weighting


@WEIGHTINGS.register("uw")
class UncertaintyWeighting(Weighting):
    """Uncertainty weighting: learned homoscedastic log-variances per task (Kendall et al. 2018)."""

    def __init__(self, task_names: Sequence[str], *, init: float = 0.0) -> None:
        super().__init__(task_names)
        self.log_vars = nn.Parameter(torch.full((self.num_tasks,), float(init)))

    def objective(self, losses: Tensor) -> tuple[Tensor, Tensor]:
        return (torch.exp(-self.log_vars) * losses + self.log_vars).sum(), torch.exp(-self.log_vars).detach()
