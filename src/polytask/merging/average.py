"""Uniform weight averaging, the "uniform soup" of Wortsman et al., "Model soups: averaging weights
of multiple fine-tuned models improves accuracy without increasing inference time", ICML 2022.

θ = (1/T) Σ_t θ_t  (uniform soup, Sec. 2 of the paper). The base is not part of the average.
The sum is accumulated in float64, so averaging identical models returns that model bit for bit.
"""

from __future__ import annotations

import torch
from torch import Tensor

from polytask.merging.base import Merger
from polytask.registry import MERGERS


@MERGERS.register("average")
class Average(Merger):
    """Weight averaging / uniform model soup (Wortsman et al., ICML 2022): θ = mean of the fine-tuned weights."""

    def merge_models(self, name: str, base: Tensor, models: list[Tensor]) -> Tensor:
        total = torch.zeros_like(models[0], dtype=torch.float64)
        for m in models:
            total += m
        return total.div_(len(models))
