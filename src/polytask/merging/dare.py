"""DARE: Yu et al., "Language Models are Super Mario: Absorbing Abilities from Homologous Models
as a Free Lunch", ICML 2024.

Drop And REscale (Sec. 3): m_t ~ Bernoulli(p) elementwise, τ̃_t = (1 − m_t) ⊙ τ_t,
τ̂_t = τ̃_t / (1 − p), so E[τ̂_t] = τ_t; the option is the kept fraction ``density`` = 1 − p.
The rescaled vectors are then merged by task arithmetic, θ = θ_0 + λ Σ_t τ̂_t, or, with
``ties=True``, by TIES' sign election and disjoint mean (the DARE+TIES combination the paper also
evaluates). Drops are drawn from a generator seeded by (seed, tensor name, model index), so a
merge is reproducible and independent of tensor order. Defaults: density = 0.1, i.e. p = 0.9
(the paper shows drop rates up to 0.9 leave fine-tuned abilities intact); λ = 0.3 as in task
arithmetic, or 1 with ``ties=True`` as in TIES.
"""

from __future__ import annotations

import torch
from torch import Tensor

from polytask.merging.base import tensor_generator
from polytask.merging._sparse import SparseTaskArithmetic, check_fraction, drop_and_rescale
from polytask.registry import MERGERS


@MERGERS.register("dare")
class Dare(SparseTaskArithmetic):
    """DARE (Yu et al., ICML 2024): keep a random density fraction of delta entries, rescale by 1/density, then merge."""

    def __init__(self, *, density: float = 0.1, ties: bool = False, lam: float | None = None, seed: int = 0) -> None:
        super().__init__((1.0 if ties else 0.3) if lam is None else lam)
        self.density = check_fraction("density", density, open_left=True)
        self.p = 1.0 - self.density  # the paper's drop rate
        self.sign_consensus = bool(ties)
        self.seed = int(seed)

    def plan(self, name: str, index: int, base: Tensor, model: Tensor, scratch: Tensor) -> torch.Generator:
        return tensor_generator(self.seed, name, index)

    def sparsify(self, state: torch.Generator, delta: Tensor, scratch: Tensor) -> None:
        drop_and_rescale(delta, self.p, state, scratch)
