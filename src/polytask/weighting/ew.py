"""Equal weighting: minimise the plain sum of task losses, L = sum_t L_t."""

from __future__ import annotations

import torch
from torch import Tensor

from polytask.registry import WEIGHTINGS
from polytask.weighting.base import Weighting


@WEIGHTINGS.register("ew")
class EqualWeighting(Weighting):
    """Equal weighting: the sum of task losses (the usual baseline)."""

    def objective(self, losses: Tensor) -> tuple[Tensor, Tensor]:
        return losses.sum(), torch.ones_like(losses).detach()
