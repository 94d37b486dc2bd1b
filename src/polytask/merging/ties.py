"""TIES-Merging: Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", NeurIPS 2023.

Algorithm 1 of the paper, per parameter p:
  1. Trim: τ̂_t keeps the top-k% entries of τ_t by magnitude, zero elsewhere; ``density`` = k/100 is
     the kept fraction. As in the paper (and FusionBench), the top k% are taken over each whole task
     vector (``trim="global"``: one threshold per model over all its floating-point tensors);
     ``trim="tensor"`` takes them per tensor instead (as mergekit does).
  2. Elect: γ^p = sgn(Σ_t τ̂_t^p)  (the sign with the larger total mass).
  3. Disjoint merge: A^p = {t : sgn(τ̂_t^p) = γ^p},  τ_m^p = (1/|A^p|) Σ_{t∈A^p} τ̂_t^p
     (``merge_func="mean"``; the reference code also offers ``"sum"``, Σ_{t∈A^p} τ̂_t^p, and ``"max"``,
     γ^p max_{t∈A^p} |τ̂_t^p|).
  θ = θ_0 + λ τ_m.
Defaults density = 0.2 (the paper's recommended top-20%) and λ = 1 (the paper reports λ = 1 works
well once the disjoint mean is used). The round(density · n) largest magnitudes are kept, plus any
entries tied with the smallest of them. Optional per-model ``weights`` w_t scale τ̂_t before the
election (mergekit's ``weight``); the mean is then weighted, Σ_{t∈A} w_t τ̂_t / Σ_{t∈A} w_t.
Where Σ_t τ̂_t^p = 0 the merged entry is 0 (the reference code would give it the majority sign of
the whole vector instead).

Checked against: the authors' prateeky2806/ties-merging src/utils/merge_utils.py
(``topk_values_mask`` on each flattened task vector: threshold the (d - int(d K))-th smallest
|tau|, keep |tau| >= it; ``resolve_sign`` "mass": sgn(sum_t tau_t)
with zeros set to the majority sign; ``disjoint_merge``: mean / sum / max over the entries with
the elected sign) and arcee-ai/mergekit (``ties``: per-tensor top-k by ``argsort``, sign by
sum >= 0, weighted disjoint mean via ``normalize``). Steps and merge functions are the same.
tests/test_reference_merging.py runs these functions (tests/fixtures/make_ties_fixture.py) and gets
the same merged weights for mean, sum and max once the kept count is matched.
Deviations: we keep round(density n) entries; the authors' code keeps int(density n) + 1 (its
threshold entry is kept too) and mergekit int(density n); a zero sign sum gives a
zero entry (above) where the authors' code uses the majority sign and mergekit +1; mergekit's
per-tensor trim keeps exactly k entries (ties broken by sort order), we keep all tied entries.
"""

from __future__ import annotations

from typing import Any, Sequence

from torch import Tensor

from polytask.merging._sparse import (MagnitudePlan, PerModel, SparseTaskArithmetic, apply_magnitude_plan,
                                      check_choice, check_fractions, global_magnitude_plans, magnitude_plan, per_model, pick)
from polytask.merging.taskvector import Checkpoint
from polytask.registry import MERGERS

#: Where the top-k% are taken: over each whole task vector (the paper) or per tensor.
TRIMS = ("global", "tensor")


@MERGERS.register("ties")
class Ties(SparseTaskArithmetic):
    """TIES-Merging (Yadav et al., NeurIPS 2023): keep the largest density fraction, elect signs, disjoint mean."""

    sign_consensus = True
    lambda_grid = (0.4, 0.6, 0.8, 1.0, 1.3, 1.6)

    def __init__(self, *, density: PerModel = 0.2, lam: float = 1.0, trim: str = "global", merge_func: str = "mean",
                 weights: Sequence[float] | None = None) -> None:
        super().__init__(lam, weights=weights, merge_func=merge_func)
        self.density = check_fractions("density", density)
        self.trim = check_choice("trim", trim, TRIMS)
        self._global: list[MagnitudePlan] | None = None

    def prepare(self, base: Checkpoint, models: Sequence[Checkpoint], data: Any) -> None:
        super().prepare(base, models, data)
        densities = per_model("density", self.density, len(models))
        self._global = global_magnitude_plans(base, models, densities) if self.trim == "global" else None

    def plan(self, name: str, index: int, base: Tensor, model: Tensor, scratch: Tensor,
             shape: tuple[int, ...]) -> MagnitudePlan:
        if self._global is not None:
            return self._global[index]
        n = base.numel()
        return magnitude_plan(base, model, scratch, n - round(pick(self.density, index) * n), 0)

    def sparsify(self, state: MagnitudePlan, delta: Tensor, scratch: Tensor, start: int) -> None:
        apply_magnitude_plan(state, delta, scratch)
