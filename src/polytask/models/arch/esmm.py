"""Entire Space Multi-task Model (Ma et al., SIGIR 2018, "Entire Space Multi-Task Model: An
Effective Approach for Estimating Post-Click Conversion Rate").

Eq. 1-3: with click y and conversion z after an impression x,

    p(y=1, z=1 | x) = p(y=1 | x) · p(z=1 | y=1, x),        pCTCVR = pCTR · pCVR,
    L(θ_ctr, θ_cvr) = Σ_i l(y_i, f(x_i; θ_ctr)) + Σ_i l(y_i & z_i, f(x_i; θ_ctr) · f(x_i; θ_cvr)),

both sums over *all* impressions; pCVR is an intermediate variable with no loss of its own,
which removes the sample-selection bias of a CVR model trained on clicks only. The CTR and CVR
networks share the embedding and have their own towers.

In polytask: ``chain`` names the steps (default click -> conversion where the suite has both);
step k's output is the logit of Π_{j<=k} pCVR_j (the first step's: pCTR; the conversion task's:
pCTCVR), and :meth:`loss_batch` labels it y_1 & ... & y_k on every impression (see ``_chain``),
so the Trainer's ordinary per-task loss is Eq. 3. Each tower's own conditional probability
(pCTR, pCVR) is :meth:`conditional_probabilities`. Tasks outside the chain get plain towers.
The shared part is the backbone (the recsys embeddings) plus an optional shared ``bottom`` MLP
(default [64], so raw dense inputs also have a shared part; ``bottom=[]`` shares the embedding
only, as in the paper).

Checked against: the authors' alibaba/x-deeplearning xdl-algorithm-solution/ESMM/script/esmm.py
(shared embeddings concatenated; CTR and CVR towers 200-80-2 with PReLU; pCTCVR = pCTR x pCVR;
loss = cross-entropy(pCTR, click) + cross-entropy(pCTCVR, buy) averaged over a batch of all
impressions, with no loss on pCVR). Same model and loss.
Deviations: each tower ends in one logit with a sigmoid instead of a two-way softmax (the same
family of probabilities); towers default to [64, 32] with ReLU, not 200-80 with PReLU; an optional
shared ``bottom`` MLP (``bottom=[]`` gives the authors' embedding-only sharing); the chain
generalises the two steps to any number.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from polytask.models.arch._chain import ChainedTasks, product_logit, resolve_chain
from polytask.models.arch.base import Architecture
from polytask.models.backbones import Backbone, mlp
from polytask.registry import ARCHITECTURES
from polytask.tasks import Inputs, InputSpec, Task


def esmm_probability(step_logits: Sequence[Tensor]) -> Tensor:
    """pCTCVR = Π_k σ(a_k): the chain's end-to-end probability from each tower's logit."""
    return torch.stack([a.sigmoid() for a in step_logits]).prod(0)


@ARCHITECTURES.register("esmm")
class ESMM(ChainedTasks, Architecture):
    """Entire Space Multi-task Model: pCTCVR = pCTR · pCVR, trained on all impressions (Ma et al. 2018)."""

    def __init__(self, tasks: Sequence[Task], input_spec: InputSpec, *, backbone: Backbone = "auto",
                 backbone_options: dict[str, Any] | None = None, bottom: Sequence[int] = (64,),
                 tower: Sequence[int] = (64, 32),
                 chain: Sequence[str] | None = None) -> None:
        super().__init__(tasks, input_spec, backbone, backbone_options)
        self.chain = resolve_chain(self.tasks, chain, "esmm")
        self.bottom = mlp(self.backbone.out_dim, bottom)
        self.make_heads(bottom[-1] if bottom else self.backbone.out_dim, tower)

    def _tower_logits(self, x: Inputs) -> dict[str, Tensor]:
        h = self.boundary(self.bottom(self.backbone(x)))
        return {t: head(h) for t, head in self.heads.items()}

    def forward(self, x: Inputs) -> dict[str, Tensor]:
        own = self._tower_logits(x)
        out = dict(own)
        for k, name in enumerate(self.chain[1:], 2):
            out[name] = product_logit([own[n] for n in self.chain[:k]])
        return out

    @torch.no_grad()
    def conditional_probabilities(self, x: Inputs) -> dict[str, Tensor]:
        """Each chain step's own tower probability: pCTR for the first step, pCVR (given the previous step) after."""
        own = self._tower_logits(x)
        return {n: own[n].sigmoid() for n in self.chain}
