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
share of the drop of that loss. The surrogate's gradient 2c Ω (θ − θ̃) is added straight to
``.grad``, and both it and the ω update are fused ``torch._foreach`` passes over the
parameters into preallocated buffers, so a step costs the same in every experience.

Checked against: aimagelab/mammoth models/si.py and ContinualAI/avalanche
avalanche/training/plugins/synaptic_intelligence.py. Both: Omega += omega / (Delta^2 + xi) at
the end of a task, omega reset, surrogate sum Omega (theta - theta~)^2. Avalanche accumulates
omega from g . Delta theta of every actual step (g the gradient of the loss with the surrogate),
as we do.
Deviations: mammoth accumulates omega += lr g^2 (the path integral for plain SGD, whatever the
optimiser) after clipping gradients to [-1, 1]; we measure -g . Delta theta from the actual step
(the same for SGD, still right for momentum or Adam) and do not clip. Avalanche clamps Omega at
0.001, weights the surrogate by lambda / 2 and leaves batch-norm parameters out; we do none of
these (our c is Eq. 4's c).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from polytask.continual.base import Strategy, grads_of, trainable
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
        self._params: list[nn.Parameter] = []
        self._omega: list[Tensor] = []  # the values of ``omega``, in parameter order
        self._prev: list[Tensor] = []  # θ before the last step
        self._grad: list[Tensor] = []  # the gradient that step used (0 where a parameter had none)
        self._surrogate: tuple[list[Any], list[Tensor], list[Tensor]] | None = None  # (θ, Ω, θ̃)
        self._stepped = False

    def before_fit(self, trainer: Trainer) -> None:
        params = trainable(trainer.model)
        if not self.anchor:
            self.anchor = {n: p.detach().clone() for n, p in params}
        self.omega = {n: torch.zeros_like(p) for n, p in params}
        self._params = [p for _, p in params]
        self._omega = [self.omega[n] for n, _ in params]
        self._prev = [torch.empty_like(p) for p in self._params]
        self._grad = [torch.zeros_like(p) for p in self._params]
        held = [(p, self.big_omega[n], self.anchor[n]) for n, p in params if n in self.big_omega]
        self._surrogate = tuple(map(list, zip(*held))) if held else None
        self._stepped = False

    def _accumulate(self) -> None:
        """ω += −g · Δθ for the step taken since the last call."""
        if self._stepped:
            delta = torch._foreach_sub([p.detach() for p in self._params], self._prev)
            torch._foreach_addcmul_(self._omega, self._grad, delta, value=-1.0)

    def after_backward(self, trainer: Trainer, batch: Batch) -> None:
        if self._surrogate is not None:  # the surrogate's gradient 2c Ω (θ − θ̃)
            held, big_omega, anchor = self._surrogate
            diff = torch._foreach_sub([p.detach() for p in held], anchor)
            torch._foreach_addcmul_(grads_of(held), big_omega, diff, value=2 * self.c)
        self._accumulate()
        grads = [p.grad for p in self._params]
        if all(g is not None for g in grads):
            torch._foreach_copy_(self._grad, grads)  # type: ignore[arg-type]
        else:
            for buf, g in zip(self._grad, grads):
                if g is None:
                    buf.zero_()
                else:
                    buf.copy_(g)
        torch._foreach_copy_(self._prev, [p.detach() for p in self._params])
        self._stepped = True

    def after_fit(self, trainer: Trainer) -> None:
        self._accumulate()
        self._stepped = False
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
