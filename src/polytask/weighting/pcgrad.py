"""PCGrad (Yu, Kumar, Gupta, Levine, Hausman & Finn, NeurIPS 2020, "Gradient Surgery for
Multi-Task Learning"), Algorithm 1 / Eq. 1:

    for each task i, for each other task j in random order:
        if g_i^PC . g_j < 0:   g_i^PC <- g_i^PC - (g_i^PC . g_j) / ||g_j||^2 g_j
    update = sum_i g_i^PC

(g_j is always the original gradient of task j.) Each g_i^PC is a linear combination of
the original gradients, so we run the surgery on the [T, T] coefficient matrix with the
Gram matrix G G^T and form the update once as (sum_i c_i) @ G: the same result as
projecting D-dimensional vectors, with O(T^2 D) work for the Gram matrix only.

Gradient source: the paper projects the gradients of all shared parameters (``mode=
"params"``, default, exact); ``mode="rep"`` applies the surgery to the gradients w.r.t.
the shared representation (cheaper, as LibMTL's rep_grad option). Task-specific
parameters get the plain sum of the task losses' gradients. The random order comes from a
private generator seeded by ``seed``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from polytask.registry import WEIGHTINGS
from polytask.weighting.base import GradContext, Weighting
from polytask.weighting._common import SeededRandom, check_mode, gram, need_ctx


def pcgrad_coefficients(m: Tensor, orders: Sequence[Sequence[int]]) -> Tensor:
    """Rows c_i with g_i^PC = c_i @ G, given the Gram matrix ``m`` and each task's order of the others."""
    c = torch.eye(m.shape[0], dtype=m.dtype)
    for i, order in enumerate(orders):
        for j in order:
            dot = c[i] @ m[:, j]
            if dot < 0 and m[j, j] > 0:
                c[i, j] -= dot / m[j, j]
    return c


@WEIGHTINGS.register("pcgrad")
class PCGrad(SeededRandom, Weighting):
    """PCGrad: project each task gradient onto the normal plane of those it conflicts with (Yu et al. 2020)."""

    grad_source = "params"

    def __init__(self, task_names: Sequence[str], *, mode: str = "params", seed: int = 0) -> None:
        super().__init__(task_names)
        self.mode = check_mode("pcgrad", mode)  # type: ignore[assignment]
        self._seed(seed)

    def backward(self, losses: Tensor, ctx: GradContext | None = None) -> Tensor:
        ctx = need_ctx("pcgrad", ctx)
        grads = ctx.task_grads(losses)
        t = self.num_tasks
        orders = [[j for j in self.permutation(t) if j != i] for i in range(t)]
        w = pcgrad_coefficients(gram(grads), orders).sum(0).to(grads)
        ctx.apply(losses, None, w @ grads)
        return w
