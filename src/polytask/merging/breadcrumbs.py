"""Model Breadcrumbs: Davari & Belilovsky, "Model Breadcrumbs: Scaling Multi-Task Model Merging
with Sparse Masks", ECCV 2024.

Per layer (here: per tensor), mask out the β fraction of task-vector entries with the
largest magnitudes (outliers) and the γ fraction with the smallest (noise), keep the
rest, then add the masked vectors by task arithmetic: θ = θ_0 + λ Σ_t m_t ⊙ τ_t (Sec. 3).
The options are the kept fraction ``density`` = 1 − β − γ and ``beta`` = β; γ = 1 − density − β.
Defaults density = 0.14, beta = 0.01 (γ = 0.85) and λ = 0.3 are our starting point inside the
ranges the paper explores; the paper tunes them on validation data, and so should you. Entries
tied with a cut-off magnitude are kept.
"""

from __future__ import annotations

from torch import Tensor

from polytask.errors import PolytaskError
from polytask.merging._sparse import (MagnitudePlan, SparseTaskArithmetic, apply_magnitude_plan, check_fraction,
                                      magnitude_plan)
from polytask.registry import MERGERS


@MERGERS.register("breadcrumbs")
class Breadcrumbs(SparseTaskArithmetic):
    """Model Breadcrumbs (Davari & Belilovsky, ECCV 2024): drop the largest and smallest deltas per layer, then add."""

    def __init__(self, *, density: float = 0.14, beta: float = 0.01, lam: float = 0.3) -> None:
        super().__init__(lam)
        self.density = check_fraction("density", density)
        self.beta = check_fraction("beta", beta)
        if self.density + self.beta > 1.0:
            raise PolytaskError(f"options density={self.density} and beta={self.beta} keep and drop more than every entry; "
                                f"pass density + beta <= 1, e.g. density=0.14 beta=0.01")
        self.gamma = max(0.0, 1.0 - self.density - self.beta)  # the fraction of smallest magnitudes dropped

    def plan(self, name: str, index: int, base: Tensor, model: Tensor, scratch: Tensor) -> MagnitudePlan:
        n = base.numel()
        return magnitude_plan(base, model, scratch, round(self.gamma * n), round(self.beta * n))

    def sparsify(self, state: MagnitudePlan, delta: Tensor, scratch: Tensor) -> None:
        apply_magnitude_plan(state, delta, scratch)
