"""Dual-Balancing Multi-Task Learning (Lin, Jiang, Ye, Zhang, Chen, Chen, Zhang & Kwok, 2023,
arXiv:2308.12029, "Dual-Balancing Multi-Task Learning").

Loss-scale balancing (Sec. 3.1): every task loss is log-transformed, L_t -> log(L_t + eps).
Gradient-magnitude balancing (Sec. 3.2): an exponential moving average of each task's
gradient of the log loss,

    g^_t <- beta_k g^_t + (1 - beta_k) grad log L_t,   beta_k = beta / k^sigma   (Eq. 5; g^_t = 0 at start)

and every task's averaged gradient is scaled to the largest norm:

    update = sum_t (max_s ||g^_s|| / ||g^_t||) g^_t                                (Eq. 6)

``beta`` = 0.9 and ``beta_sigma`` = 0 are the defaults of the authors' LibMTL code, whose
update rule (zero-initialised buffer, no bias correction) we follow. Task-specific
parameters get the gradient of sum_t log L_t.

Gradient source: shared parameters only (the average over steps needs a fixed coordinate
system; a representation gradient changes meaning with every batch), as in LibMTL.

Checked against: median-research-group/LibMTL LibMTL/weighting/DB_MTL.py (commit 4336804, by
the paper's authors): log(L + 1e-8), the buffer update g^ <- g + (beta / k^sigma)(g^ - g) from a
zero buffer, alpha = max ||g^|| / (||g^_t|| + 1e-8), update sum_t alpha_t g^_t.
tests/test_reference_libmtl.py runs four steps (buffer carried over, beta_sigma = 0.5) and
compares the shared gradient with LibMTL's at every step.
Deviations: none in the update. Task-specific parameters get the gradient of sum_t log L_t (in
LibMTL they get it as a side effect of its per-task backward passes, the same sum).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from polytask.errors import PolytaskError
from polytask.registry import WEIGHTINGS
from polytask.weighting.base import GradContext, Weighting
from polytask.weighting._common import need_ctx


@WEIGHTINGS.register("db-mtl")
class DBMTL(Weighting):
    """DB-MTL: log losses plus moving-average gradients rescaled to the largest norm (Lin et al. 2023)."""

    grad_source = "params"

    def __init__(self, task_names: Sequence[str], *, beta: float = 0.9, beta_sigma: float = 0.0) -> None:
        super().__init__(task_names)
        if not 0.0 <= beta < 1.0:
            raise PolytaskError(f"db-mtl beta must lie in [0, 1), got {beta}")
        self.beta = float(beta)
        self.beta_sigma = float(beta_sigma)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.grad_ema: Tensor | None = None

    def get_extra_state(self) -> Any:
        return {"grad_ema": self.grad_ema}

    def set_extra_state(self, state: Any) -> None:
        self.grad_ema = state["grad_ema"]

    def backward(self, losses: Tensor, ctx: GradContext | None = None) -> Tensor:
        ctx = need_ctx("db-mtl", ctx)
        log_losses = torch.log(losses + 1e-8)
        grads = ctx.task_grads(log_losses)
        self.step += 1
        beta = self.beta / float(self.step) ** self.beta_sigma
        previous = torch.zeros_like(grads) if self.grad_ema is None else self.grad_ema
        self.grad_ema = grads + beta * (previous - grads)
        norms = self.grad_ema.norm(dim=1)
        alpha = norms.max() / (norms + 1e-8)
        ctx.apply(log_losses, None, alpha @ self.grad_ema)
        return alpha.detach()
