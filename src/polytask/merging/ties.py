"""TIES-Merging: Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", NeurIPS 2023.

Algorithm 1 of the paper, per parameter p:
  1. Trim: τ̂_t keeps the top-k% entries of τ_t by magnitude (per tensor here), zero elsewhere;
     ``density`` = k/100 is the kept fraction.
  2. Elect: γ^p = sgn(Σ_t τ̂_t^p)  (the sign with the larger total mass).
  3. Disjoint merge: A^p = {t : sgn(τ̂_t^p) = γ^p},  τ_m^p = (1/|A^p|) Σ_{t∈A^p} τ̂_t^p.
  θ = θ_0 + λ τ_m.
Defaults density = 0.2 (the paper's recommended top-20%) and λ = 1 (the paper reports λ = 1 works
well once the disjoint mean is used). The paper trims over each whole task vector; we trim each
tensor separately (as in common implementations), which keeps the merge streamable tensor by tensor.
The round(density · n) largest magnitudes are kept, plus any entries tied with the smallest of them.
"""

from __future__ import annotations

from torch import Tensor

from polytask.merging._sparse import (MagnitudePlan, SparseTaskArithmetic, apply_magnitude_plan, check_fraction,
                                      magnitude_plan)
from polytask.registry import MERGERS


@MERGERS.register("ties")
class Ties(SparseTaskArithmetic):
    """TIES-Merging (Yadav et al., NeurIPS 2023): keep the largest density fraction, elect signs, disjoint mean."""

    sign_consensus = True
    lambda_grid = (0.4, 0.6, 0.8, 1.0, 1.3, 1.6)

    def __init__(self, *, density: float = 0.2, lam: float = 1.0) -> None:
        super().__init__(lam)
        self.density = check_fraction("density", density)

    def plan(self, name: str, index: int, base: Tensor, model: Tensor, scratch: Tensor) -> MagnitudePlan:
        n = base.numel()
        return magnitude_plan(base, model, scratch, n - round(self.density * n), 0)

    def sparsify(self, state: MagnitudePlan, delta: Tensor, scratch: Tensor) -> None:
        apply_magnitude_plan(state, delta, scratch)
