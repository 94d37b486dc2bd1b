"""Dynamic Weight Average (Liu, Johns & Davison, CVPR 2019, "End-to-End Multi-Task Learning
with Attention"), Eq. 7:

    lambda_k(t) = K exp(w_k(t-1) / T) / sum_i exp(w_i(t-1) / T),   w_k(t-1) = L_k(t-1) / L_k(t-2)

with L_k the mean training loss of task k over an epoch, temperature T (2 in the paper) and
lambda_k = 1 for the first two epochs. The training loss is sum_k lambda_k L_k.

Checked against: median-research-group/LibMTL LibMTL/weighting/DWA.py (commit 4336804, adapted
by its authors from the official lorenmt/mtan code): weights K softmax(w / T) with w the ratio of
the last two epochs' mean training losses, and 1 for epochs 0 and 1 (``self.epoch > 1``). Same
rule; tests/test_reference_libmtl.py compares the weights at epochs 0-3 with LibMTL's on a
fixture. Deviations: none (our ratio clamps the denominator at 1e-12).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from polytask.errors import PolytaskError
from polytask.registry import WEIGHTINGS
from polytask.weighting.base import Weighting


@WEIGHTINGS.register("dwa")
class DynamicWeightAverage(Weighting):
    """Dynamic Weight Average: weights from each task's epoch-to-epoch loss ratio (Liu et al. 2019)."""

    def __init__(self, task_names: Sequence[str], *, temperature: float = 2.0) -> None:
        super().__init__(task_names)
        if not temperature > 0:
            raise PolytaskError(f"dwa temperature must be positive, got {temperature}")
        self.temperature = float(temperature)
        self.register_buffer("history", torch.ones(2, self.num_tasks))  # rows: L(t-2), L(t-1)
        self.register_buffer("epochs_seen", torch.zeros((), dtype=torch.long))

    def current_weights(self) -> Tensor:
        """lambda(t) for the epoch now running."""
        if int(self.epochs_seen) < 2:
            return torch.ones(self.num_tasks)
        ratio = self.history[1] / self.history[0].clamp_min(1e-12)
        return self.num_tasks * torch.softmax(ratio / self.temperature, 0)

    def objective(self, losses: Tensor) -> tuple[Tensor, Tensor]:
        w = self.current_weights().to(losses)
        return (w * losses).sum(), w.detach()

    def end_epoch(self, epoch: int, mean_losses: Tensor) -> None:
        latest = mean_losses.detach().to(self.history)
        self.history.copy_(torch.stack([self.history[1], latest]))
        self.epochs_seen += 1
