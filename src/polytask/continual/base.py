"""The Strategy base class: a set of :class:`~polytask.trainer.Hook` callbacks around
``Trainer.fit`` (one fit per experience), plus the state a strategy carries from one
experience to the next (saved beside the weights: tensors as safetensors, the rest as JSON).

The runner calls, for experience i: ``strategy.begin(i, tasks)``, then ``Trainer.fit``
(which calls ``before_fit``, ``extra_loss`` and ``after_backward`` every step, and
``after_fit``), then ``before_eval`` before the accuracy-matrix row is measured.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from polytask.continual.scenario import Scenario
from polytask.models.backbones import Identity
from polytask.metrics import masked_task_losses
from polytask.tasks import Batch, MultiTaskData, Task
from polytask.trainer import Hook


class Strategy(Hook):
    """Base continual strategy: plain fine-tuning unless a subclass adds hooks."""

    #: False when the strategy can learn from a task-free stream (no boundary callbacks).
    needs_boundaries: bool = False

    def __init__(self) -> None:
        self.scenario: Scenario | None = None
        self.seed = 0
        self.current = 0
        self.current_tasks: list[Task] = []
        self.finished: list[int] = []

    # --------------------------------------------------------------- set-up
    def setup(self, scenario: Scenario, seed: int) -> None:
        """Called once, before the model is built."""
        self.scenario = scenario
        self.seed = seed

    def build_model(self, default: Callable[[], nn.Module]) -> nn.Module:
        """The network to train; ``default()`` builds the run's architecture."""
        return default()

    def begin(self, index: int, tasks: list[Task]) -> None:
        """Called before experience ``index`` (``tasks``: the tasks it labels)."""
        self.current = index
        self.current_tasks = tasks

    def train_data(self, index: int) -> tuple[list[Task], MultiTaskData]:
        """The tasks and data the trainer sees for experience ``index``."""
        assert self.scenario is not None
        return self.scenario.experience_tasks(index), self.scenario[index].train

    def end(self, index: int) -> None:
        """Called after experience ``index`` (after ``after_fit``)."""
        self.finished.append(index)

    def before_eval(self, model: nn.Module) -> None:
        """Called before the model is evaluated (e.g. to fit a router)."""

    # ---------------------------------------------------------------- state
    def state_tensors(self) -> dict[str, Tensor]:
        return {}

    def state_meta(self) -> dict[str, Any]:
        return {"finished": self.finished}

    def load_state(self, tensors: dict[str, Tensor], meta: dict[str, Any], model: nn.Module) -> None:
        """Restore what :meth:`state_tensors` and :meth:`state_meta` saved (``model`` is already built)."""
        self.finished = list(meta["finished"])

    # -------------------------------------------------------------- helpers
    @property
    def all_tasks(self) -> list[Task]:
        assert self.scenario is not None
        return self.scenario.tasks

    def seen_tasks(self) -> list[Task]:
        """Tasks labelled by the finished experiences, in scenario order."""
        assert self.scenario is not None
        names = {n for i in self.finished for n in self.scenario[i].tasks}
        return [t for t in self.scenario.tasks if t.name in names]


#: parameter-free modules that act on each sample alone
SAMPLEWISE = (nn.ReLU, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.ELU, nn.Softplus, nn.Identity,
              nn.Dropout, Identity)


def samplewise(model: nn.Module) -> bool:
    """True when each sample's output cannot depend on the rest of its batch (nor on a random draw):
    every module is a Linear layer, a container, or a :data:`SAMPLEWISE` leaf, and no dropout is active.
    Then one forward over joined batches equals one forward per batch."""
    for mod in model.modules():
        if type(mod) is nn.Linear:
            continue
        if mod._parameters or (next(mod.children(), None) is None and not isinstance(mod, SAMPLEWISE)):
            return False
        if isinstance(mod, nn.Dropout) and mod.training and mod.p > 0:
            return False
    return True


def trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def grads_of(params: list[nn.Parameter]) -> list[Tensor]:
    """The ``.grad`` of each parameter, a zero tensor set in place of a missing one (for in-place ``_foreach`` adds)."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    return [p.grad for p in params]  # type: ignore[misc]


def batch_loss(model: nn.Module, tasks: list[Task], batch: Batch, outputs: dict[str, Tensor] | None = None) -> Tensor:
    """Sum over ``tasks`` labelled in ``batch`` of the masked mean task loss (0 if none is)."""
    present = [t for t in tasks if t.name in batch.full or (t.name in batch.mask and bool(batch.mask[t.name].any()))]
    if not present:
        return torch.zeros(())
    outputs = outputs if outputs is not None else model(batch.x)
    return masked_task_losses(present, outputs, batch).sum()


class BufferStrategy(Strategy):
    """A strategy with a rehearsal buffer ``self.buffer``, checkpointed with the strategy state."""

    buffer: Any

    def state_tensors(self) -> dict[str, Tensor]:
        return self.buffer.state_tensors("buffer/")

    def state_meta(self) -> dict[str, Any]:
        return {**super().state_meta(), "buffer": self.buffer.state_meta()}

    def load_state(self, tensors: dict[str, Tensor], meta: dict[str, Any], model: nn.Module) -> None:
        super().load_state(tensors, meta, model)
        self.buffer.load(tensors, meta["buffer"], "buffer/")
