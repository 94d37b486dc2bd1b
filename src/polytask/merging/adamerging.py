"""AdaMerging: Yang et al., "AdaMerging: Adaptive Model Merging for Multi-Task Learning", ICLR 2024.

Task-wise:  θ_m = θ_0 + Σ_t λ_t τ_t.       Layer-wise: θ_m^l = θ_0^l + Σ_t λ_t^l τ_t^l  (Sec. 3.2)
The coefficients minimise the Shannon entropy of the merged model's predictions on unlabeled
test inputs of every task, min_λ Σ_t Σ_{x∈B_t} H(f(θ_m, x)) (Sec. 3.3, entropy as a surrogate of
the loss); each task's term is the mean entropy over its batch. As in the authors' code: λ
initialised at 0.3, Adam (no weight decay) with lr 1e-3, 500 steps, and λ clamped to [0, 1]
inside the forward pass while the raw parameter is unconstrained; a "layer" is one tensor.

Needs ``unlabeled``: ``data.batches[t]`` holds unlabeled input batches of task t, evaluated with
head ``t`` by ``data.forward``.

Checked against: EnnengYang/AdaMerging src/main_layer_wise_adamerging.py and
src/main_task_wise_adamerging.py (``AdaMerging.lambdas``: prior 0.3, ``clamp(lambdas_raw, 0, 1)``
in the forward, pretrained coefficient fixed at 1; the merge Σ_j p_j λ_j per parameter tensor;
``softmax_entropy(outputs).mean(0)`` summed over tasks; ``torch.optim.Adam(lr=1e-3,
weight_decay=0)``, 500 steps). Fixed here: polytask used to clamp the parameter in place after
each step (a projection) instead of clamping in the forward; it now follows the reference
(tests/test_reference_fixtures.py: fixtures from the authors' loop, and a case the two differ on).
Deviations: each step uses the next of the batches the caller passed for each task (the
reference draws two fresh shuffled batches of 16 per task per step, sums their entropies);
the number of batches and the suite defaults (fewer steps, larger lr) are the caller's and the
benchmark's, sized for small models; float buffers (e.g. BatchNorm statistics) get a coefficient
like any other tensor (the authors' CLIP ViTs have none; their merge covers parameters only).
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
