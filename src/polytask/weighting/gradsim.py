"""Gradient-similarity auxiliary weighting (Du, Czarnecki, Jayakumar, Farajtabar, Pascanu &
Lakshminarayanan, 2018, "Adapting Auxiliary Losses Using Gradient Similarity").

One ``main`` task and auxiliary tasks k; an auxiliary gradient helps the shared part only while
it points the same way as the main task's:

    weighted:    g = g_main + λ Σ_k max(0, cos(g_main, g_k)) g_k
    unweighted:  g = g_main + λ Σ_k 1[cos(g_main, g_k) >= 0] g_k

on the shared parameters (``mode="params"``) or the shared representation (``mode="rep"``).
Task-specific parameters (each auxiliary task's own head) get the plain gradient of their own
loss. The returned weights are [1 for main, λ·gate_k for the others].

Checked against: the paper's abstract and summaries of its update rules (arXiv 1812.02224: "a
soft scaling and a binary toggle"); no authors' code was found. Per auxiliary task the gate is
taken separately (the paper states one main and one auxiliary loss). Model selection on the
main task alone is ``TrainConfig(monitor="<main>/<metric>")``.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from polytask.errors import PolytaskError
from polytask.registry import WEIGHTINGS
from polytask.weighting.base import GradContext, Weighting
from polytask.weighting._common import check_choice, check_mode, need_ctx


def similarity_gates(grads: Tensor, main: int, variant: str = "weighted") -> Tensor:
    """[T] gates: 1 for ``main``; max(0, cos) (weighted) or 1[cos >= 0] (unweighted) for the others."""
    cos = F.cosine_similarity(grads, grads[main][None], dim=1)
    gates = cos.clamp(min=0) if variant == "weighted" else (cos >= 0).to(grads.dtype)
    gates[main] = 1.0
    return gates


@WEIGHTINGS.register("gradsim")
class GradientSimilarity(Weighting):
    """Auxiliary tasks gated by their gradient's cosine with the main task's (Du et al. 2018)."""

    grad_source = "params"

    def __init__(self, task_names: Sequence[str], *, main: str | None = None, variant: str = "weighted",
                 aux_weight: float = 1.0, mode: str = "params") -> None:
        super().__init__(task_names)
        self.mode = check_mode("gradsim", mode)  # type: ignore[assignment]
        self.variant = check_choice("gradsim", "variant", variant, ("weighted", "unweighted"))
        name = main if main is not None else self.task_names[0]
        if name not in self.task_names:
            raise PolytaskError(f"gradsim main task {name!r} is not a task of this run; pass main= one of: "
                                f"{', '.join(self.task_names)}")
        if aux_weight < 0:
            raise PolytaskError(f"gradsim aux_weight must be non-negative, got {aux_weight}")
        self.main = self.task_names.index(name)
        self.aux_weight = float(aux_weight)

    def backward(self, losses: Tensor, ctx: GradContext | None = None) -> Tensor:
        ctx = need_ctx("gradsim", ctx)
        grads = ctx.task_grads(losses)
        w = self.aux_weight * similarity_gates(grads, self.main, self.variant)
        w[self.main] = 1.0
        ctx.apply(losses, None, w @ grads)
        return w.detach()
