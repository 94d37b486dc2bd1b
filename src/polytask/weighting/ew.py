"""Equal weighting: minimise the plain sum of task losses, L = sum_t L_t.

Checked against: median-research-group/LibMTL LibMTL/weighting/EW.py (commit 4336804): the loss
is sum_t L_t there too (weights 1, not 1/T as its docstring says); tests/test_reference_libmtl.py
compares the gradient with LibMTL's on a fixture (tests/fixtures/make_libmtl_fixtures.py).
Deviations: none.
"""

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
