"""AdaMerging: Yang et al., "AdaMerging: Adaptive Model Merging for Multi-Task Learning", ICLR 2024.

Task-wise:  θ_m = θ_0 + Σ_t λ_t τ_t.       Layer-wise: θ_m^l = θ_0^l + Σ_t λ_t^l τ_t^l  (Sec. 3.2)
The coefficients minimise the Shannon entropy of the merged model's predictions on unlabeled
test inputs of every task, min_λ Σ_t Σ_{x∈B_t} H(f(θ_m, x)) (Sec. 3.3, entropy as a surrogate of
the loss). As in the paper: λ initialised at 0.3, Adam with lr 1e-3, 500 steps; a "layer" here is
one tensor of the state dict. Coefficients are clamped to [0, 1] after each step (our choice,
keeping them in the range the paper reports).

Needs ``unlabeled``: ``data.batches[t]`` holds unlabeled input batches of task t, evaluated with
head ``t`` by ``data.forward``.
"""

from __future__ import annotations

from typing import Sequence

from torch import Tensor

from polytask.errors import PolytaskError
from polytask.merging._learned import CoefficientMerger, TaskVectorStack, as_batch_lists, entropy, model_and_batches
from polytask.merging.base import MergeData
from polytask.merging.taskvector import ModelSource
from polytask.registry import MERGERS


@MERGERS.register("adamerging")
class AdaMerging(CoefficientMerger):
    """AdaMerging (Yang et al., ICLR 2024): task- or layer-wise coefficients learned by test-time entropy minimisation."""

    needs = frozenset({"unlabeled"})
    suite_defaults = {"vision": {"steps": 150, "lr": 3e-3}, "text": {"steps": 30, "lr": 1e-2}}
    data_sizes = {"small": (None, 32), "vision": (None, 16), "text": (4, 8)}

    def __init__(self, *, granularity: str = "layer", init: float = 0.3, steps: int = 500, lr: float = 1e-3,
                 seed: int = 0) -> None:
        if granularity not in ("task", "layer"):
            raise PolytaskError(f"granularity {granularity!r} is not task or layer; pass granularity=layer or granularity=task")
        super().__init__(init=init, steps=steps, lr=lr, seed=seed)
        self.granularity = granularity

    def merge(self, base: ModelSource, finetuned: Sequence[ModelSource], data: MergeData | None = None) -> dict[str, Tensor]:
        model, data_batches = model_and_batches("adamerging", data, "unlabeled input batches, one list per task")
        stack = TaskVectorStack(base, finetuned, model)
        batches = as_batch_lists(data_batches, stack.n_tasks)
        blocks = 1 if self.granularity == "task" else len(stack.keys)
        return self.fit(stack, model, batches, lambda logits, _batch: entropy(logits), blocks=blocks,
                        forward=data.forward, bounds=(0.0, 1.0))
