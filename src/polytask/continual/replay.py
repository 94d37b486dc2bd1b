"""Experience replay with a reservoir memory (Chaudhry et al. 2019, "On Tiny Episodic
Memories in Continual Learning"; the memory is filled with Vitter's Algorithm R, 1985).

Every step draws a batch from the memory and adds its loss to the current one,

    L = L(B_t) + L(B_M),    B_M ~ U(M),

which is twice the mean loss over the concatenated batch B_t ∪ B_M when |B_M| = |B_t| (ER as
in the paper). The current batch is then offered to the memory. ``class_balanced=True`` uses
class-balanced reservoir sampling (Chrysakis & Moens, ICML 2020) instead. Needs no task
boundaries, so it also runs on task-free streams.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from polytask.continual.base import BufferStrategy, batch_loss
from polytask.continual._buffer import ReservoirBuffer, batch_tensors, class_keys, rows_batch
from polytask.errors import PolytaskError
from polytask.registry import STRATEGIES
from polytask.tasks import Batch
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

    def setup(self, scenario: Any, seed: int) -> None:
        super().setup(scenario, seed)
        self.buffer = ReservoirBuffer(self.memory, class_balanced=self.class_balanced, seed=seed + 104729)

    def extra_loss(self, trainer: Trainer, batch: Batch, outputs: dict[str, Tensor]) -> Tensor | None:
        loss = None
        if len(self.buffer):
            rows = self.buffer.sample(self.replay_batch or len(batch))
            loss = batch_loss(trainer.model, self.all_tasks, rows_batch(rows, self.all_tasks))
        keys = class_keys(batch, [t.name for t in self.all_tasks]) if self.class_balanced else None
        self.buffer.add(batch.x, batch_tensors(batch, self.all_tasks), keys)
        return loss
