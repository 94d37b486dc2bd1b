"""PCGrad (Yu, Kumar, Gupta, Levine, Hausman & Finn, NeurIPS 2020, "Gradient Surgery for
Multi-Task Learning"), Algorithm 1 / Eq. 1:

    for each task i, for each other task j in random order:
        if g_i^PC . g_j < 0:   g_i^PC <- g_i^PC - (g_i^PC . g_j) / ||g_j||^2 g_j
    update = sum_i g_i^PC

(g_j is always the original gradient of task j.) Each g_i^PC is a linear combination of
the original gradients, so we run the surgery on the [T, T] coefficient matrix with the
Gram matrix G G^T and form the update once as (sum_i c_i) @ G: the same result as
projecting D-dimensional vectors. In ``params`` mode the Gram matrix and the update come from
``GradContext.gramian``/``apply(shared_weights=...)`` without forming G (``_gramian.py``).

Gradient source: the paper projects the gradients of all shared parameters (``mode=
"params"``, default, exact); ``mode="rep"`` applies the surgery to the gradients w.r.t.
the shared representation (cheaper, as LibMTL's rep_grad option). Task-specific
parameters get the plain sum of the task losses' gradients. The random order comes from a
private generator seeded by ``seed``.

Checked against: median-research-group/LibMTL LibMTL/weighting/PCGrad.py (commit 4336804) and
the PyTorch port WeiChengTseng/Pytorch-PCGrad as copied into OptMN-Lab/fairgrad
methods/weight_methods.py (read). Same projection, same original g_j, same sum; LibMTL adds 1e-8
to ||g_j||^2 (we skip a zero g_j instead). tests/test_reference_libmtl.py runs LibMTL on fixed
gradients, records its ``random.shuffle`` orders and gets the same update from
``pcgrad_coefficients`` with those orders.
Deviations: both references shuffle all T tasks, i included; we visit the other tasks only (a
projection of g_i^PC against g_i itself happens there only if earlier projections turned it
against g_i). The random order comes from our seeded generator, not Python's ``random``. The
WeiChengTseng/fairgrad copies also clip the shared gradient to norm 1; LibMTL and we do not.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from polytask.registry import WEIGHTINGS
from polytask.weighting.base import GradContext, Weighting
from polytask.weighting._common import SeededRandom, check_mode, need_ctx


def pcgrad_coefficients(m: Tensor, orders: Sequence[Sequence[int]]) -> Tensor:
    """Rows c_i with g_i^PC = c_i @ G, given the Gram matrix ``m`` and each task's order of the others."""
    a = m.detach().cpu().double().numpy()   # numpy: T^2 tiny steps cost microseconds, not torch dispatches
    c = np.eye(a.shape[0])
    for i, order in enumerate(orders):
        for j in order:
            dot = c[i] @ a[:, j]
            if dot < 0 and a[j, j] > 0:
                c[i, j] -= dot / a[j, j]
    return torch.from_numpy(c).to(m.dtype)


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
        m = ctx.gramian(losses)
        t = self.num_tasks
        orders = [[j for j in self.permutation(t) if j != i] for i in range(t)]
        w = pcgrad_coefficients(m, orders).sum(0).to(losses)
        ctx.apply(losses, shared_weights=w)
        return w
