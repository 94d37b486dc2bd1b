"""Uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018, "Multi-Task Learning Using
Uncertainty to Weigh Losses for Scene Geometry and Semantics").

Eq. 7 (Gaussian likelihood) gives L_t / (2 sigma_t^2) + log sigma_t per task. With the
learned log-variance s_t = log sigma_t^2 and the overall factor 2 dropped:

    L = sum_t  exp(-s_t) * L_t + s_t

whose minimiser in s_t is s_t = log L_t: the learned variance tracks the loss scale.
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
