"""Task arithmetic: Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023.

Adding task vectors (Sec. 2 and Sec. 4): θ = θ_0 + λ Σ_t τ_t with τ_t = θ_t − θ_0.
The paper picks λ on held-out validation data from {0, 0.05, ..., 1}; for adding several
tasks the chosen values sit around 0.3–0.4, and 0.3 is the value follow-up work (TIES,
AdaMerging) uses as the task-arithmetic default, so ``lam`` defaults to 0.3. Negating a task
vector (λ < 0) forgets a task. Per-model ``weights`` w_t give θ = θ_0 + λ Σ_t w_t τ_t (mergekit's
``weight``), divided by Σ_t w_t with ``normalize=True``.

Checked against: the authors' mlfoundations/task_vectors src/task_vectors.py (``TaskVector``:
tau = theta_ft - theta_pre for every tensor but int64/uint8 ones, ``__add__`` sums them,
``apply_to`` gives theta_pre + scaling_coef * tau) and arcee-ai/mergekit's ``task_arithmetic``
(merge_methods/generalized_task_arithmetic.py without sparsification or sign consensus:
theta_0 + sum_t w_t tau_t, ``normalize`` off by default). Same formula;
tests/test_reference_merging.py compares a weighted merge with mergekit's
(tests/fixtures/make_mergekit_fixtures.py).
Deviations: none. (The authors' ``apply_to`` drops keys absent from the task vector, so their
integer tensors keep the pretrained values, as here, where non-float tensors are copied from the
base.)
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from polytask.merging._sparse import SparseTaskArithmetic, per_model
from polytask.registry import MERGERS


@MERGERS.register("task-arithmetic")
class TaskArithmetic(SparseTaskArithmetic):
    """Task arithmetic (Ilharco et al., ICLR 2023): θ = θ0 + λ Σ τ_t."""

    def __init__(self, *, lam: float = 0.3, weights: Sequence[float] | None = None, normalize: bool = False) -> None:
        super().__init__(lam, weights=weights, normalize=normalize)

    def merge_models(self, name: str, base: Tensor, models: list[Tensor]) -> Tensor:
        """θ_0 + λ Σ_t w_t (θ_t − θ_0), summed in place (add θ_t, subtract θ_0): two in-place passes per model,
        no work buffer, the cheapest order on the CPU (an out-of-place difference costs about twice an
        in-place update). Streamed and in-memory inputs take this same path, so they agree bit for bit."""
        weights = None if self.weights is None else per_model("weights", self.weights, len(models))
        combined = torch.sub(models[0], base)
        if weights is not None:
            combined.mul_(weights[0])
        for t, m in enumerate(models[1:], 1):
            if weights is None:
                combined.add_(m).sub_(base)
            else:
                combined.add_(m, alpha=weights[t]).sub_(base, alpha=weights[t])
        divisor = sum(weights) if weights is not None else float(len(models))
        if self.normalize and abs(divisor) >= 1e-8:
            combined.div_(divisor)
        return combined.mul_(self.lam).add_(base)
