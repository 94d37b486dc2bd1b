"""Elastic Weight Consolidation (Kirkpatrick et al., PNAS 2017, "Overcoming catastrophic
forgetting in neural networks").

Eq. 3, extended to several earlier experiences as in the paper (one penalty per experience):

    L(θ) = L_B(θ) + Σ_{A earlier} Σ_i λ/2 · F_{A,i} (θ_i − θ*_{A,i})²

F_A is the diagonal of the Fisher information at θ*_A (the weights after experience A),
estimated on ``fisher_samples`` training samples of A as the mean of squared per-sample
gradients of log p(y|x). ``fisher="true"`` (default) draws y from the model's own predictive
distribution (the Fisher proper); ``fisher="empirical"`` uses the dataset labels.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from polytask.continual.base import Strategy, trainable
from polytask.errors import PolytaskError
from polytask.registry import STRATEGIES
from polytask.tasks import Batch, MultiTaskData, Task
from polytask.trainer import Trainer


def diagonal_fisher(model: nn.Module, tasks: list[Task], data: MultiTaskData, num_samples: int,
                    generator: torch.Generator, mode: str = "true") -> dict[str, Tensor]:
    """F_i = mean over samples of (∂/∂θ_i log p(y|x))², summed over the sample's labelled tasks."""
    params = trainable(model)
    fisher = {n: torch.zeros_like(p) for n, p in params}
    n = min(num_samples, len(data))
    idx = torch.randperm(len(data), generator=generator)[:n]
    sub = data.subset(idx)
    was_training = model.training
    model.eval()
    for batch in sub.batches(1):
        out = model(batch.x)
        nll = torch.zeros(())
        for t in tasks:
            if not bool(batch.mask[t.name].any()):
                continue
            y = t.kind_impl.sample_labels(out[t.name].detach(), generator) if mode == "true" else batch.y[t.name]
            nll = nll + t.loss(out[t.name], y).sum()
        grads = torch.autograd.grad(nll, [p for _, p in params], allow_unused=True)
        for (name, _), g in zip(params, grads):
            if g is not None:
                fisher[name] += g.detach() ** 2
    model.train(was_training)
    return {k: v / n for k, v in fisher.items()}


def quadratic_penalty(model: nn.Module, fisher: dict[str, Tensor], anchor: dict[str, Tensor]) -> Tensor:
    """Σ_i F_i (θ_i − θ*_i)²."""
    total = torch.zeros(())
    for name, p in model.named_parameters():
        if name in fisher:
            total = total + (fisher[name] * (p - anchor[name]) ** 2).sum()
    return total


@STRATEGIES.register("ewc")
class EWC(Strategy):
    """Elastic Weight Consolidation: Fisher-weighted pull to each earlier solution (Kirkpatrick et al. 2017)."""

    needs_boundaries = True

    def __init__(self, *, lam: float = 1000.0, fisher_samples: int = 1000, fisher: str = "true") -> None:
        super().__init__()
        if fisher not in ("true", "empirical"):
            raise PolytaskError(f"fisher must be 'true' or 'empirical', got {fisher!r}")
        if lam < 0 or fisher_samples < 1:
            raise PolytaskError("ewc needs lam >= 0 and fisher_samples >= 1")
        self.lam, self.fisher_samples, self.fisher_mode = float(lam), int(fisher_samples), fisher
        self.anchors: list[tuple[dict[str, Tensor], dict[str, Tensor]]] = []
        self.generator = torch.Generator()

    def setup(self, scenario: Any, seed: int) -> None:
        super().setup(scenario, seed)
        self.generator.manual_seed(seed + 7919)

    def penalty(self, model: nn.Module) -> Tensor:
        """λ/2 Σ_A Σ_i F_{A,i} (θ_i − θ*_{A,i})²."""
        return self.lam / 2 * sum((quadratic_penalty(model, f, a) for f, a in self.anchors), torch.zeros(()))

    def extra_loss(self, trainer: Trainer, batch: Batch, outputs: dict[str, Tensor]) -> Tensor | None:
        return self.penalty(trainer.model) if self.anchors else None

    def after_fit(self, trainer: Trainer) -> None:
        assert self.scenario is not None
        data = self.scenario[self.current].train
        fisher = diagonal_fisher(trainer.model, self.current_tasks, data, self.fisher_samples,
                                 self.generator, self.fisher_mode)
        self.consolidate(fisher, {n: p.detach().clone() for n, p in trainable(trainer.model)})

    def consolidate(self, fisher: dict[str, Tensor], anchor: dict[str, Tensor]) -> None:
        self.anchors.append((fisher, anchor))

    def state_tensors(self) -> dict[str, Tensor]:
        out = {"rng": self.generator.get_state()}
        for i, (f, a) in enumerate(self.anchors):
            out.update({f"fisher/{i}/{k}": v for k, v in f.items()})
            out.update({f"anchor/{i}/{k}": v for k, v in a.items()})
        return out

    def state_meta(self) -> dict[str, Any]:
        return {**super().state_meta(), "anchors": len(self.anchors)}

    def load_state(self, tensors: dict[str, Tensor], meta: dict[str, Any], model: nn.Module) -> None:
        super().load_state(tensors, meta, model)
        self.generator.set_state(tensors["rng"])
        self.anchors = []
        for i in range(int(meta["anchors"])):
            f = {k.split("/", 2)[2]: v for k, v in tensors.items() if k.startswith(f"fisher/{i}/")}
            a = {k.split("/", 2)[2]: v for k, v in tensors.items() if k.startswith(f"anchor/{i}/")}
            self.anchors.append((f, a))
