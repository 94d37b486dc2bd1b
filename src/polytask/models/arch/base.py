"""The Architecture base class: a backbone, shared blocks and task-specific parts."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from polytask.models.backbones import build_backbone
from polytask.tasks import Inputs, InputSpec, Task


class Architecture(nn.Module):
    """Wires shared and task-specific parts; ``forward(x) -> {task: output}``.

    Subclasses build their blocks on ``self.backbone`` (``self.backbone.out_dim``
    features), put one tower per task in ``self.heads`` (via :meth:`make_heads`),
    register every other task-specific module with :meth:`mark_task_specific`, and
    pass the tensor at the shared/task-specific boundary through :meth:`boundary`
    so gradient-balancing methods can work on the shared representation.
    """

    def __init__(self, tasks: Sequence[Task], input_spec: InputSpec, backbone: str = "auto",
                 backbone_options: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.tasks = list(tasks)
        self.task_names = [t.name for t in self.tasks]
        self.input_spec = input_spec
        self.backbone = build_backbone(input_spec, backbone, **(backbone_options or {}))
        self._task_modules: dict[str, list[nn.Module]] = {n: [] for n in self.task_names}
        self.rep_mode = False
        self.last_rep: Tensor | None = None
        self.rep_leaf: Tensor | None = None

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

    def shared_parameters(self) -> list[nn.Parameter]:
        """Parameters not owned by any single task (backbone, shared experts, ...)."""
        owned = {id(p) for t in self.task_names for p in self.task_parameters(t)}
        return [p for p in self.parameters() if id(p) not in owned and p.requires_grad]

    def boundary(self, rep: Tensor) -> Tensor:
        """Mark ``rep`` as the shared representation; in rep mode return a detached leaf.

        With ``rep_mode`` on, task losses reach shared parameters only through
        ``self.last_rep.backward(grad)``, so a weighting can combine per-task gradients
        with respect to the representation before they enter the shared part.
        """
        if not self.rep_mode:
            return rep
        self.last_rep = rep
        self.rep_leaf = rep.detach().requires_grad_(True)
        return self.rep_leaf

    def cut(self, parts: Sequence[Tensor]) -> list[Tensor]:
        """Mark ``parts`` (everything the task-specific side reads) as the shared representation.

        Outside rep mode this returns ``parts`` unchanged (no copy). In rep mode they are
        flattened into one [B, R] tensor that goes through :meth:`boundary`, and the leaf is
        split back, so task losses reach every shared parameter only through ``last_rep``.
        """
        if not self.rep_mode:
            return list(parts)
        flat = self.boundary(torch.cat([p.flatten(1) for p in parts], 1))
        sizes = [p[0].numel() for p in parts]
        return [piece.reshape(p.shape) for piece, p in zip(flat.split(sizes, 1), parts)]

    def forward(self, x: Inputs) -> dict[str, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

