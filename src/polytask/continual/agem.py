"""Averaged Gradient Episodic Memory (Chaudhry, Ranzato, Rohrbach & Elhoseiny, ICLR 2019,
"Efficient Lifelong Learning with A-GEM").

After each experience ``memory_per_experience`` of its training samples (drawn at random)
join the episodic memory M. At every later step, with g the gradient of the current batch
and g_ref the gradient of the loss on a random batch of ``memory_batch`` samples of M
(Eq. 10-11):

    if gᵀ g_ref < 0:   g̃ = g − (gᵀ g_ref / g_refᵀ g_ref) · g_ref,   else g̃ = g,

over all trainable parameters as one vector; the optimizer then steps with g̃.

Checked against: aimagelab/mammoth models/agem.py (``project``: g - (g.g_ref / g_ref.g_ref) g_ref
when g.g_ref < 0, over all parameters as one vector) and ContinualAI/avalanche
avalanche/training/plugins/agem.py (stored version at commit 0b92c00: the first
``patterns_per_experience`` samples of the shuffled loader join the memory, the reference
gradient is taken on a random ``sample_size`` memory batch). Same rule.
Deviations: that Avalanche version tests and projects each parameter tensor separately; mammoth,
the paper and we project the whole gradient vector. Mammoth fills the memory with one training
batch of each task; we draw ``memory_per_experience`` samples at random from the whole experience.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from polytask.continual.base import Strategy, batch_loss, trainable
from polytask.continual._buffer import batch_rows, rows_batch
from polytask.errors import PolytaskError
from polytask.registry import STRATEGIES
from polytask.tasks import Batch
from polytask.trainer import Trainer


def project(g: Tensor, g_ref: Tensor) -> Tensor:
    """A-GEM's projection: g unchanged if gᵀg_ref ≥ 0, else g − (gᵀg_ref / g_refᵀg_ref) g_ref."""
    dot = torch.dot(g, g_ref)
    if dot >= 0:
        return g
    return g - dot / torch.dot(g_ref, g_ref).clamp(min=1e-12) * g_ref


@STRATEGIES.register("agem")
class AGEM(Strategy):
    """A-GEM: project the gradient when it conflicts with the episodic-memory gradient (Chaudhry et al. 2019)."""

    needs_boundaries = True

    def __init__(self, *, memory_per_experience: int = 250, memory_batch: int = 256) -> None:
        super().__init__()
        if memory_per_experience < 1 or memory_batch < 1:
            raise PolytaskError("agem needs memory_per_experience >= 1 and memory_batch >= 1")
        self.per_exp, self.memory_batch = int(memory_per_experience), int(memory_batch)
        self.memory: dict[str, Tensor] = {}
        self.generator = torch.Generator()
        self.projections = 0

    def setup(self, scenario: Any, seed: int) -> None:
        super().setup(scenario, seed)
        self.generator.manual_seed(seed + 15485863)

    def after_backward(self, trainer: Trainer, batch: Batch) -> None:
        if not self.memory:
            return
        params = [p for _, p in trainable(trainer.model)]
        n = len(next(iter(self.memory.values())))
        idx = torch.randperm(n, generator=self.generator)[:self.memory_batch]
        ref_batch = rows_batch({k: v[idx] for k, v in self.memory.items()}, self.all_tasks)
        ref_loss = batch_loss(trainer.model, self.all_tasks, ref_batch)
        ref = torch.autograd.grad(ref_loss, params, allow_unused=True)
        g = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
        g_ref = torch.cat([(r if r is not None else torch.zeros_like(p)).reshape(-1) for r, p in zip(ref, params)])
        g_new = project(g, g_ref)
        if g_new is g:
            return
        self.projections += 1
        offset = 0
        for p in params:
            k = p.numel()
            p.grad = g_new[offset:offset + k].view_as(p).clone()
            offset += k

    def after_fit(self, trainer: Trainer) -> None:
        assert self.scenario is not None
        data = self.scenario[self.current].train
        idx = torch.randperm(len(data), generator=self.generator)[:self.per_exp]
        full = next(data.subset(idx).batches(len(idx)))
        rows = batch_rows(full, self.all_tasks)
        self.memory = {k: torch.cat([self.memory[k], v]) if k in self.memory else v for k, v in rows.items()}

    def state_tensors(self) -> dict[str, Tensor]:
        return {**{f"memory/{k}": v for k, v in self.memory.items()}, "rng": self.generator.get_state()}

    def load_state(self, tensors: dict[str, Tensor], meta: dict[str, Any], model: nn.Module) -> None:
        super().load_state(tensors, meta, model)
        self.memory = {k[7:]: v for k, v in tensors.items() if k.startswith("memory/")}
        self.generator.set_state(tensors["rng"])
