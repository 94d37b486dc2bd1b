"""Experience replay with a reservoir memory (Chaudhry et al. 2019, "On Tiny Episodic
Memories in Continual Learning"; the memory is filled with Vitter's Algorithm R, 1985).

Every step draws a batch from the memory and adds its loss to the current one,

    L = L(B_t) + L(B_M),    B_M ~ U(M),

which is twice the mean loss over the concatenated batch B_t ∪ B_M when |B_M| = |B_t| (ER as
in the paper). For a network whose samples do not interact (e.g. an MLP), B_M goes through the
trainer's forward pass together with B_t (the same outputs as a forward of its own). The
current batch is then offered to the memory. ``class_balanced=True`` uses class-balanced
reservoir sampling (Chrysakis & Moens, ICML 2020) instead. Needs no task boundaries, so it
also runs on task-free streams.

Checked against: aimagelab/mammoth models/er.py and utils/buffer.py (reservoir buffer; the memory
batch is concatenated to the current batch and one mean loss is taken; the current batch is then
offered to the buffer: Algorithm R, index randint(0, n) kept if below the memory size). Same
memory and update order.
Deviations: we add the two batches' mean losses instead of taking the mean over their
concatenation, i.e. twice mammoth's loss when the batches have equal size (a factor on the step
size).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from polytask.continual.base import BufferStrategy, batch_loss, samplewise
from polytask.continual._buffer import ReservoirBuffer, batch_tensors, class_keys, rows_batch
from polytask.errors import PolytaskError
from polytask.registry import STRATEGIES
from polytask.tasks import Batch, Inputs
from polytask.trainer import Trainer


@STRATEGIES.register("replay")
class Replay(BufferStrategy):
    """Experience replay from a reservoir-sampled memory, optionally class-balanced (Chaudhry et al. 2019)."""

    def __init__(self, *, memory: int = 500, batch_size: int | None = None, class_balanced: bool = False) -> None:
        super().__init__()
        if memory < 1:
            raise PolytaskError(f"replay memory must hold at least 1 sample, got {memory}")
        self.memory, self.replay_batch, self.class_balanced = int(memory), batch_size, class_balanced
        self.buffer = ReservoirBuffer(self.memory, class_balanced=class_balanced)
        self._joint = False
        self._rows: dict[str, Tensor] | None = None  # this step's memory batch

    def setup(self, scenario: Any, seed: int) -> None:
        super().setup(scenario, seed)
        self.buffer = ReservoirBuffer(self.memory, class_balanced=self.class_balanced, seed=seed + 104729)

    def before_fit(self, trainer: Trainer) -> None:
        self._joint = samplewise(trainer.model)

    def joint_inputs(self, trainer: Trainer, batch: Batch) -> Inputs | None:
        """The memory batch's inputs, forwarded with the step's batch when the model is sample-wise."""
        self._rows = self.buffer.sample(self.replay_batch or len(batch)) if len(self.buffer) else None
        return rows_batch(self._rows, self.all_tasks).x if self._rows is not None and self._joint else None

    def extra_loss(self, trainer: Trainer, batch: Batch, outputs: dict[str, Tensor]) -> Tensor | None:
        if self._rows is None and len(self.buffer):  # a trainer that does not call joint_inputs
            self._rows = self.buffer.sample(self.replay_batch or len(batch))
        loss = None
        if self._rows is not None:
            memory = rows_batch(self._rows, self.all_tasks, self.buffer.full)
            loss = batch_loss(trainer.model, self.all_tasks, memory, getattr(trainer, "joint_outputs", {}).get(self))
        keys = class_keys(batch, [t.name for t in self.all_tasks]) if self.class_balanced else None
        self.buffer.add(batch.x, batch_tensors(batch, self.all_tasks), keys, batch.full)
        self._rows = None
        return loss
