"""TaskExpert (Ye & Xu, ICCV 2023, "TaskExpert: Dynamically Assembling Multi-Task Representations
with Memorial Mixture-of-Experts").

The paper attaches a Memorial Mixture-of-Experts module to several backbone layers. At layer s:

- expert networks decompose the layer's feature into representative task-generic features
  ``e_{s,i} = E_{s,i}(h_s)``, i = 1..n;
- a dynamic gating network per task t weighs them, reading the multi-task feature memory as one
  more expert (the "memorial expert"):
  ``g_{t,s} = softmax(W_{t,s} h_s)``,  ``F_{t,s} = sum_i g_{t,s,i} e_{s,i} + g_{t,s,n+1} M_{t,s-1}``;
- the decoded task feature is written to the memory: ``M_{t,s} = M_{t,s-1} + F_{t,s}``;
- after the last layer the memory makes the prediction: ``y_t = head_t(M_{t,L})``.

Choices and simplifications (the paper works on ViT token maps of a pretrained backbone):

- features are vectors, not pixel/token maps; the paper's backbone layers become a shared trunk:
  ``h_1`` is the backbone output and ``h_s = trunk_s(h_{s-1})`` (one MLP block per extra stage);
- the memory starts empty (``M_{t,0} = 0``), so the first stage has no memorial expert and its gates
  weigh the n experts only (``M_{t,1} = F_{t,1}``);
- the gate is one linear layer + softmax on the stage feature ``h_s`` (as in MMoE); the memorial
  expert is the memory vector itself and the memory write is the additive update above.

Ownership: trunk and experts are shared; each task's gates (every stage) and head are its own (the
memory is a per-task activation, no parameters). Rep mode cuts at everything the task side reads:
the stage features ``h_1..h_L`` (gate inputs) and every stage's stacked expert outputs.

No reference code found; looked in: prismformore/Multi-Task-Transformer (the paper's announced
home; the stored snapshot, all 86 commits, holds only InvPT/ and TaskPrompter/, no TaskExpert
folder), find_repos "TaskExpert" / "prismformore" (no other repository of the authors with it),
code search "memorial mixture of experts gating feature memory" and the paper pages (abstracts and
summaries only, no equations). Deviations: the simplifications listed above, all ours; without
the authors' code or the full paper text they are unverified readings of the abstract and the Fig. 2 caption.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from polytask.errors import PolytaskError
from polytask.models.arch._experts import mix, stack_outputs
from polytask.models.arch.base import Architecture
from polytask.models.arch.diagnostics import ExpertDiagnostics
from polytask.models.backbones import Backbone, mlp
from polytask.registry import ARCHITECTURES
from polytask.tasks import Inputs, InputSpec, Task


@ARCHITECTURES.register("taskexpert")
class TaskExpert(ExpertDiagnostics, Architecture):
    """TaskExpert: per-stage shared experts, per-task gates over experts + a task feature memory (Ye & Xu 2023)."""

    def __init__(self, tasks: Sequence[Task], input_spec: InputSpec, *, backbone: Backbone = "auto",
                 backbone_options: dict[str, Any] | None = None, num_layers: int = 2, num_experts: int = 4,
                 expert: Sequence[int] = (16,), trunk: int = 32, tower: Sequence[int] = (8,)) -> None:
        super().__init__(tasks, input_spec, backbone, backbone_options)
        if num_layers < 1:
            raise PolytaskError(f"taskexpert num_layers must be at least 1, not {num_layers}")
        if num_experts < 1:
            raise PolytaskError(f"taskexpert needs at least one expert; pass num_experts>=1, not {num_experts}")
        if not expert:
            raise PolytaskError("taskexpert needs at least one expert layer; pass expert=[16]")
        dims = [self.backbone.out_dim] + [trunk] * (num_layers - 1)
        self.num_experts = num_experts
        self.trunk = nn.ModuleList(mlp(d, [trunk]) for d in dims[:-1])
        self.experts = nn.ModuleList(nn.ModuleList(mlp(d, expert) for _ in range(num_experts)) for d in dims)
        self.gates = nn.ModuleDict({t: nn.ModuleList(nn.Linear(d, num_experts + (s > 0)) for s, d in enumerate(dims))
                                    for t in self.task_names})
        for t in self.task_names:
            self.mark_task_specific(t, self.gates[t])
        self.make_heads(expert[-1], tower)
        self.last_stage_gates: dict[str, list[Tensor]] = {}
        self.last_memory: dict[str, list[Tensor]] = {}

    def expert_groups(self) -> dict[str, list[int]]:
        """Indices in each task's last-stage gate: the shared experts, then (from stage 2 on) its memory."""
        own = [self.num_experts] if len(self.experts) > 1 else []
        return {"shared": list(range(self.num_experts)), **{t: list(own) for t in self.task_names}}

    def forward(self, x: Inputs) -> dict[str, Tensor]:
        n = len(self.experts)
        feats = [self.backbone(x)]
        for block in self.trunk:
            feats.append(block(feats[-1]))
        acts: dict[str, Tensor] = {}
        stacks = [stack_outputs(self.experts[s], feats[s],
                                [f"{'' if s == n - 1 else f'stage{s}/'}shared/{i}" for i in range(self.num_experts)], acts)
                  for s in range(n)]
        parts = self.cut(feats + stacks)
        feats, stacks = parts[:n], parts[n:]
        out: dict[str, Tensor] = {}
        for t in self.task_names:
            memory: Tensor | None = None
            gates, memories = [], []
            for s in range(n):
                g = self.gates[t][s](feats[s]).softmax(-1)
                experts = stacks[s] if memory is None else torch.cat([stacks[s], memory.unsqueeze(1)], 1)
                decoded = mix(g, experts)
                memory = decoded if memory is None else memory + decoded
                gates.append(g.detach())
                memories.append(memory.detach())
            self.last_stage_gates[t], self.last_memory[t] = gates, memories
            self.last_gates[t] = gates[-1]
            out[t] = self.heads[t](memory)
        self.last_expert_activations = acts
        return out
