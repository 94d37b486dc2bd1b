"""Synaptic Intelligence (Zenke, Poole & Ganguli, ICML 2017, "Continual Learning Through
Synaptic Intelligence").

During experience μ each parameter accumulates its path-integral contribution to the loss
drop (the discrete form of Eq. 3): after every optimizer step

    ω_k += −g_k(t) · Δθ_k(t),

where g is the gradient used for the step and Δθ the update it produced. At the end of μ
(Eq. 5):  Ω_k += ω_k / ((Δ_k)² + ξ)  with Δ_k = θ_k(end of μ) − θ_k(end of μ−1), and ω is
reset. The surrogate loss of later experiences (Eq. 4) is

    L̃_μ = L_μ + c Σ_k Ω_k (θ̃_k − θ_k)²,    θ̃ = the weights at the end of μ−1.

Choice: g is the gradient of the loss actually minimised (task loss plus the surrogate
term), as in van de Ven & Tolias' (2019) implementation; ω then measures each parameter's
share of the drop of that loss.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from polytask.continual.base import Strategy, trainable
from polytask.errors import PolytaskError
from polytask.registry import STRATEGIES
from polytask.tasks import Batch
from polytask.trainer import Trainer


@STRATEGIES.register("si")
class SI(Strategy):
    """Synaptic Intelligence: path-integral importance ω, consolidated into Ω with damping ξ (Zenke et al. 2017)."""

    needs_boundaries = True

    def __init__(self, *, c: float = 1.0, xi: float = 0.1) -> None:
        super().__init__()
        if c < 0 or xi <= 0:
            raise PolytaskError(f"si needs c >= 0 and xi > 0, got c={c}, xi={xi}")
        self.c, self.xi = float(c), float(xi)
        self.omega: dict[str, Tensor] = {}
        self.big_omega: dict[str, Tensor] = {}
        self.anchor: dict[str, Tensor] = {}
        self._prev: dict[str, Tensor] = {}
        self._grad: dict[str, Tensor] = {}

    def before_fit(self, trainer: Trainer) -> None:
        params = trainable(trainer.model)
        if not self.anchor:
            self.anchor = {n: p.detach().clone() for n, p in params}
        self.omega = {n: torch.zeros_like(p) for n, p in params}
        self._prev, self._grad = {}, {}

    def extra_loss(self, trainer: Trainer, batch: Batch, outputs: dict[str, Tensor]) -> Tensor | None:
        if not self.big_omega:
            return None
        total = torch.zeros(())
        for n, p in trainer.model.named_parameters():
            if n in self.big_omega:
                total = total + (self.big_omega[n] * (p - self.anchor[n]) ** 2).sum()
        return self.c * total

    def _accumulate(self, model: nn.Module) -> None:
        """ω += −g · Δθ for the step taken since the last call."""
        for n, p in trainable(model):
            if n in self._grad:
                self.omega[n] -= self._grad[n] * (p.detach() - self._prev[n])

    def after_backward(self, trainer: Trainer, batch: Batch) -> None:
        self._accumulate(trainer.model)
        self._prev, self._grad = {}, {}
        for n, p in trainable(trainer.model):
            if p.grad is not None:
                self._prev[n] = p.detach().clone()
                self._grad[n] = p.grad.detach().clone()

    def after_fit(self, trainer: Trainer) -> None:
        self._accumulate(trainer.model)
        self._prev, self._grad = {}, {}
        for n, p in trainable(trainer.model):
            delta = p.detach() - self.anchor[n]
            self.big_omega[n] = self.big_omega.get(n, torch.zeros_like(p)) + self.omega[n] / (delta ** 2 + self.xi)
            self.anchor[n] = p.detach().clone()

    def state_tensors(self) -> dict[str, Tensor]:
        return {**{f"Omega/{k}": v for k, v in self.big_omega.items()}, **{f"anchor/{k}": v for k, v in self.anchor.items()}}

    def load_state(self, tensors: dict[str, Tensor], meta: dict[str, Any], model: nn.Module) -> None:
        super().load_state(tensors, meta, model)
        self.big_omega = {k[6:]: v for k, v in tensors.items() if k.startswith("Omega/")}
        self.anchor = {k[7:]: v for k, v in tensors.items() if k.startswith("anchor/")}
