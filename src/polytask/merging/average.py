"""Uniform weight averaging, the "uniform soup" of Wortsman et al., "Model soups: averaging weights
of multiple fine-tuned models improves accuracy without increasing inference time", ICML 2022.

θ = (1/T) Σ_t θ_t  (uniform soup, Sec. 2 of the paper). The base is not part of the average.
The weighted mean is taken as a running mean in the compute dtype (float32; float64 for float64
models), θ̄_1 = θ_1 and θ̄_t = lerp(θ̄_{t−1}, θ_t, w_t / Σ_{s≤t} w_s) = θ̄_{t−1} + (w_t / Σ_{s≤t} w_s)(θ_t − θ̄_{t−1}):
one pass over each model, as cheap as a float32 sum, and exact for identical models (lerp(a, a, ·) = a),
so averaging identical models returns that model bit for bit, which a float32 sum does not (3x/3 ≠ x).
Per-model ``weights`` w_t give the weighted average Σ_t w_t θ_t / Σ_t w_t (mergekit's ``linear``), or
the plain weighted sum Σ_t w_t θ_t with ``normalize=False``.

Checked against: arcee-ai/mergekit mergekit/merge_methods/linear.py (``LinearMergeTask``:
sum_t w_t theta_t, divided by sum_t w_t when ``normalize``, its default; equal weights give the
uniform soup). Same result: tests/test_reference_merging.py compares a weighted average with
that formula (tests/fixtures/make_mergekit_fixtures.py).
Deviations: the running mean (mergekit: a sum in the tensors' dtype, then a division) rounds
differently, so results can differ in the last bits (within a few float32 ulps). Weights that are not
all positive, and ``normalize=False``, use a float32 (float64) sum.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from polytask.errors import PolytaskError
from polytask.merging.base import Merger
from polytask.registry import MERGERS


@MERGERS.register("average")
class Average(Merger):
    """Weight averaging / uniform model soup (Wortsman et al., ICML 2022): θ = mean of the fine-tuned weights."""

    copies_inputs = False
    stored_dtype_inputs = True

    def __init__(self, *, weights: Sequence[float] | None = None, normalize: bool = True) -> None:
        self.weights = None if weights is None else [float(w) for w in weights]
        self.normalize = bool(normalize)

    def merge_models(self, name: str, base: Tensor, models: list[Tensor]) -> Tensor:
        weights = self.weights or [1.0] * len(models)
        if len(weights) != len(models):
            raise PolytaskError(f"option weights has {len(weights)} values but {len(models)} models are merged; "
                                f"pass one weight per model")
        dtype = base.dtype
        if self.normalize and all(w > 0 for w in weights):
            if len(models) == 1:
                return models[0].to(dtype, copy=True)
            seen = weights[0] + weights[1]  # the first step reads both inputs (no copy of the first)
            mean = torch.lerp(models[0].to(dtype), models[1].to(dtype), weights[1] / seen)
            for w, m in zip(weights[2:], models[2:]):
                seen += w
                mean.lerp_(m.to(dtype), w / seen)  # one converted copy at a time (bf16/fp16 inputs)
            return mean
        total = torch.zeros_like(base)
        for w, m in zip(weights, models):
            total.add_(m) if self.weights is None else total.add_(m, alpha=w)
        if not self.normalize:
            return total
        return total.div_(sum(weights) if abs(sum(weights)) >= 1e-8 else 1.0)
