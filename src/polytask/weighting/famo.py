"""FAMO (Liu, Feng, Stone & Liu, NeurIPS 2023, "FAMO: Fast Adaptive Multitask Optimization").

Task weights z = softmax(xi) over logits xi (Sec. 3.2). The model step follows

    grad = sum_t c z_t grad L_t / L_t,  c = (sum_t z_t / L_t)^{-1},

i.e. the gradient of sum_t z_t log L_t / c with c held constant (Eq. 6, the official code's
weighted loss), so tasks are balanced on the log scale and every step costs one backward.
After a step the logits move along the observed decrease of the log losses,

    delta_t = log L_t(before) - log L_t(after),   xi <- xi - lr * Adam( J_softmax(xi)^T delta + gamma xi )   (Eq. 7-8)

which raises the weights of tasks that improved less than the weighted average. The logits
have their own rule, so they are buffers (not trainable parameters); the Adam moments are
buffers too (checkpointed with the weighting). ``lr`` = 0.025 and ``gamma`` = 0.001 are
LibMTL's defaults (the official famo.py: lr 0.025, gamma 0.01); the minimum losses L* are 0.

Delayed update (documented deviation): the paper measures L(after) on the same batch after
the optimiser step, which needs an extra forward pass the Trainer does not make. Our
``backward`` first updates xi from the losses it stored at the previous step and the losses
of the current step (the model after the previous step, on the next batch), then weights the
current losses. The first step only stores losses. This is the stochastic estimate of the
same decrease, at no extra cost.

Checked against: the official Cranial-XIX/FAMO famo.py (z = softmax(w), D = L - L* + 1e-8,
c = sum(z / D) detached, loss sum(log D z / c); ``update`` takes the gradient of softmax(w) with
grad_outputs delta and steps torch Adam with weight_decay gamma; the shared gradient is clipped to
norm 1.0) and median-research-group/LibMTL LibMTL/weighting/FAMO.py (commit 4336804, the same code
without the clipping). tests/test_reference_libmtl.py compares our weighted loss's gradient and
four successive logit updates with LibMTL's run on fixed losses.
Deviations: the delayed update above; gamma defaults to LibMTL's 0.001 (famo.py's default is 0.01,
the copy in OptMN-Lab/fairgrad's weight_methods.py uses 1e-5); no gradient clipping (a trainer
option here, not part of the weighting).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from polytask.errors import PolytaskError
from polytask.registry import WEIGHTINGS
from polytask.weighting.base import Weighting

_BETAS = (0.9, 0.999)
_EPS = 1e-8


@WEIGHTINGS.register("famo")
class FAMO(Weighting):
    """FAMO: softmax task weights adapted from the observed log-loss decrease, O(1) per step (Liu et al. 2023)."""

    def __init__(self, task_names: Sequence[str], *, lr: float = 0.025, gamma: float = 0.001) -> None:
        super().__init__(task_names)
        if not lr > 0 or gamma < 0:
            raise PolytaskError(f"famo needs lr > 0 and gamma >= 0, got lr={lr}, gamma={gamma}")
        self.lr = float(lr)
        self.gamma = float(gamma)
        t = self.num_tasks
        self.register_buffer("logits", torch.zeros(t))
        self.register_buffer("prev_losses", torch.zeros(t))
        self.register_buffer("has_prev", torch.zeros((), dtype=torch.bool))
        self.register_buffer("adam_m", torch.zeros(t))
        self.register_buffer("adam_v", torch.zeros(t))
        self.register_buffer("adam_step", torch.zeros((), dtype=torch.long))

    def update_logits(self, before: Tensor, after: Tensor) -> None:
        """One Adam step on xi with gradient J_softmax^T delta + gamma xi (torch Adam with L2 weight decay)."""
        delta = torch.log(before + _EPS) - torch.log(after + _EPS)
        z = torch.softmax(self.logits, 0)
        grad = z * (delta - (z * delta).sum()) + self.gamma * self.logits
        self.adam_step += 1
        k = int(self.adam_step)
        self.adam_m.mul_(_BETAS[0]).add_((1 - _BETAS[0]) * grad)
        self.adam_v.mul_(_BETAS[1]).add_((1 - _BETAS[1]) * grad * grad)
        m_hat = self.adam_m / (1 - _BETAS[0] ** k)
        v_hat = self.adam_v / (1 - _BETAS[1] ** k)
        self.logits.sub_(self.lr * m_hat / (v_hat.sqrt() + _EPS))

    def objective(self, losses: Tensor) -> tuple[Tensor, Tensor]:
        current = losses.detach().to(self.logits)
        if bool(self.has_prev):
            self.update_logits(self.prev_losses, current)
        z = torch.softmax(self.logits, 0).to(losses)
        shifted = losses + _EPS
        c = (z / shifted.detach()).sum()
        self.prev_losses.copy_(current)
        self.has_prev.fill_(True)
        return (z * torch.log(shifted) / c).sum(), (z / (c * shifted)).detach()
