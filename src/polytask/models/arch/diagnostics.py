"""What the gates and experts of an expert architecture did in its last forward."""

from __future__ import annotations

from typing import Any

from torch import Tensor


class ExpertDiagnostics:
    """Mixin for expert architectures (list it before :class:`Architecture`).

    - ``last_gates``: task -> the detached [B, K] gate weights of the last forward, over the K
      experts that task's gate can weigh;
    - ``last_expert_activations``: expert name -> its detached [B, d] output before aggregation;
    - :meth:`expert_groups`: ``"shared"`` and each task name -> indices of those experts in the
      task gates (empty everywhere when a configuration has no experts, and then so are the
      two dicts).
    """

    last_gates: dict[str, Tensor]
    last_expert_activations: dict[str, Tensor]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.last_gates = {}
        self.last_expert_activations = {}

    def expert_groups(self) -> dict[str, list[int]]:  # pragma: no cover - abstract
        raise NotImplementedError
