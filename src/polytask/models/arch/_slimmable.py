"""Slimmable layers (Yu, Yang, Xu, Yang & Huang, ICLR 2019, "Slimmable Neural Networks").

One set of weights runs at several widths: with width multiplier m a layer of d units keeps its
first ``ceil(m·d)`` units, i.e. the slice ``W[:ceil(m·d_out), :d_in_active]`` of the full weight
(and ``b[:ceil(m·d_out)]``). There is no BatchNorm here, so the paper's switchable BatchNorm is
not needed.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch.nn.functional as F
from torch import Tensor, nn


def active_units(units: int, m: float) -> int:
    """Units kept at width multiplier ``m``: ``ceil(m·units)``, at least one."""
    return max(1, math.ceil(round(m * units, 6)))


class SlimmableLinear(nn.Linear):
    """A Linear layer that runs on the first ``x.shape[-1]`` inputs and its first ``out`` outputs."""

    def forward(self, x: Tensor, out: int | None = None) -> Tensor:  # type: ignore[override]
        k = self.out_features if out is None else out
        bias = None if self.bias is None else self.bias[:k]
        return F.linear(x, self.weight[:k, :x.shape[-1]], bias)


class SlimmableMLP(nn.Module):
    """Linear+ReLU hidden layers slimmed by one width multiplier; the output layer keeps all
    ``out_dim`` units (it reads the slimmed last hidden layer), optionally followed by ReLU."""

    def __init__(self, in_dim: int, hidden: Sequence[int], out_dim: int, final_activation: bool = False) -> None:
        super().__init__()
        self.in_dim, self.hidden, self.out_dim = in_dim, list(hidden), out_dim
        sizes = [in_dim, *hidden, out_dim]
        self.layers = nn.ModuleList(SlimmableLinear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.final_activation = final_activation

    def forward(self, x: Tensor, m: float = 1.0) -> Tensor:
        for h, layer in zip(self.hidden, self.layers):
            x = F.relu(layer(x, active_units(h, m)))
        x = self.layers[-1](x)
        return F.relu(x) if self.final_activation else x

    def macs(self, m: float = 1.0) -> int:
        """Multiply-adds per sample of the weight matrices at width ``m`` (bias additions not counted)."""
        sizes = [self.in_dim, *(active_units(h, m) for h in self.hidden), self.out_dim]
        return sum(a * b for a, b in zip(sizes[:-1], sizes[1:]))
