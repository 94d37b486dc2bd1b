"""AdaMerging: Yang et al., "AdaMerging: Adaptive Model Merging for Multi-Task Learning", ICLR 2024.

Task-wise:  θ_m = θ_0 + Σ_t λ_t τ_t.       Layer-wise: θ_m^l = θ_0^l + Σ_t λ_t^l τ_t^l  (Sec. 3.2)
The coefficients minimise the Shannon entropy of the merged model's predictions on unlabeled
test inputs of every task, min_λ Σ_t Σ_{x∈B_t} H(f(θ_m, x)) (Sec. 3.3, entropy as a surrogate of
the loss). As in the paper: λ initialised at 0.3, Adam with lr 1e-3, 500 steps; a "layer" here is
one tensor of the state dict. Coefficients are clamped to [0, 1] after each step (our choice,
keeping them in the range the paper reports).
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

from torch import Tensor, nn

from polytask.errors import PolytaskError
from polytask.merging._learned import CoefficientMerger, Forward, TaskVectorStack, as_batch_lists, entropy
from polytask.merging.taskvector import ModelSource
from polytask.registry import MERGERS


@MERGERS.register("adamerging")
class AdaMerging(CoefficientMerger):
    """AdaMerging (Yang et al., ICLR 2024): task- or layer-wise coefficients learned by test-time entropy minimisation."""

    def __init__(self, *, granularity: str = "layer", init: float = 0.3, steps: int = 500, lr: float = 1e-3,
                 seed: int = 0) -> None:
        if granularity not in ("task", "layer"):
            raise PolytaskError(f"granularity {granularity!r} is not task or layer; pass granularity=layer or granularity=task")
        super().__init__(init=init, steps=steps, lr=lr, seed=seed)
        self.granularity = granularity

    def merge(self, base: ModelSource, finetuned: Sequence[ModelSource], *, model: nn.Module | None = None,
              data: Sequence[Iterable[Any]] | None = None, forward: Forward | None = None) -> dict[str, Tensor]:
        """``data[t]``: unlabeled input batches of task t (evaluated with head ``t`` by ``forward``)."""
        if model is None or data is None:
            raise PolytaskError("adamerging needs model= (the network the checkpoints belong to) and data= "
                                "(unlabeled input batches, one list per task)")
        stack = TaskVectorStack(base, finetuned, model)
        batches = as_batch_lists(data, stack.n_tasks)
        blocks = 1 if self.granularity == "task" else len(stack.keys)
        return self.fit(stack, model, batches, lambda logits, _batch: entropy(logits), blocks=blocks,
                        forward=forward, bounds=(0.0, 1.0))
