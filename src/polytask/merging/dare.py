"""DARE: Yu et al., "Language Models are Super Mario: Absorbing Abilities from Homologous Models
as a Free Lunch", ICML 2024.

Drop And REscale (Sec. 3): m_t ~ Bernoulli(p) elementwise, τ̃_t = (1 − m_t) ⊙ τ_t,
τ̂_t = τ̃_t / (1 − p), so E[τ̂_t] = τ_t; the option is the kept fraction ``density`` = 1 − p
(one value, or one per model). The rescaled vectors are then merged by task arithmetic,
θ = θ_0 + λ Σ_t w_t τ̂_t, or, with ``ties=True``, by TIES' sign election and disjoint merge
(``merge_func``): the paper's DARE+TIES (Sec. 4.3) applies DARE to each task vector and hands the
results to TIES-Merging in place of its magnitude trim, which is exactly this. Drops come from a
counter-based generator (:func:`keep_mask`: Philox-4x64 keyed by (seed, tensor name, model index),
entry i of a tensor dropped iff its i-th 32-bit word u_i < p·2³²), so a merge is reproducible and
the same whatever the tensor order, block size or thread count. ``matrices_only=True`` drops entries only of tensors with two or more
dimensions (weight matrices, embeddings) and keeps 1-D tensors (biases, norm scales) whole, unscaled;
``rescale=False`` skips the 1/(1 − p) (mergekit's ``rescale``). Defaults: density = 0.1, i.e.
p = 0.9 (the paper shows drop rates up to 0.9 leave fine-tuned abilities intact); λ = 0.3 as in task
arithmetic, or 1 with ``ties=True`` as in TIES.

Checked against: the authors' yule-BUAA/MergeLM model_merging_methods/mask_weights_utils.py
(``mask_input_with_mask_rate``, strategy "random": a Bernoulli(p) mask, tau (1 - m) / (1 - p),
applied to every task-vector tensor not excluded by name) and arcee-ai/mergekit's ``dare_linear`` /
``dare_ties`` (mergekit/sparsify.py ``random``: Bernoulli(density) keep-mask, divided by density
when ``rescale``; then task arithmetic or TIES' consensus). Same operation.
Deviations: the random masks come from our counter-based generator, so they are not the
references' draws (only their distribution is the same; p is resolved to 1/2³²); MergeLM's exclusion regexes are our
``matrices_only`` switch.
"""

from __future__ import annotations

import zlib
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from polytask.merging._sparse import PerModel, SparseTaskArithmetic, check_fractions, per_model, pick
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
             shape: tuple[int, ...]) -> tuple[float, tuple[int, int]] | None:
        if self.matrices_only and len(shape) < 2:
            return None
        return 1.0 - pick(self.density, index), philox_key(self.seed, name, index)  # the paper's drop rate p

    def sparsify(self, state: tuple[float, tuple[int, int]] | None, delta: Tensor, scratch: Tensor, start: int) -> None:
        if state is None or state[0] == 0.0:
            return
        p, key = state
        delta.mul_(torch.from_numpy(keep_mask(key, start, delta.numel(), p)))
        if self.rescale:
            delta.div_(1.0 - p)


def philox_key(seed: int, name: str, index: int) -> tuple[int, int]:
    """The 128-bit Philox key of model ``index``'s drops in tensor ``name`` under ``seed``."""
    return seed % 2**64, (zlib.crc32(name.encode()) << 32) | (index % 2**32)


def keep_mask(key: tuple[int, int], start: int, count: int, p: float) -> np.ndarray:
    """Entries ``start .. start+count`` of a tensor's DARE keep-mask: entry i is dropped (False) iff
    u_i < p·2³², u_i the i-th 32-bit word of the Philox-4x64 stream keyed by ``key`` (8 words per counter
    value), so any block of the tensor gets the same mask whatever the order or size of the blocks."""
    first, skip = divmod(start, 8)
    words = -(-(skip + count) // 8) * 4  # whole counter values, 4 64-bit outputs each
    stream = np.random.Philox(key=np.array(key, dtype=np.uint64), counter=np.array([first, 0, 0, 0], dtype=np.uint64))
    draws = stream.random_raw(words).view(np.uint32)[skip:skip + count]
    return draws >= min(round(p * 2**32), 2**32 - 1)
