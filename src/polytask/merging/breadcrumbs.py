"""Model Breadcrumbs: Davari & Belilovsky, "Model Breadcrumbs: Scaling Multi-Task Model Merging
with Sparse Masks", ECCV 2024.

Per layer (here: per tensor), mask out the ``beta`` fraction of task-vector entries with the
largest magnitudes (outliers) and the ``gamma`` fraction with the smallest (noise), keep the
rest, then add the masked vectors by task arithmetic: θ = θ_0 + λ Σ_t m_t ⊙ τ_t (Sec. 3).
Defaults beta = 0.01, gamma = 0.85 and λ = 0.3 are our starting point inside the ranges the
paper explores; the paper tunes them on validation data, and so should you. Entries tied with
a cut-off magnitude are kept.
"""

from __future__ import annotations

from torch import Tensor

from polytask.merging._sparse import (MagnitudePlan, SparseTaskArithmetic, apply_magnitude_plan, check_fraction,
                                      magnitude_plan)
from polytask.registry import MERGERS


@MERGERS.register("breadcrumbs")
class Breadcrumbs(SparseTaskArithmetic):
    """Model Breadcrumbs (Davari & Belilovsky, ECCV 2024): drop the largest and smallest deltas per layer, then add."""

    def __init__(self, *, beta: float = 0.01, gamma: float = 0.85, lam: float = 0.3) -> None:
        super().__init__(lam)
        self.beta = check_fraction("beta", beta)
        self.gamma = check_fraction("gamma", gamma)

    def plan(self, name: str, index: int, base: Tensor, model: Tensor, scratch: Tensor) -> MagnitudePlan:
        n = base.numel()
        return magnitude_plan(base, model, scratch, round(self.gamma * n), round(self.beta * n))

    def sparsify(self, state: MagnitudePlan, delta: Tensor, scratch: Tensor) -> None:
        apply_magnitude_plan(state, delta, scratch)
