"""The Architecture base class and the contract the Trainer and GradContext rely on.

- :class:`AuxiliaryLoss`: a module whose forward may add a loss term of its own (``aux_loss``);
- :class:`Architecture`: also declares its shared and per-task parameters and the representation
  cut (what :class:`polytask.weighting.base.GradContext` checks a model for).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor, nn

from polytask.models.backbones import Backbone, build_backbone
from polytask.tasks import Inputs, InputSpec, Task


def _before_forward(module: AuxiliaryLoss, args: Any) -> None:
    module.reset_forward_state()


class AuxiliaryLoss(nn.Module):
    """A module whose forward may set ``aux_loss``: None or a scalar tensor.

    ``aux_loss`` is reset to None before every forward, so ``forward`` sets it only when it
    has a term (e.g. a distillation or key-pull loss in train mode). The Trainer adds it to
    the step's loss and back-propagates it as is: weightings never rescale it.
    """

    aux_loss: Tensor | None

    def __init__(self) -> None:
        super().__init__()
        self.aux_loss = None
        self.register_forward_pre_hook(_before_forward)

    def reset_forward_state(self) -> None:
        """Forget what the previous forward recorded (called before every forward)."""
        self.aux_loss = None


class Architecture(AuxiliaryLoss):
    """Wires shared and task-specific parts; ``forward(x) -> {task: output}``.

    Subclasses build their blocks on ``self.backbone`` (``self.backbone.out_dim``
    features), put one tower per task in ``self.heads`` (via :meth:`make_heads`),
    register every other task-specific module with :meth:`mark_task_specific`, and
    pass the tensors at the shared/task-specific boundary through :meth:`cut` (or
    :meth:`boundary`) so gradient-balancing methods can work on the shared representation.

    The contract: :meth:`shared_parameters` and :meth:`task_specific_parameters` partition
    the trainable parameters; ``aux_loss`` (see :class:`AuxiliaryLoss`); and, for the last
    forward run inside ``with model.representation_cut():``, ``last_rep`` (the shared
    representation, batch first) and ``rep_leaf`` (the detached copy the task-specific side
    reads). Entering the cut clears both; forwards outside it leave them alone.
    """

    last_rep: Tensor | None
    rep_leaf: Tensor | None

    def __init__(self, tasks: Sequence[Task], input_spec: InputSpec, backbone: Backbone = "auto",
                 backbone_options: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.tasks = list(tasks)
        self.task_names = [t.name for t in self.tasks]
        self.input_spec = input_spec
        self.backbone = build_backbone(input_spec, backbone, **(backbone_options or {}))
        self._task_modules: dict[str, list[nn.Module]] = {n: [] for n in self.task_names}
        self._cutting = False
        self.last_rep = self.rep_leaf = None

    def make_heads(self, in_dim: int, hidden: Sequence[int]) -> None:
        self.heads = nn.ModuleDict({t.name: t.make_head(in_dim, hidden) for t in self.tasks})
        for name, head in self.heads.items():
            self.mark_task_specific(name, head)

    def mark_task_specific(self, task: str, *modules: nn.Module) -> None:
        self._task_modules[task].extend(modules)

    def task_parameters(self, task: str) -> list[nn.Parameter]:
        """Parameters that belong to ``task`` alone."""
        seen: dict[int, nn.Parameter] = {}
        for m in self._task_modules[task]:
            for p in m.parameters():
                seen[id(p)] = p
        return list(seen.values())

    def task_specific_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters that belong to one task (every task's :meth:`task_parameters`)."""
        seen = {id(p): p for t in self.task_names for p in self.task_parameters(t) if p.requires_grad}
        return list(seen.values())

    def shared_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters not owned by any single task (backbone, shared experts, ...)."""
        owned = {id(p) for t in self.task_names for p in self.task_parameters(t)}
        return [p for p in self.parameters() if id(p) not in owned and p.requires_grad]

    @contextmanager
    def representation_cut(self) -> Iterator[None]:
        """Forwards inside this block cut at the shared representation (see :meth:`boundary`)."""
        outer, self._cutting = self._cutting, True
        self.last_rep = self.rep_leaf = None
        try:
            yield
        finally:
            self._cutting = outer

    def boundary(self, rep: Tensor) -> Tensor:
        """Mark ``rep`` as the shared representation; inside the cut return a detached leaf.

        Inside :meth:`representation_cut`, task losses reach shared parameters only through
        ``self.last_rep.backward(grad)``, so a weighting can combine per-task gradients
        with respect to the representation before they enter the shared part.
        """
        if not self._cutting:
            return rep
        self.last_rep = rep
        self.rep_leaf = rep.detach().requires_grad_(True)
        return self.rep_leaf

    def cut(self, parts: Sequence[Tensor]) -> list[Tensor]:
        """Mark ``parts`` (everything the task-specific side reads) as the shared representation.

        Outside the cut this returns ``parts`` unchanged (no copy). Inside it they are
        flattened into one [B, R] tensor that goes through :meth:`boundary`, and the leaf is
        split back, so task losses reach every shared parameter only through ``last_rep``.
        """
        if not self._cutting:
            return list(parts)
        flat = self.boundary(torch.cat([p.flatten(1) for p in parts], 1))
        sizes = [p[0].numel() for p in parts]
        return [piece.reshape(p.shape) for piece, p in zip(flat.split(sizes, 1), parts)]

    def forward(self, x: Inputs) -> dict[str, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError
