"""Cross-stitch networks (Misra, Shrivastava, Gupta, Hebert, CVPR 2016, "Cross-stitch Networks
for Multi-task Learning").

One column (an MLP) per task on the backbone output; after every column layer l a learned
T×T cross-stitch unit mixes the columns' activations (Eq. 1, generalised from two tasks to T):

    x̃^l_i = sum_j alpha^l_ij x^l_j

alpha^l starts at ``alpha_self`` on the diagonal and (1 - alpha_self)/(T - 1) off it (the
paper's (alpha_S, alpha_D) = (0.9, 0.1) for two tasks); with one task it starts at 1.
Choices: one scalar per task pair and layer (shared across units, as in Eq. 1); no unit
after the heads (the paper stitches up to fc7, not the task outputs); the paper's larger
learning rate for alpha is not applied (one optimiser learning rate for all parameters).

Checked against: median-research-group/LibMTL LibMTL/architecture/Cross_stitch.py (commit
4336804): one scalar per (level, task i, task j), x~_i = sum_j alpha_ij x_j between the stages of
per-task ResNet columns. Same unit. No code by the paper's authors was found.
Deviations: LibMTL initialises every alpha to 1 (the columns start as sums of each other); we use
the paper's (alpha_S, alpha_D) initialisation above. Its columns are ResNet stages stitched after
the first three; ours are MLP layers, stitched after each of them (heads excluded).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from polytask.errors import PolytaskError
from polytask.models.arch.base import Architecture
from polytask.models.arch.diagnostics import ExpertDiagnostics
from polytask.models.backbones import Backbone, mlp
from polytask.registry import ARCHITECTURES
from polytask.tasks import Inputs, InputSpec, Task


def stitch_init(num_tasks: int, alpha_self: float) -> Tensor:
    """The initial T×T cross-stitch matrix: alpha_self on the diagonal, the rest spread evenly."""
    if num_tasks == 1:
        return torch.ones(1, 1)
    off = (1.0 - alpha_self) / (num_tasks - 1)
    return torch.full((num_tasks, num_tasks), off) + torch.eye(num_tasks) * (alpha_self - off)


@ARCHITECTURES.register("cross-stitch")
class CrossStitch(ExpertDiagnostics, Architecture):
    """Cross-stitch networks: one column per task, learned linear mixing of the columns after every layer (Misra et al. 2016).

    Shared: the backbone and the cross-stitch units (alpha). Task-specific: each task's column
    and head. Columns still receive other tasks' gradients through alpha (that is how the
    units share information); only the heads are reached by their own task alone. Rep mode
    marks the stacked output of the last cross-stitch unit [B, T, d] as the shared
    representation: the stitching continues through every layer, so only the heads lie
    past a cut that has all shared parameters (backbone, alpha) before it. Task t's head
    reads slot t alone, so per-task gradients w.r.t. this representation are orthogonal.

    Diagnostics: ``last_expert_activations`` holds each column's activations per layer
    (``"<task>/<layer>"``, before stitching); ``last_gates[task]`` is the task's row of the
    last unit (weights on every column, [B, T]); ``expert_groups()`` gives each task its own
    column index (``"shared"`` is empty: there are no shared experts).
    """

    def __init__(self, tasks: Sequence[Task], input_spec: InputSpec, *, backbone: Backbone = "auto",
                 backbone_options: dict[str, Any] | None = None, column: Sequence[int] = (32, 16),
                 tower: Sequence[int] = (), alpha_self: float = 0.9) -> None:
        super().__init__(tasks, input_spec, backbone, backbone_options)
        if not column:
            raise PolytaskError("cross-stitch needs at least one column layer; pass column=[32, 16]")
        if not 0.0 <= alpha_self <= 1.0:
            raise PolytaskError(f"cross-stitch alpha_self must be in [0, 1], not {alpha_self}; the paper uses 0.9")
        dims = [self.backbone.out_dim, *column]
        self.columns = nn.ModuleDict({
            t: nn.ModuleList(mlp(dims[l], [dims[l + 1]]) for l in range(len(column))) for t in self.task_names})
        for t, col in self.columns.items():
            self.mark_task_specific(t, col)
        n = len(self.task_names)
        self.alphas = nn.ParameterList(nn.Parameter(stitch_init(n, alpha_self)) for _ in column)
        self.make_heads(column[-1], tower)

    def expert_groups(self) -> dict[str, list[int]]:
        """Index of each task's own column in its row of the cross-stitch unit."""
        return {"shared": [], **{t: [i] for i, t in enumerate(self.task_names)}}

    def forward(self, x: Inputs) -> dict[str, Tensor]:
        h = self.backbone(x)
        cols = [h] * len(self.task_names)
        acts: dict[str, Tensor] = {}
        for l, alpha in enumerate(self.alphas):
            act = torch.stack([self.columns[t][l](c) for t, c in zip(self.task_names, cols)], 1)  # [B, T, d]
            for i, t in enumerate(self.task_names):
                acts[f"{t}/{l}"] = act[:, i].detach()
            stitched = torch.einsum("ij,bjd->bid", alpha, act)
            if l == len(self.alphas) - 1:
                stitched = self.boundary(stitched)
            cols = list(stitched.unbind(1))
        last = self.alphas[-1].detach()
        self.last_gates = {t: last[i].expand(h.shape[0], -1) for i, t in enumerate(self.task_names)}
        self.last_expert_activations = acts
        return {t: self.heads[t](c) for t, c in zip(self.task_names, cols)}
