"""Dark Experience Replay++ (Buzzega, Boschini, Porrello, Abati & Calderara, NeurIPS 2020,
"Dark Experience for General Continual Learning: a Strong, Simple Baseline").

A reservoir memory stores each sample with its label and the network's output logits z at
the time it was stored. The loss of every step is (Eq. 6 of the paper)

    L = L(B_t) + α · E_{(x', z') ~ M} ‖z' − h_θ(x')‖²₂ + β · E_{(x'', y'') ~ M} ℓ(y'', f_θ(x'')),

with two independent memory batches (for a network whose samples do not interact, e.g. an
MLP, both go through the trainer's forward pass together with B_t: the same outputs as a
forward pass each). The squared error is averaged over output units and samples (the
authors' code, ``F.mse_loss``), over the tasks each stored sample is labelled for. Needs no
task boundaries. Registered as ``der++``: the old name ``der`` still works but warns (in the
literature DER is Dynamically Expandable Representation, Yan et al. 2021).

Checked against: the authors' aimagelab/mammoth models/derpp.py: reservoir buffer of (x, y,
logits at insertion), alpha * F.mse_loss(h(x'), z') on one memory batch plus beta * loss(f(x''),
y'') on a second independent one, added to the current batch's loss. Same loss.
Deviations: none in the loss; the default alpha = 0.3 and beta = 0.5 are ours (mammoth requires
both to be set), and the memory stores logits only for the tasks each sample is labelled for.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from polytask.continual.base import BufferStrategy, batch_loss, samplewise
from polytask.continual._buffer import ReservoirBuffer, batch_tensors, rows_batch
from polytask.errors import PolytaskError
from polytask.registry import STRATEGIES
from polytask.tasks import Batch, Inputs
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
        self._joint = False
        self._draws: tuple[dict[str, Tensor], int] | None = None  # this step's memory batches

    def setup(self, scenario: Any, seed: int) -> None:
        super().setup(scenario, seed)
        self.buffer = ReservoirBuffer(self.memory, seed=seed + 1299709)

    def before_fit(self, trainer: Trainer) -> None:
        self._joint = samplewise(trainer.model)

    def logit_loss(self, model: nn.Module, rows: dict[str, Tensor], outputs: dict[str, Tensor] | None = None) -> Tensor:
        """Mean squared error between stored and current outputs, over the tasks each sample is labelled for."""
        batch = rows_batch(rows, self.all_tasks, self.buffer.full)
        out = outputs if outputs is not None else model(batch.x)
        total: Tensor | None = None
        for t in self.all_tasks:
            m = None if t.name in batch.full else batch.mask[t.name].float()  # None: every row labelled
            if m is not None and not bool(m.any()):
                continue
            err = ((out[t.name] - rows[f"z/{t.name}"]) ** 2).reshape(len(batch), -1).mean(-1)
            term = err.mean() if m is None else (err * m).sum() / m.sum()
            total = term if total is None else total + term
        return torch.zeros(()) if total is None else total

    def joint_inputs(self, trainer: Trainer, batch: Batch) -> Inputs | None:
        """The two memory batches' inputs, forwarded with the step's batch when the model is sample-wise."""
        self._draws = self._draw(self.replay_batch or len(batch)) if len(self.buffer) else None
        return rows_batch(self._draws[0], self.all_tasks).x if self._draws is not None and self._joint else None

    def _draw(self, n: int) -> tuple[dict[str, Tensor], int]:
        """Two independent memory batches of ``n`` items as one set of rows (the logit batch first) and its size."""
        first, second = self.buffer.draw(n), self.buffer.draw(n)
        return self.buffer.rows(torch.cat([first, second])), len(first)

    def memory_loss(self, model: nn.Module, drawn: tuple[dict[str, Tensor], int],
                    outputs: dict[str, Tensor] | None = None) -> Tensor:
        """α · logit MSE + β · label loss on the two memory batches ``drawn``; ``outputs``: the model's outputs
        for their rows, else one forward for both (:func:`~polytask.continual.base.samplewise` model) or one each."""
        rows, k = drawn
        if outputs is None and self._joint:
            outputs = model(rows_batch(rows, self.all_tasks).x)
        logits, labels = {key: v[:k] for key, v in rows.items()}, {key: v[k:] for key, v in rows.items()}
        parts = None if outputs is None else {t: v.split([k, len(v) - k]) for t, v in outputs.items()}  # one node each
        first = None if parts is None else {t: p[0] for t, p in parts.items()}
        second = None if parts is None else {t: p[1] for t, p in parts.items()}
        return (self.alpha * self.logit_loss(model, logits, first)
                + self.beta * batch_loss(model, self.all_tasks, rows_batch(labels, self.all_tasks, self.buffer.full), second))

    def extra_loss(self, trainer: Trainer, batch: Batch, outputs: dict[str, Tensor]) -> Tensor | None:
        if self._draws is None and len(self.buffer):  # a trainer that does not call joint_inputs
            self._draws = self._draw(self.replay_batch or len(batch))
        joint = getattr(trainer, "joint_outputs", {}).get(self)  # this hook's rows of the trainer's forward, if any
        loss = None if self._draws is None else self.memory_loss(trainer.model, self._draws, joint)
        logits = {f"z/{t.name}": outputs[t.name].detach() for t in self.all_tasks}
        self.buffer.add(batch.x, {**batch_tensors(batch, self.all_tasks), **logits}, full=batch.full)
        self._draws = None
        return loss
