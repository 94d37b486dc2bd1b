"""The Weighting interface: per-task losses in, one update's gradients out.

Loss-based methods (EW, UW, DWA, ...) only reweight the losses. Gradient-based methods
(PCGrad, MGDA, CAGrad, ...) ask the :class:`GradContext` for the per-task gradients of
the shared part, combine them, and hand the result back with :meth:`GradContext.apply`.
"""

from __future__ import annotations

from typing import ClassVar, Literal, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

GradSource = Literal["none", "params", "rep"]


def _all_reduce_mean(t: Tensor) -> Tensor:
    dist.all_reduce(t)
    return t.div_(dist.get_world_size())


class GradContext:
    """Gives a weighting access to per-task gradients of the shared part for one step.

    ``mode="params"``: gradients w.r.t. the shared parameters (exact, [T, D] with D the
    shared parameter count). ``mode="rep"``: gradients w.r.t. the shared representation
    the architecture marks with ``boundary`` (cheaper; [T, B*R]).

    Under torch.distributed, ``params`` gradients are averaged over ranks before the
    method combines them (every rank then computes the same update); in ``rep`` mode
    each rank combines its own samples' gradients and the resulting parameter gradients
    are averaged.
    """

    def __init__(self, model: nn.Module, mode: GradSource = "params") -> None:
        self.model = model
        self.mode = mode
        self.distributed = dist.is_available() and dist.is_initialized()
        shared = getattr(model, "shared_parameters", None)
        params = [p for p in (shared() if shared else model.parameters()) if p.requires_grad]
        self.shared = params
        ids = {id(p) for p in params}
        self.others = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
        self.grads: Tensor | None = None
        self._batched_ok = True

    def _targets(self) -> list[Tensor]:
        if self.mode == "rep":
            leaf = getattr(self.model, "rep_leaf", None)
            if leaf is None:
                raise RuntimeError("rep mode needs an architecture that marks its shared representation with boundary()")
            return [leaf]
        return self.shared

    def task_grads(self, losses: Tensor) -> Tensor:
        """The [T, D] matrix of per-task gradients (one batched vector-Jacobian product)."""
        targets = self._targets()
        t = losses.shape[0]
        grads: Sequence[Tensor | None] | None = None
        if self._batched_ok:
            try:
                grads = torch.autograd.grad(losses, targets, grad_outputs=torch.eye(t, dtype=losses.dtype),
                                            is_grads_batched=True, retain_graph=True, allow_unused=True)
            except RuntimeError:
                self._batched_ok = False  # an op without a batching rule: fall back to T passes
        if grads is None:
            rows = [torch.autograd.grad(losses[i], targets, retain_graph=True, allow_unused=True) for i in range(t)]
            grads = [torch.stack([r[j] if r[j] is not None else torch.zeros_like(p) for r in rows])
                     for j, p in enumerate(targets)]
        flat = torch.cat([(g if g is not None else torch.zeros(t, *p.shape)).reshape(t, -1)
                          for g, p in zip(grads, targets)], 1)
        if self.distributed and self.mode == "params":
            _all_reduce_mean(flat)
        self.grads = flat
        return flat

    def apply(self, losses: Tensor, weights: Tensor | None = None, shared_grad: Tensor | None = None) -> None:
        """Write the update into ``.grad``: task-specific parts get the gradient of
        ``sum_t w_t L_t`` (w = 1 by default); the shared part gets ``shared_grad``
        (default ``w @ G``)."""
        w = torch.ones_like(losses) if weights is None else weights.to(losses).detach()
        if shared_grad is None:
            if self.grads is None:
                raise RuntimeError("call task_grads() first or pass shared_grad")
            shared_grad = w @ self.grads
        total = (w * losses).sum()
        if self.mode == "rep":
            total.backward()
            self.model.last_rep.backward(shared_grad.reshape(self.model.last_rep.shape))
            touched = self.shared + self.others
        else:
            if self.others:
                torch.autograd.backward(total, inputs=self.others)
            offset = 0
            for p in self.shared:
                n = p.numel()
                g = shared_grad[offset:offset + n].reshape(p.shape)
                p.grad = g.clone() if p.grad is None else p.grad + g
                offset += n
            touched = self.others
        if self.distributed:
            for p in touched:
                if p.grad is not None:
                    _all_reduce_mean(p.grad)


class Weighting(nn.Module):
    """Base class: one rule that turns the [T] vector of task losses into gradients.

    ``grad_source`` says what the method needs: ``none`` (losses only), ``params`` or
    ``rep`` (per-task gradients of the shared parameters or representation; methods that
    work with both take a ``mode`` option). Learnable weightings (UW) register their
    parameters as module parameters; the trainer optimises them with the model.
    """

    grad_source: ClassVar[GradSource] = "none"

    def __init__(self, task_names: Sequence[str]) -> None:
        super().__init__()
        self.task_names = list(task_names)
        self.num_tasks = len(self.task_names)
        self.mode: GradSource = self.grad_source

    def backward(self, losses: Tensor, ctx: GradContext | None = None) -> Tensor:
        """Compute gradients for ``losses`` [T]; return the effective task weights [T] for logging."""
        raise NotImplementedError

    def end_epoch(self, epoch: int, mean_losses: Tensor) -> None:
        """Hook called after each training epoch with the epoch's mean task losses [T]."""
