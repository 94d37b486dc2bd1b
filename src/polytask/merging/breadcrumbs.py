"""Model Breadcrumbs: Davari & Belilovsky, "Model Breadcrumbs: Scaling Multi-Task Model Merging
with Sparse Masks", ECCV 2024.

Per layer (here: per tensor), mask out the β fraction of task-vector entries with the
largest magnitudes (outliers) and the γ fraction with the smallest (noise), keep the
rest, then add the masked vectors by task arithmetic: θ = θ_0 + λ Σ_t m_t ⊙ τ_t (Sec. 3).
The options are the kept fraction ``density`` = 1 − β − γ and ``beta`` = β; γ = 1 − density − β
(mergekit calls β ``gamma``). Both may be given per model. ``ties=True`` combines the masked
vectors by TIES' sign election and disjoint merge instead of the sum (mergekit's
``breadcrumbs_ties``). Defaults density = 0.14, beta = 0.01 (γ = 0.85) and λ = 0.3 are our
starting point inside the ranges the paper explores; the paper tunes them on validation data,
and so should you. Entries tied with a cut-off magnitude are kept.

Checked against: arcee-ai/mergekit mergekit/sparsify.py ``magnitude_outliers`` (per tensor:
int(density n) entries kept, int(beta n) largest dropped (its ``gamma`` is our beta), the rest of
the smallest dropped, by sort order) and its ``breadcrumbs`` / ``breadcrumbs_ties`` methods
(normalize and rescale off). tests/test_reference_merging.py re-runs them
(tests/fixtures/make_mergekit_fixtures.py) and gets the same merge where the cut-off counts
agree (``ties=True`` with ``merge_func="sum"``). No code by the paper's authors was found in the
stored repositories (a name search for breadcrumbs finds only unrelated projects).
Deviations: the cut-offs are round(gamma n) smallest and round(beta n) largest (mergekit: int(),
with the bottom count taking the remainder), and entries tied with a cut-off magnitude are all
kept, so a layer can keep slightly more than the density. mergekit's TIES variant sums the
agreeing entries (its ``normalize`` is off) where our default ``merge_func`` is the disjoint
mean; a zero sign sum elects + there, 0 here. (The stored mergekit sparsify.py keeps nothing
of a tensor with int(beta n) = 0, since it then slices ``indices[n_bot:-0]``; we keep the
density's share.)
"""

from __future__ import annotations

from typing import Any, Sequence

from torch import Tensor

from polytask.errors import PolytaskError
from polytask.merging._sparse import (MagnitudePlan, PerModel, SparseTaskArithmetic, apply_magnitude_plan,
                                      check_fractions, magnitude_plan, per_model, pick)
from polytask.merging.taskvector import Checkpoint
from polytask.registry import MERGERS


@MERGERS.register("breadcrumbs")
class Breadcrumbs(SparseTaskArithmetic):
    """Model Breadcrumbs (Davari & Belilovsky, ECCV 2024): drop the largest and smallest deltas per layer, then add."""

    def __init__(self, *, density: PerModel = 0.14, beta: PerModel = 0.01, lam: float = 0.3, ties: bool = False,
                 merge_func: str = "mean", weights: Sequence[float] | None = None, normalize: bool = False) -> None:
        super().__init__(lam, weights=weights, normalize=normalize, merge_func=merge_func)
        self.density = check_fractions("density", density)
        self.beta = check_fractions("beta", beta)
        self.sign_consensus = bool(ties)
        n = max(len(self.density), len(self.beta))
        for d, b in zip(self.density * n if len(self.density) == 1 else self.density,
                        self.beta * n if len(self.beta) == 1 else self.beta):
            if d + b > 1.0:
                raise PolytaskError(f"options density={d} and beta={b} keep and drop more than every entry; "
                                    f"pass density + beta <= 1, e.g. density=0.14 beta=0.01")

    def prepare(self, base: Checkpoint, models: Sequence[Checkpoint], data: Any) -> None:
        super().prepare(base, models, data)
        per_model("density", self.density, len(models))
        per_model("beta", self.beta, len(models))

    def plan(self, name: str, index: int, base: Tensor, model: Tensor, scratch: Tensor,
             shape: tuple[int, ...]) -> MagnitudePlan:
        n = base.numel()
        density, beta = pick(self.density, index), pick(self.beta, index)
        gamma = max(0.0, 1.0 - density - beta)  # the fraction of smallest magnitudes dropped
        return magnitude_plan(base, model, scratch, round(gamma * n), round(beta * n))

    def sparsify(self, state: MagnitudePlan, delta: Tensor, scratch: Tensor, start: int) -> None:
        apply_magnitude_plan(state, delta, scratch)
