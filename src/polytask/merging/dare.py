"""DARE: Yu et al., "Language Models are Super Mario: Absorbing Abilities from Homologous Models
as a Free Lunch", ICML 2024.

Drop And REscale (Sec. 3): m_t ~ Bernoulli(p) elementwise, τ̃_t = (1 − m_t) ⊙ τ_t,
τ̂_t = τ̃_t / (1 − p), so E[τ̂_t] = τ_t; the option is the kept fraction ``density`` = 1 − p
(one value, or one per model). The rescaled vectors are then merged by task arithmetic,
θ = θ_0 + λ Σ_t w_t τ̂_t, or, with ``ties=True``, by TIES' sign election and disjoint merge
(``merge_func``): the paper's DARE+TIES (Sec. 4.3) applies DARE to each task vector and hands the
results to TIES-Merging in place of its magnitude trim, which is exactly this. Drops are drawn
from a generator seeded by (seed, tensor name, model index), so a merge is reproducible and
independent of tensor order. ``matrices_only=True`` drops entries only of tensors with two or more
dimensions (weight matrices, embeddings) and keeps 1-D tensors (biases, norm scales) whole, unscaled;
``rescale=False`` skips the 1/(1 − p) (mergekit's ``rescale``). Defaults: density = 0.1, i.e.
p = 0.9 (the paper shows drop rates up to 0.9 leave fine-tuned abilities intact); λ = 0.3 as in task
arithmetic, or 1 with ``ties=True`` as in TIES.

Checked against: the authors' yule-BUAA/MergeLM model_merging_methods/mask_weights_utils.py
(``mask_input_with_mask_rate``, strategy "random": a Bernoulli(p) mask, tau (1 - m) / (1 - p),
applied to every task-vector tensor not excluded by name) and arcee-ai/mergekit's ``dare_linear`` /
``dare_ties`` (mergekit/sparsify.py ``random``: Bernoulli(density) keep-mask, divided by density
when ``rescale``; then task arithmetic or TIES' consensus). Same operation.
Deviations: the random masks come from our per-(seed, tensor, model) generators, so they are not
the references' draws (only their distribution is the same); MergeLM's exclusion regexes are our
``matrices_only`` switch.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from polytask.merging.base import tensor_generator
from polytask.merging._sparse import PerModel, SparseTaskArithmetic, check_fractions, drop_and_rescale, per_model, pick
from polytask.merging.taskvector import Checkpoint
from polytask.registry import MERGERS


@MERGERS.register("dare")
class Dare(SparseTaskArithmetic):
    """DARE (Yu et al., ICML 2024): keep a random density fraction of delta entries, rescale by 1/density, then merge."""

    def __init__(self, *, density: PerModel = 0.1, ties: bool = False, lam: float | None = None, seed: int = 0,
                 matrices_only: bool = False, rescale: bool = True, merge_func: str = "mean",
                 weights: Sequence[float] | None = None, normalize: bool = False) -> None:
        super().__init__((1.0 if ties else 0.3) if lam is None else lam, weights=weights, normalize=normalize,
                         merge_func=merge_func)
        self.density = check_fractions("density", density, open_left=True)
        self.sign_consensus = bool(ties)
        self.seed = int(seed)
        self.matrices_only = bool(matrices_only)
        self.rescale = bool(rescale)

    def prepare(self, base: Checkpoint, models: Sequence[Checkpoint], data: Any) -> None:
        super().prepare(base, models, data)
        per_model("density", self.density, len(models))

    def plan(self, name: str, index: int, base: Tensor, model: Tensor, scratch: Tensor,
             shape: tuple[int, ...]) -> tuple[float, torch.Generator] | None:
        if self.matrices_only and len(shape) < 2:
            return None
        return 1.0 - pick(self.density, index), tensor_generator(self.seed, name, index)  # the paper's drop rate p

    def sparsify(self, state: tuple[float, torch.Generator] | None, delta: Tensor, scratch: Tensor) -> None:
        if state is not None:
            drop_and_rescale(delta, state[0], state[1], scratch, self.rescale)
