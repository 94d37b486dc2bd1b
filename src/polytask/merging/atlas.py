"""aTLAS: Zhang et al., "Knowledge Composition using Task Vectors with Learned Anisotropic Scaling",
NeurIPS 2024.

θ = θ_0 + Σ_t Λ_t τ_t with Λ_t block-diagonal: one learned scalar λ_t^b per parameter block b
(here: per tensor of the state dict) and task vector t (Sec. 3, "anisotropic scaling"), i.e.
θ^b = θ_0^b + Σ_t λ_t^b τ_t^b. The coefficients start at 0 (θ = θ_0), as in the authors' code,
and are learned with AdamW (weight decay 0.1, the authors' default) from a few labelled shots,
batches ``(x, y)``, by cross-entropy summed over the target tasks, or from unlabeled batches ``x``
by the prediction entropy. Needs ``labeled``: ``data.batches[j]`` holds the batches of target
task j, evaluated with head ``j`` by ``data.forward``; the default lr 1e-2 and 100 steps are our
choices for small models.

Checked against: fredzzhang/atlas src/composition.py (``WeightedImageEncoder``, blockwise:
``coef`` zeros of shape (T, blocks), ``dparams = Σ_t p_t · c[t, i]`` per parameter block,
``new_params = dparams + params``), src/learn_task_addition.py (loss = Σ over datasets of
cross-entropy, AdamW with ``--wd`` 0.1, optional ``lp_reg`` off by default) and
src/learn_few_shots.py (cross-entropy on the shots). They match; tests/test_reference_fixtures.py
checks the composition against fixtures from composition.py. Fixed here: the optimiser was Adam
without weight decay; it is now AdamW with the authors' weight decay 0.1 (``weight_decay``).
Deviations: a fixed number of steps at a constant lr (the authors run epochs with a cosine
schedule, lr 1e-3 for task addition and 1e-1 for few-shot, and keep the coefficients of the
best validation epoch: polytask's merge gets no validation split); for unlabeled data we use the
entropy, where the authors' test-time variant (src/learn_ufm.py) uses a FixMatch-style loss on
augmented views, which needs augmentations a generic merger does not have; the authors' optional
random partitions of each block (``--partition``) are not offered; float buffers (BatchNorm
statistics) get a coefficient like parameters (the authors' encoders keep buffers at θ_0).
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

    def __init__(self, *, init: float = 0.0, steps: int = 100, lr: float = 1e-2, weight_decay: float = 0.1,
                 seed: int = 0) -> None:
        super().__init__(init=init, steps=steps, lr=lr, seed=seed, weight_decay=weight_decay)

    def merge(self, base: ModelSource, finetuned: Sequence[ModelSource], data: MergeData | None = None) -> dict[str, Tensor]:
        model, data_batches = model_and_batches("atlas", data,
                                                "few-shot batches (x, y) or unlabeled x, one list per target task")
        stack = TaskVectorStack(base, finetuned, model)
        batches = as_batch_lists(data_batches)
        return self.fit(stack, model, batches, _few_shot_loss, blocks=len(stack.keys), forward=data.forward)
