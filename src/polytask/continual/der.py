"""Dark Experience Replay++ (Buzzega, Boschini, Porrello, Abati & Calderara, NeurIPS 2020,
"Dark Experience for General Continual Learning: a Strong, Simple Baseline").

A reservoir memory stores each sample with its label and the network's output logits z at
the time it was stored. The loss of every step is (Eq. 6 of the paper)

    L = L(B_t) + α · E_{(x', z') ~ M} ‖z' − h_θ(x')‖²₂ + β · E_{(x'', y'') ~ M} ℓ(y'', f_θ(x'')),

with two independent memory batches. The squared error is averaged over output units and
samples (the authors' code, ``F.mse_loss``), over the tasks each stored sample is labelled
for. Needs no task boundaries. Registered as ``der++``: the old name ``der`` still works but
warns (in the literature DER is Dynamically Expandable Representation, Yan et al. 2021).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from polytask.continual.base import BufferStrategy, batch_loss
from polytask.continual._buffer import ReservoirBuffer, batch_tensors, rows_batch
from polytask.errors import PolytaskError
from polytask.registry import STRATEGIES
from polytask.tasks import Batch
from polytask.trainer import Trainer


@STRATEGIES.register("der++", old_names=("der",))
class DERPlusPlus(BufferStrategy):
    """DER++: replay stored logits (α·MSE) and labels (β·CE) from a reservoir memory (Buzzega et al. 2020)."""

    def __init__(self, *, memory: int = 500, alpha: float = 0.3, beta: float = 0.5, batch_size: int | None = None) -> None:
        super().__init__()
        if memory < 1 or alpha < 0 or beta < 0:
            raise PolytaskError("der++ needs memory >= 1, alpha >= 0 and beta >= 0")
        self.memory, self.alpha, self.beta, self.replay_batch = int(memory), float(alpha), float(beta), batch_size
        self.buffer = ReservoirBuffer(self.memory)

    def setup(self, scenario: Any, seed: int) -> None:
        super().setup(scenario, seed)
        self.buffer = ReservoirBuffer(self.memory, seed=seed + 1299709)

    def logit_loss(self, model: nn.Module, rows: dict[str, Tensor]) -> Tensor:
        """Mean squared error between stored and current outputs, over the tasks each sample is labelled for."""
        batch = rows_batch(rows, self.all_tasks)
        out = model(batch.x)
        total = torch.zeros(())
        for t in self.all_tasks:
            m = batch.mask[t.name].float()
            if not bool(m.any()):
                continue
            err = ((out[t.name] - rows[f"z/{t.name}"]) ** 2).reshape(len(m), -1).mean(-1)
            total = total + (err * m).sum() / m.sum()
        return total

    def extra_loss(self, trainer: Trainer, batch: Batch, outputs: dict[str, Tensor]) -> Tensor | None:
        loss = None
        if len(self.buffer):
            n = self.replay_batch or len(batch)
            loss = self.alpha * self.logit_loss(trainer.model, self.buffer.sample(n))
            loss = loss + self.beta * batch_loss(trainer.model, self.all_tasks, rows_batch(self.buffer.sample(n), self.all_tasks))
        logits = {f"z/{t.name}": outputs[t.name].detach() for t in self.all_tasks}
        self.buffer.add(batch.x, {**batch_tensors(batch, self.all_tasks), **logits})
        return loss
