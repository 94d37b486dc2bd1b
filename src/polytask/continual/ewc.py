"""Elastic Weight Consolidation (Kirkpatrick et al., PNAS 2017, "Overcoming catastrophic
forgetting in neural networks").

Eq. 3, extended to several earlier experiences as in the paper (one penalty per experience):

    L(θ) = L_B(θ) + Σ_{A earlier} Σ_i λ/2 · F_{A,i} (θ_i − θ*_{A,i})²

F_A is the diagonal of the Fisher information at θ*_A (the weights after experience A),
estimated on ``fisher_samples`` training samples of A as the mean of squared per-sample
gradients of log p(y|x). ``fisher="true"`` (default) draws y from the model's own predictive
distribution (the Fisher proper); ``fisher="empirical"`` uses the dataset labels.

The squared per-sample gradients are summed in closed form when the network is Linear layers
between sample-wise activations (the MLPs of the continual benchmarks): sample n's gradient of
a Linear weight is the outer product g_n a_nᵀ of the output gradient and the input, so

    Σ_n (g_n a_nᵀ)² = (G²)ᵀ (A²),   Σ_n g_n² for the bias,

from one forward and one backward pass over all samples, no per-sample gradient held. Other
models get them from one batched pass (``torch.func``: vmap over grad) where they allow it,
else from one backward pass per sample; the three give the same numbers.

The sum of quadratics is one quadratic, so it is kept consolidated: with S_i = Σ_A F_{A,i},

    Σ_A F_{A,i} (θ_i − θ*_{A,i})² = S_i (θ_i − m_i)² + c_i,
    m_i = Σ_A F_{A,i} θ*_{A,i} / S_i,   c_i = Σ_A F_{A,i} (θ*_{A,i} − m_i)² ≥ 0,

and a new experience (F, θ*) is folded in without cancellation: S' = S + F,
m' = m + (F / S')(θ* − m), c' = c + Σ_i S_i F_i (m_i − θ*_i)² / S'_i. Penalty and gradient
(λ S (θ − m), added straight to ``.grad`` after the backward pass) then cost one pass over
the parameters, whatever the number of experiences.

Checked against: ContinualAI/avalanche avalanche/training/plugins/ewc.py (``EWCPlugin``, mode
"separate": one (F_A, theta*_A) pair per experience, penalty lambda sum_A sum_i F_A,i
(theta_i - theta*_A,i)^2) and aimagelab/mammoth models/ewc_on.py (read; its online form).
No code by the paper's authors was found. The penalty structure is the same.
Deviations: both references omit the 1/2 of Eq. 3, so their lambda is our lambda / 2. Avalanche's
importance is the mean over minibatches of the squared minibatch-mean gradient of the loss with
the dataset labels, and mammoth's the squared per-sample gradient of log p(y_true|x) weighted by
p(y_true|x); we use per-sample squared gradients (the diagonal Fisher as the paper defines it),
with y drawn from the model by default (``fisher="empirical"`` gives the dataset-label version).
The consolidated single quadratic (above) gives the same penalty and gradient as the references'
sum over experiences.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.utils._pytree import tree_map

from polytask.continual.base import Strategy, grads_of, samplewise, trainable
from polytask.errors import PolytaskError
from polytask.registry import STRATEGIES
from polytask.tasks import Batch, MultiTaskData, Task
from polytask.trainer import Trainer

#: per-sample gradients held at once by the batched Fisher (chunk size × parameter count)
FISHER_CHUNK_ELEMENTS = 1 << 24
FISHER_METHODS = ("auto", "vmap", "loop")


def diagonal_fisher(model: nn.Module, tasks: list[Task], data: MultiTaskData, num_samples: int,
                    generator: torch.Generator, mode: str = "true", method: str = "auto") -> dict[str, Tensor]:
    """F_i = mean over samples of (∂/∂θ_i log p(y|x))², summed over the sample's labelled tasks.

    ``mode="true"`` draws each task's labels for all its labelled samples at once, in task
    order (for an experience that labels one task, the same draws as one sample at a time).
    ``method``: ``auto`` takes the closed form for Linear networks, else vmap, else the loop;
    ``vmap`` skips the closed form; ``loop`` forces one backward pass per sample.
    """
    if method not in FISHER_METHODS:
        raise PolytaskError(f"unknown Fisher method {method!r}; choose one of: {', '.join(FISHER_METHODS)}")
    params = trainable(model)
    n = min(num_samples, len(data))
    idx = torch.randperm(len(data), generator=generator)[:n]
    batch = next(data.subset(idx).batches(n))
    was_training = model.training
    model.eval()
    try:
        labels = _fisher_labels(model, tasks, batch, generator, mode)
        sums = _sq_grad_sums_linear(model, params, tasks, batch, labels) if method == "auto" else None
        if sums is None and method != "loop":
            sums = _sq_grad_sums_vmap(model, params, tasks, batch, labels)
        if sums is None:
            sums = _sq_grad_sums_loop(model, params, tasks, batch, labels)
    finally:
        model.train(was_training)
    return {name: s / n for (name, _), s in zip(params, sums)}


def _fisher_labels(model: nn.Module, tasks: list[Task], batch: Batch, generator: torch.Generator,
                   mode: str) -> dict[str, Tensor]:
    if mode != "true":
        return {t.name: batch.y[t.name] for t in tasks}
    with torch.no_grad():
        out = model(batch.x)
    labels = {}
    for t in tasks:
        y, m = batch.y[t.name].clone(), batch.mask[t.name]
        if bool(m.any()):
            y[m] = t.kind_impl.sample_labels(out[t.name][m], generator).to(y.dtype)
        labels[t.name] = y
    return labels


def _sq_grad_sums_linear(model: nn.Module, params: list[tuple[str, nn.Parameter]], tasks: list[Task], batch: Batch,
                         labels: dict[str, Tensor]) -> list[Tensor] | None:
    """Σ over samples of squared per-sample gradients as (G²)ᵀ(A²) per Linear layer; None unless the model
    is :func:`~polytask.continual.base.samplewise` and each Linear layer is called once, on [N, features]."""
    if not samplewise(model):
        return None  # parameters outside Linear layers, or a leaf that may mix samples or positions
    linears = [mod for mod in model.modules() if type(mod) is nn.Linear]
    owner = {id(p): (mod, kind) for mod in linears for kind, p in mod.named_parameters(recurse=False)}
    if not params or any(id(p) not in owner for _, p in params):
        return None
    inputs: dict[nn.Module, Tensor] = {}
    outputs: dict[nn.Module, Tensor] = {}
    eligible = True

    def record(mod: nn.Module, args: tuple[Any, ...], out: Tensor) -> None:
        nonlocal eligible
        eligible = eligible and mod not in outputs and isinstance(args[0], Tensor) and args[0].dim() == 2
        inputs[mod], outputs[mod] = args[0].detach(), out

    handles = [mod.register_forward_hook(record) for mod in linears]
    try:
        out = model(batch.x)
    finally:
        for h in handles:
            h.remove()
    if not eligible:
        return None  # a layer used twice (shared weights) or on sequences: per-sample gradients do not factor
    total = torch.zeros((), dtype=params[0][1].dtype)
    for t in tasks:
        loss = t.loss(out[t.name], labels[t.name])
        total = total + torch.where(batch.mask[t.name], loss, torch.zeros_like(loss)).sum()
    used = list(outputs)
    grads = dict(zip(used, torch.autograd.grad(total, [outputs[m] for m in used], allow_unused=True)))
    sums = []
    for _, p in params:
        mod, kind = owner[id(p)]
        g = grads.get(mod)
        if g is None:
            sums.append(torch.zeros_like(p))
        elif kind == "weight":
            sums.append(g.pow(2).T @ inputs[mod].pow(2))
        else:
            sums.append(g.pow(2).sum(0))
    return sums


def _sq_grad_sums_vmap(model: nn.Module, params: list[tuple[str, nn.Parameter]], tasks: list[Task], batch: Batch,
                       labels: dict[str, Tensor]) -> list[Tensor] | None:
    """Σ over samples of squared per-sample gradients from vmap(grad) in chunks; None if the model does not vmap."""
    weights = {name: p.detach() for name, p in params}
    masks = {t.name: batch.mask[t.name] for t in tasks}

    def sample_loss(w: dict[str, Tensor], x: Any, y: dict[str, Tensor], m: dict[str, Tensor]) -> Tensor:
        out = functional_call(model, w, (tree_map(lambda v: v.unsqueeze(0), x),))
        total = torch.zeros((), dtype=next(iter(w.values())).dtype)
        for t in tasks:
            loss = t.loss(out[t.name], y[t.name].unsqueeze(0)).sum()
            total = total + torch.where(m[t.name], loss, torch.zeros_like(loss))
        return total

    per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0, 0))
    size = sum(p.numel() for _, p in params)
    n = len(batch)
    chunk = max(1, min(n, FISHER_CHUNK_ELEMENTS // max(size, 1)))
    sums = [torch.zeros_like(p) for _, p in params]
    try:
        for start in range(0, n, chunk):
            sl = slice(start, start + chunk)
            g = per_sample(weights, tree_map(lambda v: v[sl], batch.x), {k: v[sl] for k, v in labels.items()},
                           {k: v[sl] for k, v in masks.items()})
            torch._foreach_add_(sums, [g[name].pow(2).sum(0) for name, _ in params])
    except (RuntimeError, NotImplementedError, TypeError):
        return None  # an op without a batching rule or data-dependent control flow: one sample at a time
    finally:
        reset = getattr(model, "reset_forward_state", None)
        if reset is not None:
            reset()
    return sums


def _sq_grad_sums_loop(model: nn.Module, params: list[tuple[str, nn.Parameter]], tasks: list[Task], batch: Batch,
                       labels: dict[str, Tensor]) -> list[Tensor]:
    """Σ over samples of squared per-sample gradients, one backward pass per sample."""
    sums = [torch.zeros_like(p) for _, p in params]
    for i in range(len(batch)):
        one = batch.subset(torch.tensor([i]))
        present = [t for t in tasks if bool(one.mask[t.name].any())]
        if not present:
            continue
        out = model(one.x)
        nll = sum(t.loss(out[t.name], labels[t.name][i:i + 1]).sum() for t in present)
        grads = torch.autograd.grad(nll, [p for _, p in params], allow_unused=True)
        for s, g in zip(sums, grads):
            if g is not None:
                s += g.detach() ** 2
    return sums


def quadratic_penalty(model: nn.Module, fisher: dict[str, Tensor], anchor: dict[str, Tensor]) -> Tensor:
    """Σ_i F_i (θ_i − θ*_i)²."""
    total = torch.zeros(())
    for name, p in model.named_parameters():
        if name in fisher:
            total = total + (fisher[name] * (p - anchor[name]) ** 2).sum()
    return total


def fold_quadratic(weight: dict[str, Tensor], centre: dict[str, Tensor], fisher: dict[str, Tensor],
                   anchor: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor], float]:
    """S (θ − m)² + F (θ − θ*)² = S' (θ − m')² + c: returns S' = S + F, m' and c = Σ S F (m − θ*)² / S'.

    c is accumulated in float64; where S' = 0 the centre is θ* (the term is zero either way).
    """
    new_weight, new_centre, offset = {}, {}, 0.0
    for k, f in fisher.items():
        s, total = weight[k], weight[k] + f
        safe = torch.where(total > 0, total, torch.ones_like(total))
        gap = anchor[k] - centre[k]
        new_weight[k] = total
        new_centre[k] = torch.where(total > 0, centre[k] + f / safe * gap, anchor[k])
        offset += float((s.double() * f.double() * gap.double() ** 2 / safe.double()).sum())
    return new_weight, new_centre, offset


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
        #: quadratics Σ_i F_i (θ_i − a_i)² as (F, a); :meth:`consolidate` keeps one, plus ``offset``
        self.anchors: list[tuple[dict[str, Tensor], dict[str, Tensor]]] = []
        self.offset = 0.0
        self.generator = torch.Generator()
        self._terms: list[tuple[list[nn.Parameter], list[Tensor], list[Tensor]]] = []

    def setup(self, scenario: Any, seed: int) -> None:
        super().setup(scenario, seed)
        self.generator.manual_seed(seed + 7919)

    def penalty(self, model: nn.Module) -> Tensor:
        """λ/2 Σ_A Σ_i F_{A,i} (θ_i − θ*_{A,i})² (the consolidated quadratic plus its constant)."""
        total = sum((quadratic_penalty(model, f, a) for f, a in self.anchors), torch.zeros(()))
        return self.lam / 2 * (total + self.offset)

    def before_fit(self, trainer: Trainer) -> None:
        params = dict(trainable(trainer.model))
        self._terms = [([params[n] for n in f if n in params], [f[n] for n in f if n in params],
                        [a[n] for n in f if n in params]) for f, a in self.anchors]

    def after_backward(self, trainer: Trainer, batch: Batch) -> None:
        """Add the penalty's gradient λ Σ F (θ − a) to ``.grad`` (one fused pass over the parameters)."""
        for params, fisher, anchor in self._terms:
            diff = torch._foreach_sub([p.detach() for p in params], anchor)
            torch._foreach_addcmul_(grads_of(params), fisher, diff, value=self.lam)

    def after_fit(self, trainer: Trainer) -> None:
        assert self.scenario is not None
        data = self.scenario[self.current].train
        fisher = diagonal_fisher(trainer.model, self.current_tasks, data, self.fisher_samples,
                                 self.generator, self.fisher_mode)
        self.consolidate(fisher, {n: p.detach().clone() for n, p in trainable(trainer.model)})

    def consolidate(self, fisher: dict[str, Tensor], anchor: dict[str, Tensor]) -> None:
        """Fold experience (F, θ*) into the one consolidated quadratic."""
        for f, a in self.anchors:
            fisher, anchor, offset = fold_quadratic(f, a, fisher, anchor)
            self.offset += offset
        self.anchors = [(fisher, anchor)]

    def state_tensors(self) -> dict[str, Tensor]:
        out = {"rng": self.generator.get_state()}
        for i, (f, a) in enumerate(self.anchors):
            out.update({f"fisher/{i}/{k}": v for k, v in f.items()})
            out.update({f"anchor/{i}/{k}": v for k, v in a.items()})
        return out

    def state_meta(self) -> dict[str, Any]:
        return {**super().state_meta(), "anchors": len(self.anchors), "offset": self.offset}

    def load_state(self, tensors: dict[str, Tensor], meta: dict[str, Any], model: nn.Module) -> None:
        super().load_state(tensors, meta, model)
        self.generator.set_state(tensors["rng"])
        self.offset = float(meta.get("offset", 0.0))  # runs saved before consolidation kept one quadratic each
        self.anchors = []
        for i in range(int(meta["anchors"])):
            f = {k.split("/", 2)[2]: v for k, v in tensors.items() if k.startswith(f"fisher/{i}/")}
            a = {k.split("/", 2)[2]: v for k, v in tensors.items() if k.startswith(f"anchor/{i}/")}
            self.anchors.append((f, a))
