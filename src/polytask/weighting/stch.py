"""Smooth Tchebycheff scalarization (Lin, Zhang, Yang, Zhang & Zhang, ICML 2024, "Smooth
Tchebycheff Scalarization for Multi-Objective Optimization"), Eq. 11 with equal preferences:

    L = mu log sum_t exp((l_t - z_t) / mu),

whose gradient weights the tasks by softmax((l - z)/mu): the worst task (relative to its
ideal value z_t) gets the most weight, smoothly (mu -> 0 gives the Tchebycheff max).

Following the authors' multi-task code (STCH_MTL / LibMTL):
* l_t = log L_t (``log=True``, default); ``log=False`` uses the raw losses as in Eq. 11;
* the first ``warmup_epochs`` epochs (4 there) minimise sum_t l_t;
* the scalarization is multiplied by T to keep the scale of a sum of T losses;
* mu = 1.

Ideal point z (``reference``): "min" (default) is the running minimum of each task's l_t
seen so far, warm-up included (the paper's estimate of the ideal point z*); "warmup" is the
official MTL code's choice, the transformed mean training loss of the last warm-up epoch
(a nadir-like reference; with log=True, log(L_t / mean L_t)).
The returned weights are those on l_t: T softmax((l - z)/mu) (ones during warm-up).

Checked against: median-research-group/LibMTL LibMTL/weighting/STCH.py (commit 4336804, adapted,
its docstring says, from the official Xi-L/STCH STCH_MTL code): warm-up on sum_t log(L_t + 1e-20),
then T mu log sum_t exp((log(L_t / n_t + 1e-20) - max) / mu) with n the mean training losses of
the last warm-up epoch. tests/test_reference_libmtl.py gives polytask (``reference="warmup"``)
LibMTL's nadir vector and compares the gradient w.r.t. the losses, warm-up included.
Deviations: the default ideal point is the running minimum (``reference="min"``, above), not
LibMTL's nadir; LibMTL warms up for ``STCH_warmup_epoch`` + 1 epochs (the nadir comes from the last
of them), we for ``warmup_epochs``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from polytask.errors import PolytaskError
from polytask.registry import WEIGHTINGS
from polytask.weighting.base import Weighting
from polytask.weighting._common import check_choice


@WEIGHTINGS.register("stch")
class STCH(Weighting):
    """Smooth Tchebycheff scalarization: soft-max of the losses' gaps to an ideal point (Lin et al. 2024)."""

    def __init__(self, task_names: Sequence[str], *, mu: float = 1.0, warmup_epochs: int = 4,
                 reference: str = "min", log: bool = True) -> None:
        super().__init__(task_names)
        if not mu > 0:
            raise PolytaskError(f"stch mu must be positive, got {mu}")
        if warmup_epochs < 0:
            raise PolytaskError(f"stch warmup_epochs must be non-negative, got {warmup_epochs}")
        self.reference = check_choice("stch", "reference", reference, ("min", "warmup"))
        if self.reference == "warmup" and warmup_epochs == 0:
            raise PolytaskError("stch reference='warmup' needs warmup_epochs >= 1; pass warmup_epochs=4 or reference='min'")
        self.mu = float(mu)
        self.warmup_epochs = int(warmup_epochs)
        self.log = bool(log)
        self.register_buffer("ideal", torch.full((self.num_tasks,), float("inf")))
        self.register_buffer("epochs_done", torch.zeros((), dtype=torch.long))

    def transform(self, losses: Tensor) -> Tensor:
        return torch.log(losses + 1e-20) if self.log else losses

    def objective(self, losses: Tensor) -> tuple[Tensor, Tensor]:
        ell = self.transform(losses)
        if self.reference == "min":
            self.ideal.copy_(torch.minimum(self.ideal, ell.detach().to(self.ideal)))
        if int(self.epochs_done) < self.warmup_epochs:
            return ell.sum(), torch.ones_like(losses).detach()
        gap = (ell - self.ideal.to(ell)) / self.mu
        return self.num_tasks * self.mu * torch.logsumexp(gap, 0), (self.num_tasks * torch.softmax(gap, 0)).detach()

    def end_epoch(self, epoch: int, mean_losses: Tensor) -> None:
        self.epochs_done += 1
        if self.reference == "warmup" and int(self.epochs_done) == self.warmup_epochs:
            self.ideal.copy_(self.transform(mean_losses.detach().to(self.ideal)))
