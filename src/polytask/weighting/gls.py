"""Geometric loss strategy (Chennupati et al., "MultiNet++: Multi-Stream Feature Aggregation and
Geometric Loss Strategy for Multi-Task Learning", CVPR Workshops 2019, Eq. 3):

    L_GLS = (Π_{t=1..T} L_t)^{1/T}

the geometric mean of the task losses. Its gradient is ∇L_GLS = (L_GLS / T) Σ_t ∇L_t / L_t: each
task is weighted by the inverse of its own loss, so a task with a small loss is not drowned out by
one with a large loss, and rescaling one task's loss by a constant does not change the direction.
Computed as exp(mean_t log L_t) for numerical range; the losses must be positive.

Checked against: median-research-group/LibMTL LibMTL/weighting/GLS.py (commit 4336804): the loss
is prod_t L_t^{1/T} there (our exp(mean log L) is the same value); tests/test_reference_libmtl.py
compares the gradient w.r.t. the losses with LibMTL's. No code by the paper's authors was found
(a code search for MultiNet++ / geometric loss strategy found only third-party versions).
Deviations: LibMTL reports the weights L_t / (T prod_s L_s), which are not the ones its gradient
applies; we report those applied, L_GLS / (T L_t). Non-positive losses are refused rather than
producing NaN.
"""

from __future__ import annotations

from torch import Tensor

from polytask.errors import PolytaskError
from polytask.registry import WEIGHTINGS
from polytask.weighting.base import Weighting


@WEIGHTINGS.register("gls")
class GeometricLossStrategy(Weighting):
    """Geometric loss strategy: minimise the geometric mean of the task losses (Chennupati et al. 2019)."""

    def objective(self, losses: Tensor) -> tuple[Tensor, Tensor]:
        if not bool((losses > 0).all()):
            raise PolytaskError("weighting 'gls' needs positive task losses (it takes their geometric mean); "
                                "use 'ew' for tasks whose loss can reach 0")
        total = losses.log().mean().exp()
        return total, (total / (len(losses) * losses)).detach()
