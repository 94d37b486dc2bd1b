"""The Weighting interface: per-task losses in, one update's gradients out.

Loss-based methods (EW, UW, DWA, ...) only reweight the losses. Gradient-based methods
(PCGrad, MGDA, CAGrad, ...) ask the :class:`GradContext` for the per-task gradients of
the shared part, combine them, and hand the result back with :meth:`GradContext.apply`.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import ClassVar, Literal, Protocol, Sequence, runtime_checkable

import torch
import torch.distributed as dist
from torch.autograd.graph import GradientEdge
from torch import Tensor, nn

from polytask.errors import PolytaskError
from polytask.weighting._gramian import GramianEngine, Rows, dense_rows

GradSource = Literal["none", "params", "rep"]


@runtime_checkable
class SharedPart(Protocol):
    """What ``params`` mode needs of a model: which parameters all its tasks share."""

    def shared_parameters(self) -> list[nn.Parameter]: ...


@runtime_checkable
class RepresentationCut(SharedPart, Protocol):
    """What ``rep`` mode needs as well: a forward inside ``representation_cut()`` records the
    shared representation ``last_rep`` and the detached leaf ``rep_leaf`` the task side reads."""

    last_rep: Tensor | None
    rep_leaf: Tensor | None

    def representation_cut(self) -> AbstractContextManager[None]: ...


def _all_reduce_mean(t: Tensor) -> Tensor:
    dist.all_reduce(t)
    return t.div_(dist.get_world_size())


class GradContext:
    """Gives a weighting access to per-task gradients of the shared part for one step.

    ``mode="params"``: gradients w.r.t. the model's ``shared_parameters()`` (exact, [T, D]
    with D the shared parameter count). ``mode="rep"``: gradients w.r.t. the shared
    representation the model marks in forwards run inside ``model.representation_cut()``
    (cheaper; [T, B*R]). Both contracts (:class:`SharedPart`, :class:`RepresentationCut`) are
    what ``polytask.models.arch.base.Architecture`` provides; a model without the one its mode
    needs is refused here, in one line naming ``weighting`` when given.

    Rows come from batched vector-Jacobian products (``is_grads_batched``) of at most
    ``task_chunk`` tasks each. The default picks by device: one pass per task on CPU,
    where ``benchmarks/weighting_speed.py`` measured the batched product 0-30% slower
    (it does the same arithmetic), and all T at once elsewhere. Ops without a batching
    rule fall back to one pass per task automatically.

    In ``params`` mode the same passes also give the task-specific parameters' per-task
    gradients, so :meth:`apply` needs no further backward pass: T passes per step where
    LibMTL's loop runs T + 1. When ``losses`` is a ``torch.stack`` of scalar losses (as the
    trainer builds it), the CPU passes start from each task's own loss, so they skip the other
    tasks' heads. Methods that need only the Gram matrix G G^T call :meth:`gramian` instead
    of :meth:`task_grads` (in ``params`` mode G is then never formed: see
    :mod:`polytask.weighting._gramian`) and hand back ``shared_weights`` to :meth:`apply`.

    Under torch.distributed, ``params`` gradients are averaged over ranks before the
    method combines them (every rank then computes the same update); in ``rep`` mode
    each rank combines its own samples' gradients and the resulting parameter gradients
    are averaged.
    """

    def __init__(self, model: nn.Module, mode: GradSource = "params", task_chunk: int | None = None, *,
                 weighting: str | None = None) -> None:
        if mode not in ("params", "rep"):
            raise ValueError(f"GradContext mode must be 'params' or 'rep', not {mode!r}")
        if task_chunk is not None and task_chunk < 1:
            raise ValueError(f"task_chunk must be at least 1, got {task_chunk}")
        _check_contract(model, mode, weighting)
        self.model = model
        self.mode = mode
        self.task_chunk = task_chunk
        self.distributed = dist.is_available() and dist.is_initialized()
        params = [p for p in model.shared_parameters() if p.requires_grad]
        self.shared = params
        self.shared_size = sum(p.numel() for p in params)
        ids = {id(p) for p in params}
        self.others = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
        self.grads: Tensor | None = None
        self.other_grads: Tensor | None = None
        self._batched_ok = True
        self.engine: GramianEngine | None = None
        self._other_rows: list[Rows] = []

    def close(self) -> None:
        """Remove the forward hooks :meth:`gramian` installed on the model."""
        if self.engine is not None:
            self.engine.close()

    def reset(self) -> None:
        """Forget the previous step's gradients (the trainer calls this after the forward of every step)."""
        self.grads = self.other_grads = None
        if self.engine is not None:
            self.engine.step = None

    def _targets(self) -> list[Tensor]:
        if self.mode == "rep":
            leaf = self.model.rep_leaf
            if leaf is None:
                raise RuntimeError("rep mode needs this step's forward to run inside model.representation_cut()")
            return [leaf]
        return self.shared

    def _rows(self, losses: Tensor, targets: list[Tensor], outputs: Tensor) -> list[Tensor]:
        """Gradients [R, *shape] of ``outputs @ losses`` for every target (one row per row of ``outputs``)."""
        r = outputs.shape[0]
        grads: Sequence[Tensor | None] | None = None
        if r == 1:
            grads = [None if g is None else g.unsqueeze(0) for g in torch.autograd.grad(
                losses, targets, grad_outputs=outputs[0], retain_graph=True, allow_unused=True)]
        elif self._batched_ok:
            try:
                grads = torch.autograd.grad(losses, targets, grad_outputs=outputs, is_grads_batched=True,
                                            retain_graph=True, allow_unused=True)
            except RuntimeError:
                self._batched_ok = False  # an op without a batching rule: fall back to one pass per row
        if grads is None:
            return [torch.cat(rows) for rows in zip(*(self._rows(losses, targets, outputs[i:i + 1]) for i in range(r)))]
        return [g if g is not None else p.new_zeros(r, *p.shape) for g, p in zip(grads, targets)]

    def per_task(self, losses: Tensor, targets: list[Tensor]) -> list[Tensor]:
        """Per-task gradients [T, *shape] of each of ``targets`` (zeros where a loss does not reach one)."""
        return [dense_rows(rows, p) for rows, p in zip(self.per_task_rows(losses, targets), targets)]

    def per_task_rows(self, losses: Tensor, targets: list[Tensor]) -> list[list[Tensor | None]]:
        """For each target, its T per-task gradients, None where a task's loss does not reach it."""
        t = losses.shape[0]
        chunk = self.task_chunk or (1 if losses.device.type == "cpu" else t)
        edges = _stacked_edges(losses) if chunk == 1 else None
        if edges is not None:   # one pass per task from its own loss: the other tasks' branches stay untouched
            one = torch.ones((), dtype=losses.dtype, device=losses.device)
            per_task = [[None] * len(targets) if e is None else torch.autograd.grad(
                [e], targets, grad_outputs=[one], retain_graph=True, allow_unused=True) for e in edges]
            return [list(rows) for rows in zip(*per_task)]
        eye = torch.eye(t, dtype=losses.dtype, device=losses.device)
        blocks = [self._rows(losses, targets, eye[i:i + chunk]) for i in range(0, t, chunk)]
        return [[row for block in parts for row in block.unbind()] for parts in zip(*blocks)]

    def task_grads(self, losses: Tensor) -> Tensor:
        """The [T, D] matrix of per-task gradients of the shared part."""
        targets = self._targets()
        if self.mode == "params":
            targets = targets + self.others
        t = losses.shape[0]
        flat = torch.cat([g.reshape(t, -1) for g in self.per_task(losses, targets)], 1)
        if flat.dtype in (torch.float16, torch.bfloat16):  # rep mode under autocast: combine in float32
            flat = flat.float()
        if self.distributed and self.mode == "params":
            _all_reduce_mean(flat)
        if self.mode == "params":
            flat, self.other_grads = flat[:, :self.shared_size], flat[:, self.shared_size:]
        self.grads = flat
        return flat

    def gramian(self, losses: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """The [T, T] Gram matrix G G^T (float64, CPU) of the per-task gradients of the shared part,
        products taken in ``dtype`` or the gradients' dtype if wider. In ``params`` mode it comes from the
        :class:`~polytask.weighting._gramian.GramianEngine` without forming G (one vector-Jacobian
        product per task w.r.t. the shared layers' outputs, no weight-gradient products); follow it
        with :meth:`apply` and ``shared_weights``. In ``rep`` mode it is the Gram matrix of
        :meth:`task_grads` (G is small there)."""
        if self.mode == "rep":
            g = self.task_grads(losses)
            g = g.to(torch.promote_types(g.dtype, dtype))
            return (g @ g.T).double().cpu()
        if self.engine is None:
            self.engine = GramianEngine(self.model, self.shared)
        m, self._other_rows = self.engine.gramian(
            losses, self.per_task_rows, _all_reduce_mean if self.distributed else None, self.others, dtype)
        return m

    def apply(self, losses: Tensor, weights: Tensor | None = None, shared_grad: Tensor | None = None, *,
              shared_weights: Tensor | None = None) -> None:
        """Write the update into ``.grad``: task-specific parts get the gradient of
        ``sum_t w_t L_t`` (w = 1 by default); the shared part gets ``shared_grad``, else
        ``shared_weights @ G`` (``shared_weights`` defaults to w) if :meth:`task_grads` or
        :meth:`gramian` ran this step, else the gradient of the weighted sum itself, so a
        weighting can skip G on some steps."""
        w = torch.ones_like(losses) if weights is None else weights.to(losses).detach()
        engine_step = self.engine.step if self.engine is not None else None
        if shared_grad is None and engine_step is not None and self.grads is None:
            sw = w if shared_weights is None else shared_weights.to(losses).detach()
            for p, g in self.engine.shared_grads(sw):   # type: ignore[union-attr]
                p.grad = g if p.grad is None else p.grad + g
            ws = w.unbind()
            for p, rows in zip(self.others, self._other_rows):   # averaged over ranks with the Gramian
                terms = [r if weights is None else ws[i].to(p.dtype) * r for i, r in enumerate(rows) if r is not None]
                g = terms[0] if len(terms) == 1 else torch.stack(terms).sum(0) if terms else torch.zeros_like(p)
                p.grad = g if p.grad is None else p.grad + g
            self.engine.finish()   # type: ignore[union-attr]
            return
        if self.engine is not None:
            self.engine.finish()
        if shared_grad is None and self.grads is not None:
            shared_grad = (w if shared_weights is None else shared_weights.to(self.grads)) @ self.grads
        total = (w * losses).sum()
        if self.mode == "rep":
            if shared_grad is None:
                (rep_grad,) = torch.autograd.grad(total, [self._targets()[0]], retain_graph=True)
                shared_grad = rep_grad.reshape(-1)
            total.backward()
            self.model.last_rep.backward(shared_grad.reshape(self.model.last_rep.shape))
            touched = self.shared + self.others
        elif shared_grad is None:
            total.backward()
            touched = self.shared + self.others
        else:
            touched = []
            if self.other_grads is not None and self.grads is not None:
                _add_flat_grad(self.others, w @ self.other_grads)  # already averaged over ranks
            elif self.others:
                torch.autograd.backward(total, inputs=self.others)
                touched = self.others
            _add_flat_grad(self.shared, shared_grad)
        if self.distributed:
            for p in touched:
                if p.grad is not None:
                    _all_reduce_mean(p.grad)


def _stacked_edges(losses: Tensor) -> list[GradientEdge | None] | None:
    """The gradient edges of the scalar losses ``torch.stack`` put into ``losses`` (None for one that does
    not require grad), or None when ``losses`` is not such a stack. Differentiating the edges one at a
    time skips the other tasks' heads, which a one-hot ``grad_outputs`` on the stack would run with zeros."""
    fn = losses.grad_fn
    if fn is None or type(fn).__name__ != "StackBackward0" or losses.dim() != 1 \
            or len(fn.next_functions) != losses.shape[0]:
        return None
    return [None if node is None else GradientEdge(node, nr) for node, nr in fn.next_functions]


def _check_contract(model: nn.Module, mode: GradSource, weighting: str | None = None) -> None:
    """Refuse, in one line, a model that cannot give ``mode`` gradients of its shared part."""
    who = f"weighting {weighting!r}" if weighting else f"GradContext mode {mode!r}"
    name = type(model).__name__
    fix = "subclass polytask.models.arch.base.Architecture or use a loss weighting such as 'ew'"
    if mode == "rep" and not isinstance(model, RepresentationCut):
        raise PolytaskError(f"{who} needs per-task gradients of the shared representation, but {name} is not a "
                            f"polytask Architecture (no representation_cut()); {fix}")
    if not isinstance(model, SharedPart):
        raise PolytaskError(f"{who} needs per-task gradients of the shared part, but {name} is not a polytask "
                            f"Architecture (no shared_parameters()); {fix}")


def _add_flat_grad(params: list[nn.Parameter], flat: Tensor) -> None:
    """Add the slices of the flat vector ``flat`` to the ``.grad`` of ``params`` in order."""
    offset = 0
    for p in params:
        n = p.numel()
        g = flat[offset:offset + n].reshape(p.shape)
        p.grad = g.clone() if p.grad is None else p.grad + g
        offset += n


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

    def objective(self, losses: Tensor) -> tuple[Tensor, Tensor]:
        """For a loss-based rule (``grad_source == "none"``): the scalar whose gradient is the
        update, and the effective task weights [T]. The trainer backpropagates it in one pass
        together with any extra loss (a continual strategy's regulariser)."""
        raise NotImplementedError(f"{type(self).__name__} combines gradients; it has no scalar objective")

    def backward(self, losses: Tensor, ctx: GradContext | None = None) -> Tensor:
        """Compute gradients for ``losses`` [T]; return the effective task weights [T] for logging."""
        total, weights = self.objective(losses)
        total.backward()
        return weights

    def end_epoch(self, epoch: int, mean_losses: Tensor) -> None:
        """Hook called after each training epoch with the epoch's mean task losses [T]."""
