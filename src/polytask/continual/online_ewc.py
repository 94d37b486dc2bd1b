"""Online EWC (Schwarz et al., ICML 2018, "Progress & Compress", Sec. 3 / Eq. 8; the same
online form as Huszár 2018's correction of EWC).

One running Fisher and one anchor instead of one penalty per experience:

    F̃_t = γ F̃_{t−1} + F_t,      L(θ) = L_t(θ) + λ/2 Σ_i F̃_{t−1,i} (θ_i − θ*_{t−1,i})²

with γ ≤ 1 down-weighting older experiences and θ*_{t−1} the weights after the last one.
F_t is estimated as in :mod:`polytask.continual.ewc`.

Checked against: aimagelab/mammoth models/ewc_on.py (F~ <- gamma F~ + F at the end of each task,
anchor = the weights after the last task, penalty lambda sum_i F~_i (theta_i - theta*_i)^2, its
gradient 2 lambda F~ (theta - theta*) written into .grad) and ContinualAI/avalanche's EWCPlugin
mode "online" (the same update with ``decay_factor``). Same recursion.
Deviations: the references' lambda is our lambda / 2 (no 1/2 there); their Fisher estimates
differ from ours as listed in :mod:`polytask.continual.ewc`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from polytask.continual.ewc import EWC
from polytask.errors import PolytaskError
from polytask.registry import STRATEGIES


@STRATEGIES.register("online-ewc")
class OnlineEWC(EWC):
    """Online EWC: one running Fisher decayed by γ and one anchor (Schwarz et al. 2018)."""

    def __init__(self, *, lam: float = 1000.0, gamma: float = 1.0, fisher_samples: int = 1000,
                 fisher: str = "true") -> None:
        super().__init__(lam=lam, fisher_samples=fisher_samples, fisher=fisher)
        if not 0.0 <= gamma <= 1.0:
            raise PolytaskError(f"gamma must lie in [0, 1], got {gamma}")
        self.gamma = float(gamma)

    def consolidate(self, fisher: dict[str, Tensor], anchor: dict[str, Tensor]) -> None:
        """F̃ = γ F̃ + F in one fused pass; the anchor becomes θ* (no constant: one quadratic)."""
        if self.anchors:
            old, _ = self.anchors[0]
            names = list(fisher)
            summed = torch._foreach_add(torch._foreach_mul([old[k] for k in names], self.gamma),
                                        [fisher[k] for k in names])
            fisher = dict(zip(names, summed))
        self.anchors, self.offset = [(fisher, anchor)], 0.0
