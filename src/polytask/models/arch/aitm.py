"""Adaptive Information Transfer Multi-task framework (Xi et al., KDD 2021, "Modeling the
Sequential Dependence among Audience Multi-step Conversions with Multi-task Learning in
Targeted Display Advertising").

For a conversion chain t = 1..T on a shared embedding, each task has a tower q_t = tower_t(h);
the Adaptive Information Transfer (AIT) module mixes what the previous step transfers with it:

    p_{t-1} = g_{t-1}(z_{t-1})                       (transfer: Dense + ReLU; z_1 = q_1)
    z_t = Σ_{u ∈ {p_{t-1}, q_t}} w_u h_3(u),   w_u = softmax_u(<h_1(u), h_2(u)> / √k),
    ŷ_t = σ(f_t(z_t)),

h_1, h_2, h_3 linear maps of R^k. The loss is the entire-space cross-entropy of every step plus
the behavioural expectation calibrator

    L = L_ce + α L_lc,   L_lc = 1/N Σ_i Σ_{t>=2} max(ŷ_t(x_i) - ŷ_{t-1}(x_i), 0),

which pushes each step's probability below the previous one (a conversion needs a click).

Checked against the authors' TensorFlow code (github.com/xidongbo/AITM, AITM.py): the transfer
g is a 32-unit Dense + ReLU on the previous tower's output; the attention stacks the two
vectors and uses three bias-free k x k maps with a softmax over the two slots; the output is a
Dense(1) on z_t; the previous tower is *not* stop-gradient'ed (a step's loss reaches the earlier
towers); the calibrator is the batch mean of max(ŷ_t - ŷ_{t-1}, 0) with weight ``--weight``
default 0.6 (our ``alpha``); both cross-entropies run on every impression. Omitted: their
dropout (keep 0.9/0.7/0.7) and L2 on embeddings.

In polytask: ``chain`` names the steps (default click -> conversion); step t's output is the
logit of ŷ_t (for conversion: pCTCVR over all impressions) and :meth:`loss_batch` labels it
y_1 & ... & y_t on every impression (see ``_chain``); the calibrator term is ``aux_loss`` in train
mode. g_{t-1} and the AIT maps feeding step t belong to task t. Tasks outside the chain get
plain towers. The shared part is the backbone plus an optional shared ``bottom`` MLP (default
[64]; ``bottom=[]`` shares the embedding only, as in the paper).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from polytask.errors import PolytaskError
from polytask.models.arch._chain import ChainedTasks, resolve_chain
from polytask.models.arch.base import Architecture
from polytask.models.backbones import Backbone, mlp
from polytask.registry import ARCHITECTURES
from polytask.tasks import Inputs, InputSpec, Task


def calibrator_penalty(probs: Sequence[Tensor]) -> Tensor:
    """L_lc = mean over samples of Σ_{t>=2} max(p_t - p_{t-1}, 0) for chain probabilities [B] or [B, 1]."""
    p = torch.stack([q.reshape(-1) for q in probs])  # [T, B]
    return (p[1:] - p[:-1]).clamp(min=0).sum(0).mean()


class InfoTransfer(nn.Module):
    """AIT: attention over the transferred p_{t-1} and the current tower q_t (two slots)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.h1, self.h2, self.h3 = (nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.last_weights: Tensor | None = None

    def forward(self, transferred: Tensor, own: Tensor) -> Tensor:
        u = torch.stack([transferred, own], 1)  # [B, 2, k]
        w = ((self.h1(u) * self.h2(u)).sum(-1) / math.sqrt(u.shape[-1])).softmax(1)  # [B, 2]
        self.last_weights = w.detach()
        return (w.unsqueeze(-1) * self.h3(u)).sum(1)


@ARCHITECTURES.register("aitm")
class AITM(ChainedTasks, Architecture):
    """AITM: attention-based information transfer along a conversion chain, plus a calibrator (Xi et al. 2021)."""

    def __init__(self, tasks: Sequence[Task], input_spec: InputSpec, *, backbone: Backbone = "auto",
                 backbone_options: dict[str, Any] | None = None, bottom: Sequence[int] = (64,),
                 tower: Sequence[int] = (64, 32),
                 chain: Sequence[str] | None = None, alpha: float = 0.6) -> None:
        super().__init__(tasks, input_spec, backbone, backbone_options)
        if not tower:
            raise PolytaskError("aitm needs at least one tower layer; pass tower=[64,32]")
        if alpha < 0:
            raise PolytaskError(f"aitm alpha (the calibrator weight) must be non-negative, got {alpha}")
        self.chain = resolve_chain(self.tasks, chain, "aitm")
        self.alpha = alpha
        self.bottom = mlp(self.backbone.out_dim, bottom)
        d_in, k = bottom[-1] if bottom else self.backbone.out_dim, tower[-1]
        self.towers = nn.ModuleDict({n: mlp(d_in, tower) for n in self.chain})
        self.transfer = nn.ModuleDict({n: mlp(k, [k]) for n in self.chain[1:]})
        self.ait = nn.ModuleDict({n: InfoTransfer(k) for n in self.chain[1:]})
        heads: dict[str, nn.Module] = {}
        for t in self.tasks:
            heads[t.name] = nn.Linear(k, 1) if t.name in self.chain else t.make_head(d_in, tower)
        self.heads = nn.ModuleDict(heads)
        for name in self.task_names:
            self.mark_task_specific(name, self.heads[name])
            if name in self.chain:
                self.mark_task_specific(name, self.towers[name])
            if name in self.ait:
                self.mark_task_specific(name, self.transfer[name], self.ait[name])

    def forward(self, x: Inputs) -> dict[str, Tensor]:
        h = self.boundary(self.bottom(self.backbone(x)))
        out = {t: self.heads[t](h) for t in self.task_names if t not in self.chain}
        z: Tensor | None = None
        for name in self.chain:
            q = self.towers[name](h)
            z = q if z is None else self.ait[name](self.transfer[name](z), q)
            out[name] = self.heads[name](z)
        if self.training and self.chain and self.alpha > 0:
            self.aux_loss = self.alpha * calibrator_penalty([out[n].sigmoid() for n in self.chain])
        return {t: out[t] for t in self.task_names}
