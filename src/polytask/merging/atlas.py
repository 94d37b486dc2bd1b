"""aTLAS: Zhang et al., "Knowledge Composition using Task Vectors with Learned Anisotropic Scaling",
NeurIPS 2024.

θ = θ_0 + Σ_t Λ_t τ_t with Λ_t block-diagonal: one learned scalar λ_t^b per parameter block b
(here: per tensor of the state dict) and task vector t (Sec. 3, "anisotropic scaling").
The coefficients start at 0 (θ = θ_0), as in the authors' code, and are learned with Adam from
a few labelled shots, batches ``(x, y)``, by cross-entropy, or from unlabeled batches ``x`` by
the prediction entropy (the paper's test-time-adaptation setting uses unsupervised objectives;
we use entropy). Needs ``labeled``: ``data.batches[j]`` holds the batches of target task j,
evaluated with head ``j`` by ``data.forward``; the default lr 1e-2 and 100 steps are our choices
for small models.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch.nn.functional as F
from torch import Tensor

from polytask.merging._learned import CoefficientMerger, TaskVectorStack, as_batch_lists, entropy, model_and_batches
from polytask.merging.base import MergeData
from polytask.merging.taskvector import ModelSource
from polytask.registry import MERGERS


def _few_shot_loss(logits: Tensor, batch: Any) -> Tensor:
    if isinstance(batch, (tuple, list)) and len(batch) > 1:
        return F.cross_entropy(logits, batch[1])
    return entropy(logits)


@MERGERS.register("atlas")
class Atlas(CoefficientMerger):
    """aTLAS (Zhang et al., NeurIPS 2024): one learned coefficient per parameter block per task vector."""

    needs = frozenset({"labeled"})
    suite_defaults = {"vision": {"steps": 60}, "text": {"steps": 20, "lr": 3e-2}}
    data_sizes = {"small": (4, 16), "vision": (4, 16), "text": (4, 8)}

    def __init__(self, *, init: float = 0.0, steps: int = 100, lr: float = 1e-2, seed: int = 0) -> None:
        super().__init__(init=init, steps=steps, lr=lr, seed=seed)

    def merge(self, base: ModelSource, finetuned: Sequence[ModelSource], data: MergeData | None = None) -> dict[str, Tensor]:
        model, data_batches = model_and_batches("atlas", data,
                                                "few-shot batches (x, y) or unlabeled x, one list per target task")
        stack = TaskVectorStack(base, finetuned, model)
        batches = as_batch_lists(data_batches)
        return self.fit(stack, model, batches, _few_shot_loss, blocks=len(stack.keys), forward=data.forward)
