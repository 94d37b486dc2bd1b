"""Random Loss Weighting (Lin, Ye, Xu, Shi & Zhang, TMLR 2022, "Reasonable Effectiveness of
Random Weighting: A Litmus Test for Multi-Task Learning"), Eq. 3 with the normal sampler:

    lambda = softmax(eps),  eps ~ N(0, I_T),  drawn afresh every step;  L = sum_t lambda_t L_t

The draws come from a private generator seeded by ``seed`` (same seed, same weights).

Checked against: median-research-group/LibMTL LibMTL/weighting/RLW.py ("implemented by us": the
library of the paper's first author; ``F.softmax(torch.randn(task_num), dim=-1)`` each step, loss
``sum(losses * weights)``). They match; tests/test_reference_fixtures.py checks the draw.
Deviations: the draw uses a private seeded ``torch.Generator`` (saved with the weighting's state)
instead of the global RNG, so the model's own random stream is untouched and resume is exact;
other samplers than the normal one are not offered (LibMTL implements only the normal one).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from polytask.registry import WEIGHTINGS
from polytask.weighting.base import Weighting
from polytask.weighting._common import SeededRandom


@WEIGHTINGS.register("rlw")
class RandomLossWeighting(SeededRandom, Weighting):
    """Random loss weighting: softmax of standard normal draws each step (Lin et al. 2022)."""

    def __init__(self, task_names: Sequence[str], *, seed: int = 0) -> None:
        super().__init__(task_names)
        self._seed(seed)

    def objective(self, losses: Tensor) -> tuple[Tensor, Tensor]:
        w = torch.softmax(torch.randn(self.num_tasks, generator=self.generator), 0).to(losses)
        return (w * losses).sum(), w
