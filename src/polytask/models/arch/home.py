"""HoME (Wang, Cao, Fu, Gai, Zhou, KDD 2025 / arXiv 2408.05430, "HoME: Hierarchy of Multi-Gate
Experts for Multi-Task Learning at Kuaishou").

HoME targets three failure modes of MMoE/PLE-style models: expert collapse (experts' output
distributions differ, ReLU experts output mostly zeros), expert degradation (a shared expert
is taken over by one task) and expert underfitting (sparse tasks ignore their own experts).
Its four mechanisms, each switchable for ablation:

(a) ``expert_norm`` (Sec. 4.1): every expert layer is ``Swish(BatchNorm(W v + b))`` instead
    of ``ReLU(W v + b)``, so all experts' outputs share one scale and few are exactly zero.
(b) ``hierarchy`` (Sec. 4.2, hierarchy mask): tasks are grouped into meta-task categories.
    Level 1 (meta level) has global shared experts G¹ and per-category shared experts C¹_c:
        z_c = Sum(softmax(W_c v), [G¹, C¹_c])            (category meta representation)
        z_g = Sum(softmax(W_g v), [G¹, C¹_1, ..., C¹_C])  (global meta representation)
    Level 2 has global experts G² (on z_g), category experts C²_c (on z_c) and task experts
    T_t (on z_{c(t)}); task t's gate reads z_{c(t)} and is masked to [G², C²_{c(t)}, T_t]:
        o_t = Sum(softmax(W_t z_{c(t)}), [G², C²_{c(t)}, T_t])
    With ``hierarchy=False`` the meta level and the category experts are dropped: one level
    of global experts G and task experts T_t on the backbone output v, gate over [G, T_t].
(c) ``feature_gate`` (Sec. 4.3): each expert privatises its input,
    E(u) -> E(2·sigmoid(W_up W_down u) ⊙ u), with its own rank-``feature_gate_rank`` gate.
(d) ``self_gate`` (Sec. 4.3): at the second level a task's own experts are added residually
    with a sigmoid gate on the same input, so they keep receiving gradient even when the
    softmax gate prefers shared experts:  o_t += Sum(sigmoid(U_t z_{c(t)}), T_t).

Choices where the paper leaves room (documented, not from the paper): ``task_groups`` defaults
to one category per task kind (binary / multiclass / multilabel / regression), the closest
generic stand-in for Kuaishou's watch-time vs interaction categories; feature gates are per
expert at both levels, with ``W_up`` initialised to zero (each gate starts as the identity);
the self-gate uses one sigmoid weight per task expert; the level-2 task gate reads the
category meta representation z_{c(t)}; category names are ``group0``, ``group1``, ... in
``task_groups`` order. Training batches of one sample use BatchNorm's running statistics.

No reference code found; looked in: code search "HoME hierarchy of multi-gate experts Kuaishou
feature gate self gate" (only unattributed third-party re-implementations, whose feature gate,
2·sigmoid(v·BA) with a low-rank BA, agrees with (c) above), find_repos, and the paper pages
(arXiv 2408.05430 summaries). Deviations: the choices listed above, all ours.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from polytask.errors import PolytaskError
from polytask.models.arch._experts import FeatureGate, expert_net, mix, stack_outputs
from polytask.models.backbones import Backbone
from polytask.models.arch.base import Architecture
from polytask.models.arch.diagnostics import ExpertDiagnostics
from polytask.registry import ARCHITECTURES
from polytask.tasks import Inputs, InputSpec, Task


def default_task_groups(tasks: Sequence[Task]) -> list[list[str]]:
    """One meta-task category per task kind, in order of first appearance."""
    groups: dict[str, list[str]] = {}
    for t in tasks:
        groups.setdefault(t.kind, []).append(t.name)
    return list(groups.values())


@ARCHITECTURES.register("home")
class HoME(ExpertDiagnostics, Architecture):
    """HoME: normalised Swish experts, category hierarchy mask, feature- and self-gates (Wang et al. 2025).

    Shared: backbone, the meta level (hierarchy on), global and category experts. Task-specific:
    the task's experts (with their feature gates), gate, self-gate and tower. Rep mode marks
    [the category meta representations, the level-2 global and category expert outputs]
    (hierarchy on) or [backbone output, global expert outputs] (hierarchy off) as the shared
    representation.

    Diagnostics: ``last_gates[task]`` is [B, K] over all K level-2 experts, laid out as
    [global, group0, group1, ..., task experts in task order], with exact zeros where the
    hierarchy mask hides an expert; ``expert_groups()`` gives ``"shared"`` (global + category
    experts) and each task's own indices; ``last_expert_activations`` names experts
    ``global/i``, ``group<c>/i``, ``<task>/i`` (level 2) and ``level1/global/i``,
    ``level1/group<c>/i`` (meta level).
    """

    def __init__(self, tasks: Sequence[Task], input_spec: InputSpec, *, backbone: Backbone = "auto",
                 backbone_options: dict[str, Any] | None = None,
                 task_groups: Sequence[Sequence[str]] | None = None, num_shared_experts: int = 2,
                 num_group_experts: int = 1, num_task_experts: int = 1, expert: Sequence[int] = (16,),
                 tower: Sequence[int] = (8,), expert_norm: bool = True, feature_gate: bool = True,
                 feature_gate_rank: int = 4, self_gate: bool = True, hierarchy: bool = True) -> None:
        super().__init__(tasks, input_spec, backbone, backbone_options)
        if not expert:
            raise PolytaskError("home needs at least one expert layer; pass expert=[16]")
        if num_shared_experts < 1 or num_task_experts < 1 or (hierarchy and num_group_experts < 1):
            raise PolytaskError("home needs num_shared_experts, num_task_experts and (with hierarchy) num_group_experts of at least 1")
        self.hierarchy, self.use_self_gate = hierarchy, self_gate
        self.task_groups = self._check_groups(task_groups) if hierarchy else []
        self.group_of = {t: c for c, group in enumerate(self.task_groups) for t in group}
        d_in, d = self.backbone.out_dim, expert[-1]

        def experts(in_dim: int, n: int) -> nn.ModuleList:
            return nn.ModuleList(
                nn.Sequential(FeatureGate(in_dim, feature_gate_rank), expert_net(in_dim, expert, expert_norm))
                if feature_gate else expert_net(in_dim, expert, expert_norm) for _ in range(n))

        n_groups = len(self.task_groups)
        if hierarchy:
            self.meta_global = experts(d_in, num_shared_experts)
            self.meta_groups = nn.ModuleList(experts(d_in, num_group_experts) for _ in range(n_groups))
            self.meta_gates = nn.ModuleList(nn.Linear(d_in, num_shared_experts + num_group_experts) for _ in range(n_groups))
            self.meta_shared_gate = nn.Linear(d_in, num_shared_experts + n_groups * num_group_experts)
            self.group_experts = nn.ModuleList(experts(d, num_group_experts) for _ in range(n_groups))
            level2_in = d
        else:
            level2_in = d_in
        self.global_experts = experts(level2_in, num_shared_experts)
        self.task_experts = nn.ModuleDict({t: experts(level2_in, num_task_experts) for t in self.task_names})
        n_shared = num_shared_experts + (n_groups * num_group_experts if hierarchy else 0)
        self._shared_idx: dict[str, list[int]] = {}
        self._gate_idx: dict[str, list[int]] = {}
        for k, t in enumerate(self.task_names):
            own_group = []
            if hierarchy:
                start = num_shared_experts + self.group_of[t] * num_group_experts
                own_group = list(range(start, start + num_group_experts))
            self._shared_idx[t] = list(range(num_shared_experts)) + own_group
            own = list(range(n_shared + k * num_task_experts, n_shared + (k + 1) * num_task_experts))
            self._gate_idx[t] = self._shared_idx[t] + own
        self.num_gate_experts = n_shared + len(self.task_names) * num_task_experts
        self.gates = nn.ModuleDict({t: nn.Linear(level2_in, len(self._gate_idx[t])) for t in self.task_names})
        if self_gate:
            self.self_gates = nn.ModuleDict({t: nn.Linear(level2_in, num_task_experts) for t in self.task_names})
        for t in self.task_names:
            self.mark_task_specific(t, self.task_experts[t], self.gates[t])
            if self_gate:
                self.mark_task_specific(t, self.self_gates[t])
        self.make_heads(d, tower)

    def _check_groups(self, task_groups: Sequence[Sequence[str]] | None) -> list[list[str]]:
        if task_groups is None:
            return default_task_groups(self.tasks)
        groups = [list(g) for g in task_groups]
        flat = [t for g in groups for t in g]
        unknown = [t for t in flat if t not in self.task_names]
        if unknown:
            raise PolytaskError(f"home task_groups names unknown task {unknown[0]!r}; the tasks are: {', '.join(self.task_names)}")
        if any(not g for g in groups) or sorted(flat) != sorted(self.task_names):
            raise PolytaskError("home task_groups must put every task in exactly one non-empty group, "
                                f"e.g. task_groups=[{self.task_names!r}]")
        return groups

    def expert_groups(self) -> dict[str, list[int]]:
        """Indices in ``last_gates``: global and category experts are shared, task experts are the task's own."""
        n_shared = self.num_gate_experts - sum(len(self.task_experts[t]) for t in self.task_names)
        groups = {"shared": list(range(n_shared))}
        groups.update({t: [i for i in self._gate_idx[t] if i >= n_shared] for t in self.task_names})
        return groups

    def forward(self, x: Inputs) -> dict[str, Tensor]:
        v = self.backbone(x)
        acts: dict[str, Tensor] = {}
        if self.hierarchy:
            g1 = stack_outputs(self.meta_global, v, [f"level1/global/{i}" for i in range(len(self.meta_global))], acts)
            c1 = [stack_outputs(ex, v, [f"level1/group{c}/{i}" for i in range(len(ex))], acts)
                  for c, ex in enumerate(self.meta_groups)]
            z = [mix(gate(v).softmax(-1), torch.cat([g1, c1[c]], 1)) for c, gate in enumerate(self.meta_gates)]
            z_global = mix(self.meta_shared_gate(v).softmax(-1), torch.cat([g1, *c1], 1))
            g2 = stack_outputs(self.global_experts, z_global, [f"global/{i}" for i in range(len(self.global_experts))], acts)
            c2 = [stack_outputs(ex, z[c], [f"group{c}/{i}" for i in range(len(ex))], acts)
                  for c, ex in enumerate(self.group_experts)]
            z_all, shared = self.cut([torch.stack(z, 1), torch.cat([g2, *c2], 1)])
            task_in = {t: z_all[:, self.group_of[t]] for t in self.task_names}
        else:
            g = stack_outputs(self.global_experts, v, [f"global/{i}" for i in range(len(self.global_experts))], acts)
            v_cut, shared = self.cut([v, g])
            task_in = {t: v_cut for t in self.task_names}
        out: dict[str, Tensor] = {}
        for t in self.task_names:
            u = task_in[t]
            own = stack_outputs(self.task_experts[t], u, [f"{t}/{i}" for i in range(len(self.task_experts[t]))], acts)
            w = self.gates[t](u).softmax(-1)
            o = mix(w, torch.cat([shared[:, self._shared_idx[t]], own], 1))
            if self.use_self_gate:
                o = o + mix(torch.sigmoid(self.self_gates[t](u)), own)
            full = w.new_zeros(w.shape[0], self.num_gate_experts)
            full[:, self._gate_idx[t]] = w.detach()
            self.last_gates[t] = full
            out[t] = self.heads[t](o)
        self.last_expert_activations = acts
        return out
