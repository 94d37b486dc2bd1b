"""Building blocks shared by the expert architectures (cross-stitch, CGC, PLE, HoME).

- :func:`expert_net`: an expert MLP, plain (Linear + ReLU) or HoME-normalised
  (Linear + BatchNorm + Swish).
- :class:`FeatureGate`: HoME's LoRA-style input privatisation ``2·sigmoid(W_up W_down x) ⊙ x``.
- :func:`mix`: the gated sum ``sum_i w_i E_i`` of stacked expert outputs.
- :class:`ExtractionNetwork`: the progressive layered extraction of PLE (Tang et al.,
  RecSys 2020); with one level it is CGC.

Diagnostics (``last_gates``, ``last_expert_activations``, ``expert_groups()``) are declared by
:class:`~polytask.models.arch.diagnostics.ExpertDiagnostics`.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polytask.errors import PolytaskError
from polytask.models.arch.base import Architecture
from polytask.models.arch.diagnostics import ExpertDiagnostics
from polytask.models.backbones import mlp
from polytask.tasks import Inputs, InputSpec, Task


class ExpertBatchNorm(nn.BatchNorm1d):
    """BatchNorm1d that normalises a training batch of one sample with the running statistics
    (plain BatchNorm raises on it; the trainer's last batch of an epoch can hold one sample)."""

    def forward(self, x: Tensor) -> Tensor:
        if self.training and x.shape[0] == 1:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return super().forward(x)


def expert_net(in_dim: int, sizes: Sequence[int], norm: bool = False) -> nn.Sequential:
    """An expert MLP: Linear + ReLU layers, or with ``norm`` Linear + BatchNorm + Swish (HoME Sec. 4.1).

    With ``norm`` the Linear layers have no bias: BatchNorm subtracts the batch mean, so a bias
    there would receive no gradient (BatchNorm's own shift plays its role).
    """
    if not norm:
        return mlp(in_dim, sizes)
    layers: list[nn.Module] = []
    for h in sizes:
        layers += [nn.Linear(in_dim, h, bias=False), ExpertBatchNorm(h), nn.SiLU()]
        in_dim = h
    return nn.Sequential(*layers)


class FeatureGate(nn.Module):
    """``x -> 2·sigmoid(W_up W_down x) ⊙ x`` with a rank-``rank`` (LoRA-style) factorisation.

    ``W_up`` starts at zero, so the gate starts as the identity (2·sigmoid(0) = 1).
    """

    def __init__(self, dim: int, rank: int) -> None:
        super().__init__()
        self.down = nn.Linear(dim, max(1, min(rank, dim)), bias=False)
        self.up = nn.Linear(self.down.out_features, dim, bias=False)
        nn.init.zeros_(self.up.weight)

    def forward(self, x: Tensor) -> Tensor:
        return 2.0 * torch.sigmoid(self.up(self.down(x))) * x


def mix(weights: Tensor, experts: Tensor) -> Tensor:
    """Gated sum: weights [B, K], stacked expert outputs [B, K, d] -> [B, d]."""
    return torch.einsum("bk,bkd->bd", weights, experts)


def stack_outputs(experts: nn.ModuleList, x: Tensor, names: Sequence[str],
                  record: dict[str, Tensor]) -> Tensor:
    """Run every expert on ``x``; record each detached output under its name; return [B, K, d]."""
    outs = [e(x) for e in experts]
    for name, o in zip(names, outs):
        record[name] = o.detach()
    return torch.stack(outs, 1)


class _ExtractionLevel(nn.Module):
    """One CGC level: shared experts, per-task experts, per-task gates and, unless it is the
    last level, a shared gate over all of the level's experts."""

    def __init__(self, task_names: Sequence[str], in_dim: int, expert: Sequence[int], num_shared: int,
                 num_task: int, last: bool) -> None:
        super().__init__()
        self.shared = nn.ModuleList(mlp(in_dim, expert) for _ in range(num_shared))
        self.task = nn.ModuleDict({t: nn.ModuleList(mlp(in_dim, expert) for _ in range(num_task)) for t in task_names})
        self.gates = nn.ModuleDict({t: nn.Linear(in_dim, num_task + num_shared) for t in task_names})
        self.shared_gate = None if last else nn.Linear(in_dim, len(task_names) * num_task + num_shared)


class ExtractionNetwork(ExpertDiagnostics, Architecture):
    """Progressive Layered Extraction (Tang et al., RecSys 2020); one level is CGC.

    Level j has per-task experts E_k (reading task k's input g^{k,j-1}) and shared experts
    E_s (reading the shared input g^{s,j-1}); level 0's inputs are the backbone output.
    Task gate (Eq. 1-2, 4): ``g^{k,j} = softmax(W^{k,j} g^{k,j-1}) · [E_{k,1..m_k}, E_{s,1..m_s}]``
    (task experts first, as in Eq. 2). Shared gate at every level but the last (Eq. 5):
    ``g^{s,j} = softmax(W^{s,j} g^{s,j-1}) · [all tasks' experts, shared experts]``.
    Towers (Eq. 3): ``y_k = t^k(g^{k,N})``.

    Ownership (what ``mark_task_specific`` records) follows where gradients flow: towers, the
    last level's task experts and task gates, and the task gates of the level below it (their
    output feeds only that task) are task-specific. Task experts of earlier levels feed the
    shared gate, so every task's loss reaches them: they count as shared parameters.

    Rep mode: the cut is [the last level's per-task inputs (the backbone output when there is
    one level), the last level's shared expert outputs]: everything the task-specific side reads.
    """

    def __init__(self, tasks: Sequence[Task], input_spec: InputSpec, backbone: str,
                 backbone_options: dict[str, Any] | None, num_levels: int, num_shared_experts: int,
                 num_task_experts: int, expert: Sequence[int], tower: Sequence[int], name: str) -> None:
        super().__init__(tasks, input_spec, backbone, backbone_options)
        if num_levels < 1:
            raise PolytaskError(f"{name} num_levels must be at least 1, not {num_levels}")
        if num_shared_experts < 1 or num_task_experts < 1:
            raise PolytaskError(f"{name} needs at least one shared and one task expert; pass num_shared_experts>=1 and num_task_experts>=1")
        if not expert:
            raise PolytaskError(f"{name} needs at least one expert layer; pass expert=[16]")
        self.num_shared_experts = num_shared_experts
        self.num_task_experts = num_task_experts
        dims = [self.backbone.out_dim] + [expert[-1]] * (num_levels - 1)
        self.levels = nn.ModuleList(
            _ExtractionLevel(self.task_names, d, expert, num_shared_experts, num_task_experts, j == num_levels - 1)
            for j, d in enumerate(dims))
        last = self.levels[-1]
        for t in self.task_names:
            self.mark_task_specific(t, last.task[t], last.gates[t])
            if num_levels > 1:
                self.mark_task_specific(t, self.levels[-2].gates[t])
        self.make_heads(expert[-1], tower)

    def expert_groups(self) -> dict[str, list[int]]:
        """Indices in each task gate: the task's own experts first, then the shared ones."""
        m = self.num_task_experts
        groups = {"shared": list(range(m, m + self.num_shared_experts))}
        groups.update({t: list(range(m)) for t in self.task_names})
        return groups

    def forward(self, x: Inputs) -> dict[str, Tensor]:
        h = self.backbone(x)
        task_in = {t: h for t in self.task_names}
        shared_in = h
        n = len(self.levels)
        acts: dict[str, Tensor] = {}
        for j, level in enumerate(self.levels):
            last = j == n - 1
            prefix = "" if last else f"level{j}/"
            shared = stack_outputs(level.shared, shared_in, [f"{prefix}shared/{i}" for i in range(len(level.shared))], acts)
            if last:
                if n == 1:
                    h_cut, shared = self.cut([h, shared])
                    task_in = {t: h_cut for t in self.task_names}
                else:
                    stacked, shared = self.cut([torch.stack([task_in[t] for t in self.task_names], 1), shared])
                    task_in = {t: stacked[:, i] for i, t in enumerate(self.task_names)}
            own = {t: stack_outputs(level.task[t], task_in[t], [f"{prefix}{t}/{i}" for i in range(len(level.task[t]))], acts)
                   for t in self.task_names}
            outs: dict[str, Tensor] = {}
            for t in self.task_names:
                w = level.gates[t](task_in[t]).softmax(-1)
                if last:
                    self.last_gates[t] = w.detach()
                outs[t] = mix(w, torch.cat([own[t], shared], 1))
            if level.shared_gate is not None:
                everything = torch.cat([own[t] for t in self.task_names] + [shared], 1)
                shared_in = mix(level.shared_gate(shared_in).softmax(-1), everything)
            task_in = outs
        self.last_expert_activations = acts
        return {t: head(task_in[t]) for t, head in self.heads.items()}
