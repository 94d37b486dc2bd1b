"""Multi-gate Mixture-of-Experts (Ma et al., KDD 2018, "Modeling Task Relationships in
Multi-task Learning with Multi-gate Mixture-of-Experts").

Eq. 5-6:  f^k(x) = sum_i g^k(x)_i f_i(x),   g^k(x) = softmax(W_gk x),   y_k = h^k(f^k(x)).
With ``num_gates=1`` every task shares one gate: the paper's OMoE baseline.

Checked against: median-research-group/LibMTL LibMTL/architecture/MMoE.py (commit 4336804): one
softmax gate per task, a Linear on the input, weighting the stacked expert outputs
(einsum 'ij...,ji->j...'), shared part = the experts. Same equations: with LibMTL's weights
loaded, polytask's MMoE gives LibMTL's outputs (tests/test_reference_libmtl.py). No code by the
paper's authors was found (a search of the stored repositories by name found none).
Deviations: the experts and gates sit on the backbone's output h (the embeddings or encoder
every polytask model has), not on the raw input as in LibMTL, whose experts are whole encoders;
with an identity/embedding backbone this is Eq. 5-6 as written. Experts are MLPs here, and the
backbone counts as shared.
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


@ARCHITECTURES.register("mmoe")
class MMoE(ExpertDiagnostics, Architecture):
    """Multi-gate Mixture-of-Experts: shared experts, one softmax gate per task (Ma et al. 2018)."""

    def __init__(self, tasks: Sequence[Task], input_spec: InputSpec, *, backbone: Backbone = "auto",
                 backbone_options: dict[str, Any] | None = None, num_experts: int = 8,
                 expert: Sequence[int] = (16,), tower: Sequence[int] = (8,), num_gates: int | None = None) -> None:
        super().__init__(tasks, input_spec, backbone, backbone_options)
        if num_gates not in (None, 1, len(self.tasks)):
            raise PolytaskError(f"mmoe num_gates must be 1 (OMoE) or the number of tasks ({len(self.tasks)})")
        if num_experts < 1:
            raise PolytaskError(f"mmoe num_experts must be at least 1, not {num_experts}; pass e.g. num_experts=8")
        if not expert:
            raise PolytaskError("mmoe needs at least one expert layer; pass expert=[16]")
        d_in = self.backbone.out_dim
        self.experts = nn.ModuleList(mlp(d_in, expert) for _ in range(num_experts))
        self.one_gate = num_gates == 1
        n_gates = 1 if self.one_gate else len(self.tasks)
        self.gates = nn.ModuleList(nn.Linear(d_in, num_experts) for _ in range(n_gates))
        if not self.one_gate:
            for name, gate in zip(self.task_names, self.gates):
                self.mark_task_specific(name, gate)
        self.make_heads(expert[-1], tower)

    def expert_groups(self) -> dict[str, list[int]]:
        """Indices in each task gate: every expert is shared; no task has its own."""
        return {"shared": list(range(len(self.experts))), **{t: [] for t in self.task_names}}

    def forward(self, x: Inputs) -> dict[str, Tensor]:
        h = self.backbone(x)
        outs = [e(h) for e in self.experts]
        self.last_expert_activations = {f"shared/{i}": o.detach() for i, o in enumerate(outs)}
        stacked = torch.stack(outs, 1)  # [B, K, d]
        h, experts = self.cut([h, stacked])  # the task side reads gate inputs and expert outputs
        out: dict[str, Tensor] = {}
        for i, (name, head) in enumerate(self.heads.items()):
            g = self.gates[0 if self.one_gate else i](h).softmax(-1)  # [B, K]
            self.last_gates[name] = g.detach()
            out[name] = head(torch.einsum("bk,bkd->bd", g, experts))
        return out
