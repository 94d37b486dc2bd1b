"""The Gramian engine: the T x T matrix of inner products of the per-task gradients of the shared
parameters, and then the update ``w @ G``, without forming the [T, D] matrix G.

For a linear layer y = A W^T + b with input rows A [N, in] (N = batch, or batch x positions) and
task t's gradient Delta_t [N, out] w.r.t. the output y, g_t = (Delta_t^T A, 1^T Delta_t), so

    <g_i, g_j> = sum((A A^T + 1 1^T) * (Delta_i Delta_j^T)) = <Delta_i, K Delta_j>,  K = A A^T + 1 1^T

("ghost" products: N^2 in + T N^2 out + T^2 N out multiply-adds, against T N in out + T^2 in out for
forming the T per-task weight gradients and their Gram matrix; the cheaper of the two, counting
the update each leaves, is used per layer). The Delta_t come from T vector-Jacobian products
w.r.t. the layers' *outputs*, which skip every shared weight-gradient product, and the update is
then one product per layer, grad W = (sum_t w_t Delta_t)^T A after the ghost product, or w @ rows
from the per-task gradients the direct branch formed: no further backward pass. The idea is TorchJD's "autogram" engine
(Quinton & Rey 2024, arXiv:2406.16232, Sec. 6 and Algorithm 3; TorchJD src/torchjd/autogram/
_engine.py, read at commit 002cb43), which forms each module's per-task Jacobian and contracts it;
the ghost product here is the trick of per-sample gradient norms in "ghost clipping" (Li, Tramer,
Liang & Hashimoto, ICLR 2022, "Large Language Models Can Be Strong Differentially Private
Learners") applied to pairs of tasks instead of samples.

Covered: ``nn.Linear`` modules (``forward`` not overridden) all of whose trainable parameters are
shared and not used by another module. Every other shared parameter -- other layer types, a
Linear whose output was modified in place (its version counter moved) or that did not run in a
recorded forward -- falls back to today's path: its per-task gradients come from the same
vector-Jacobian products and enter the Gramian as G_u G_u^T. A shared Linear's weight used outside
its module's ``forward`` (``x @ layer.weight``) is not seen and must not be used this way (as in
TorchJD). The layer inputs are recorded by forward hooks installed on the first call, so that
step uses the fallback for every layer.

Under torch.distributed the Gramian of the rank-averaged gradients has cross-rank terms
<g_i^r, g_j^r'>, which need the other ranks' activations; there the engine forms each covered
layer's per-task gradients from A and Delta (one product per layer, no second backward) and
all-reduces them with the fallback rows, as today's path does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

Rows = list[Tensor | None]
Vjp = Callable[[Tensor, list[Tensor]], list[Rows]]


def dense_rows(rows: Sequence[Tensor | None], like: Tensor) -> Tensor:
    """Stack per-task gradients of ``like`` into [T, *shape], zeros for the None rows."""
    if all(r is not None for r in rows):
        return torch.stack(rows)   # type: ignore[arg-type]
    out = like.new_zeros(len(rows), *like.shape)
    for i, r in enumerate(rows):
        if r is not None:
            out[i] = r
    return out


def _cat(parts: list[Tensor], dim: int) -> Tensor:
    """``torch.cat`` without the copy of a single part."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def covered(module: nn.Module) -> bool:
    """Whether the engine forms this module's Gramian from its inputs (a plain ``nn.Linear``)."""
    return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward


def ghost_cost(n: int, d_in: int, d_out: int, t: int) -> tuple[int, int]:
    """Multiply-adds of the ghost product and of forming the per-task weight gradients, each with
    the update it leaves to :meth:`GramianEngine.shared_grads` ((sum_t w_t Delta_t)^T A after the
    ghost product, w @ rows after the direct one)."""
    ghost = n * n * d_in + t * n * n * d_out + t * t * n * d_out + t * n * d_out + n * d_in * d_out
    direct = t * n * d_in * d_out + t * t * d_in * d_out + t * d_in * d_out
    return ghost, direct


def linear_gramian(a: Tensor, delta: Tensor, bias: bool) -> tuple[Tensor, Tensor | None]:
    """The [T, T] Gramian of the per-task gradients (weight, and bias if ``bias``) of L linear layers
    of one shape together, with input rows ``a`` [L, N, in] and per-task output gradients ``delta``
    [L, T, N, out], and those gradients' flat rows (:func:`layer_grads`) where it formed them (None
    after the ghost product)."""
    n_layers, t, n, d_out = delta.shape
    ghost, direct = ghost_cost(n, a.shape[-1], d_out, t)
    if ghost < direct:
        k = a @ a.mT
        if bias:
            k = k + 1.0
        kd = torch.matmul(k.unsqueeze(1), delta)
        return (delta.reshape(n_layers, t, -1) @ kd.reshape(n_layers, t, -1).mT).sum(0), None
    rows = layer_grads(a, delta, bias)
    return (rows @ rows.mT).sum(0), rows


def layer_grads(a: Tensor, delta: Tensor, bias: bool) -> Tensor:
    """Flat [L, T, out*in (+ out)] per-task gradients of L linear layers' weights (and biases), from
    ``a`` [L, N, in] and ``delta`` [L, T, N, out]."""
    n_layers, t = delta.shape[:2]
    w = torch.matmul(delta.mT, a.unsqueeze(1)).reshape(n_layers, t, -1)
    return torch.cat([w, delta.sum(2)], 2) if bias else w


def _stack(parts: list[Tensor]) -> Tensor:
    """``torch.stack`` without the copy of a single part."""
    return parts[0].unsqueeze(0) if len(parts) == 1 else torch.stack(parts)


@dataclass
class _Layer:
    module: nn.Linear
    params: list[nn.Parameter]
    calls: list[tuple[Tensor, Tensor, int]] = field(default_factory=list)   # (input, output, output version)


@dataclass
class _Group:
    """Covered layers of one shape (rows, in, out, bias) whose products are taken together."""

    layers: list[_Layer]
    a: Tensor                     # input rows [L, N, in]
    delta: Tensor                 # per-task output gradients [L, T, N, out]
    rows: Tensor | None = None    # per-task gradients [L, T, out*in (+ out)] where formed


@dataclass
class _Step:
    """What one Gramian leaves for :meth:`GramianEngine.apply`."""

    groups: list[_Group]
    flat_params: list[nn.Parameter]                   # shared parameters taken on the fallback path
    flat: Tensor                                      # their per-task gradients [T, D_u]


class GramianEngine:
    """Gramian of the per-task gradients of ``shared`` and the update ``w @ G`` from it (module doc)."""

    def __init__(self, model: nn.Module, shared: Sequence[nn.Parameter]) -> None:
        self.model = model
        shared_ids = {id(p) for p in shared}
        users: dict[int, int] = {}
        for m in model.modules():
            for p in m.parameters(recurse=False):
                users[id(p)] = users.get(id(p), 0) + 1
        self.layers: list[_Layer] = []
        for m in model.modules():
            params = [p for p in m.parameters(recurse=False) if p.requires_grad]
            if covered(m) and params and m.weight.requires_grad and all(
                    id(p) in shared_ids and users[id(p)] == 1 for p in params):
                self.layers.append(_Layer(m, params))   # type: ignore[arg-type]
        ids = {id(p) for layer in self.layers for p in layer.params}
        self.uncovered = [p for p in shared if id(p) not in ids]
        self._handles: list[RemovableHandle] = []
        self.step: _Step | None = None

    def _install(self) -> None:
        for layer in self.layers:
            self._handles.append(layer.module.register_forward_hook(self._recorder(layer)))

    @staticmethod
    def _recorder(layer: _Layer) -> Callable[[nn.Module, tuple[Tensor, ...], Tensor], None]:
        def hook(module: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> None:
            if torch.is_grad_enabled() and out.requires_grad:
                layer.calls.append((args[0], out, out._version))
        return hook

    def finish(self) -> None:
        """End the step: forget its recorded inputs and products."""
        for layer in self.layers:
            layer.calls.clear()
        self.step = None

    def close(self) -> None:
        """Remove the forward hooks."""
        self.finish()
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def gramian(self, losses: Tensor, vjp: Vjp, reduce: Callable[[Tensor], Tensor] | None = None,
                extra: Sequence[Tensor] = (), dtype: torch.dtype = torch.float32) -> tuple[Tensor, list[Rows]]:
        """The [T, T] float64 Gramian of the shared gradients, and the per-task gradients of the tensors
        in ``extra`` (the task-specific parameters) from the same products. ``vjp`` maps (losses,
        targets) to each target's T per-task gradients (None where a loss does not reach it);
        ``reduce`` (under torch.distributed) averages a [T, D] block over ranks in place; the products
        are taken in ``dtype`` or the gradients' own dtype, whichever is wider."""
        if not self._handles:
            self._install()
        ready = [layer for layer in self.layers
                 if layer.calls and all(out._version == v for _, out, v in layer.calls)]
        fallback = [p for layer in self.layers if layer not in ready for p in layer.params] + self.uncovered
        outs = [out for layer in ready for _, out, _ in layer.calls]
        rows = vjp(losses, outs + fallback + list(extra))
        t = losses.shape[0]
        pos, shaped = 0, {}
        for layer in ready:   # each layer's input rows and per-task output-gradient rows, by shape
            k, d_in = len(layer.calls), layer.module.in_features
            a = _cat([x.detach().reshape(-1, d_in) for x, _, _ in layer.calls], 0)
            grads = [[r if r is not None else out.new_zeros(out.shape) for r in per_task]
                     for per_task, (_, out, _) in zip(rows[pos:pos + k], layer.calls)]
            key = (a.shape[0], d_in, layer.module.out_features, len(layer.params), a.dtype, grads[0][0].dtype)
            shaped.setdefault(key, []).append((layer, a, grads))
            pos += k
        groups = []
        for members in shaped.values():   # one stack of every member's T x calls output gradients
            d_out = members[0][0].module.out_features
            delta = torch.stack([g.reshape(-1, d_out) if len(calls) == 1 else torch.cat(
                [c[i].reshape(-1, d_out) for c in calls]) for _, _, calls in members
                for i, g in enumerate(calls[0])]).reshape(len(members), t, -1, d_out)
            a = _stack([a for _, a, _ in members])
            wide = torch.promote_types(torch.promote_types(a.dtype, delta.dtype), dtype)
            groups.append(_Group([layer for layer, _, _ in members], a.to(wide), delta.to(wide)))
        flat = [dense_rows(r, p).reshape(t, -1) for r, p in zip(rows[pos:pos + len(fallback)], fallback)]
        extra_rows = rows[pos + len(fallback):]
        if reduce is not None:   # cross-rank terms: form the layers' gradients, average them with the rest
            flat = [rows.to(layer.params[0].dtype) for g in groups
                    for layer, rows in zip(g.layers, layer_grads(g.a, g.delta, len(g.layers[0].params) == 2))] + flat
            fallback = [p for g in groups for layer in g.layers for p in layer.params] + fallback
            groups = []
            n_shared = sum(f.shape[1] for f in flat)
            block = torch.cat(flat + [dense_rows(r, p).reshape(t, -1) for r, p in zip(extra_rows, extra)], 1)
            reduce(block)
            flat, offset, extra_rows = [block[:, :n_shared]], n_shared, []
            for p in extra:
                extra_rows.append(list(block[:, offset:offset + p.numel()].reshape(t, *p.shape).unbind()))
                offset += p.numel()
        shared = torch.cat(flat, 1) if flat else losses.new_zeros(t, 0)
        wide = shared.to(torch.promote_types(shared.dtype, dtype))
        m = (wide @ wide.T).double()
        for g in groups:
            gram, g.rows = linear_gramian(g.a, g.delta, len(g.layers[0].params) == 2)
            m += gram.double()
        self.step = _Step(groups, fallback, shared)
        return m.cpu(), extra_rows

    def shared_grads(self, w: Tensor) -> list[tuple[nn.Parameter, Tensor]]:
        """(parameter, gradient) pairs of the update ``w @ G`` on the shared parameters."""
        step = self.step
        if step is None:
            raise RuntimeError("GramianEngine.shared_grads needs this step's gramian() first")
        out: list[tuple[nn.Parameter, Tensor]] = []
        for g in step.groups:
            n_layers, t, n, d_out = g.delta.shape
            if g.rows is None:
                d = (w.to(g.delta) @ g.delta.reshape(n_layers, t, -1)).reshape(n_layers, n, d_out)
                per_layer = list(zip((d.mT @ g.a).unbind(), d.sum(1).unbind()))
            else:
                sizes = [p.numel() for p in g.layers[0].params]
                per_layer = [row.split(sizes) for row in (w.to(g.rows) @ g.rows).unbind()]
            for layer, grads in zip(g.layers, per_layer):
                out += [(p, gr.reshape(p.shape).to(p.dtype)) for p, gr in zip(layer.params, grads)]
        if step.flat_params:
            flat = w.to(step.flat) @ step.flat
            offset = 0
            for p in step.flat_params:
                out.append((p, flat[offset:offset + p.numel()].reshape(p.shape).to(p.dtype)))
                offset += p.numel()
        return out
