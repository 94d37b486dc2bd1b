"""Uniform weight averaging, the "uniform soup" of Wortsman et al., "Model soups: averaging weights
of multiple fine-tuned models improves accuracy without increasing inference time", ICML 2022.

θ = (1/T) Σ_t θ_t  (uniform soup, Sec. 2 of the paper). The base is not part of the average.
The sum is accumulated in float64, so averaging identical models returns that model bit for bit.
Per-model ``weights`` w_t give the weighted average Σ_t w_t θ_t / Σ_t w_t (mergekit's ``linear``), or
the plain weighted sum Σ_t w_t θ_t with ``normalize=False``.

Checked against: arcee-ai/mergekit mergekit/merge_methods/linear.py (``LinearMergeTask``:
sum_t w_t theta_t, divided by sum_t w_t when ``normalize``, its default; equal weights give the
uniform soup). Same result: tests/test_reference_merging.py compares a weighted average with
that formula (tests/fixtures/make_mergekit_fixtures.py).
Deviations: the sum is taken in float64 (mergekit: the tensors' dtype), so the result can differ
from a float32 sum in the last bit.
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

    def __init__(self, *, weights: Sequence[float] | None = None, normalize: bool = True) -> None:
        self.weights = None if weights is None else [float(w) for w in weights]
        self.normalize = bool(normalize)

    def merge_models(self, name: str, base: Tensor, models: list[Tensor]) -> Tensor:
        weights = self.weights or [1.0] * len(models)
        if len(weights) != len(models):
            raise PolytaskError(f"option weights has {len(weights)} values but {len(models)} models are merged; "
                                f"pass one weight per model")
        total = torch.zeros_like(models[0], dtype=torch.float64)
        for w, m in zip(weights, models):
            total += m if self.weights is None else w * m.double()
        if not self.normalize:
            return total
        return total.div_(sum(weights) if abs(sum(weights)) >= 1e-8 else 1.0)
