"""Shared machinery of the mergers that learn coefficients from data (AdaMerging, aTLAS).

Both learn θ(Λ) = θ_0 + Σ_t Σ_b λ_t^b τ_t^b, one coefficient per task vector t and per block b
(a block is one tensor of the state dict; AdaMerging's task-wise variant uses one block for
all tensors), by running the model functionally (``torch.func.functional_call``) on merged
parameters and minimising a loss with AdamW (weight decay 0, AdaMerging's setting, is plain
Adam). With ``bounds`` the coefficients are clamped inside the forward pass, θ(clamp(Λ)), while
the raw parameter moves freely (``lambdas()`` in AdaMerging's ``main_*_adamerging.py``); the
gradient of a coefficient outside the bounds is then zero. The loop is deterministic for a given seed.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

from polytask.errors import PolytaskError
from polytask.merging.base import Forward, MergeData, Merger
from polytask.merging.taskvector import ModelSource, is_mergeable, open_models


def default_forward(model: nn.Module, params: dict[str, Tensor], x: Tensor, task: int) -> Tensor:
    """Run ``model`` with ``params``; a dict output (one head per task) gives its ``task``-th entry."""
    out = functional_call(model, params, (x,))
    if isinstance(out, Mapping):
        out = list(out.values())[task]
    return out


def entropy(logits: Tensor) -> Tensor:
    """Mean Shannon entropy H(p) = −Σ_c p_c log p_c of the softmax predictions."""
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(dim=-1).mean()


def model_and_batches(method: str, data: MergeData | None, batches: str) -> tuple[nn.Module, Sequence[Iterable[Any]]]:
    """``data.model`` and ``data.batches``, or a one-line error saying what ``method`` needs (``batches``: which)."""
    if data is None or data.model is None or data.batches is None:
        raise PolytaskError(f"{method} needs data=MergeData(model=..., batches=...): the network the checkpoints "
                            f"belong to and {batches}")
    return data.model, data.batches


def as_batch_lists(data: Sequence[Iterable[Any]], n_tasks: int | None = None) -> list[list[Any]]:
    """Materialise each task's (small) iterable of batches so every step can cycle through it."""
    lists = [list(d) for d in data]
    if not lists or any(len(b) == 0 for b in lists):
        raise PolytaskError("data must hold at least one batch per task; pass a list with one list of batches per task")
    if n_tasks is not None and len(lists) != n_tasks:
        raise PolytaskError(f"data must hold one list of batches per fine-tuned model ({n_tasks}); got {len(lists)}")
    return lists


class TaskVectorStack:
    """The base and the stacked task vectors of every mergeable tensor, ready for θ(Λ)."""

    def __init__(self, base: ModelSource, finetuned: Sequence[ModelSource], model: nn.Module) -> None:
        base_ck, models = open_models(base, finetuned)
        names = set(model.state_dict())
        self.base_ck = base_ck
        self.keys = [k for k in base_ck.keys() if is_mergeable(base_ck.meta(k)[1])]
        missing = next((k for k in self.keys if k not in names), None)
        if missing is not None:
            raise PolytaskError(f"tensor {missing!r} of the checkpoints is not a parameter or buffer of the model; "
                                f"pass the module the checkpoints were saved from")
        self.base = {k: base_ck.get(k).float() for k in self.keys}
        self.tau = {k: torch.stack([m.get(k).float() - self.base[k] for m in models]) for k in self.keys}
        self.n_tasks = len(models)

    def params(self, coef: Tensor) -> dict[str, Tensor]:
        """θ_0^b + Σ_t coef[t, b] τ_t^b for each block b (``coef`` is (T, blocks) with blocks 1 or len(keys))."""
        coef = coef.expand(self.n_tasks, len(self.keys))
        out = {}
        for j, k in enumerate(self.keys):
            tau = self.tau[k]
            out[k] = self.base[k] + (coef[:, j].reshape(-1, *([1] * (tau.dim() - 1))) * tau).sum(0)
        return out

    def state_dict(self, coef: Tensor) -> dict[str, Tensor]:
        """The merged state dict, every tensor in its checkpoint dtype."""
        with torch.no_grad():
            merged = self.params(coef)
        return {k: merged[k].to(self.base_ck.meta(k)[1]) if k in merged else self.base_ck.get(k)
                for k in self.base_ck.keys()}


def learn_coefficients(stack: TaskVectorStack, model: nn.Module, batches: list[list[Any]],
                       loss_fn: Callable[[Tensor, Any], Tensor], *, blocks: int, init: float, steps: int,
                       lr: float, seed: int, forward: Forward | None = None,
                       bounds: tuple[float, float] | None = None,
                       weight_decay: float = 0.0) -> tuple[Tensor, list[float]]:
    """AdamW on the (T, blocks) coefficients; each step sums ``loss_fn(logits, batch)`` over the tasks.

    ``bounds`` clamps the coefficients in the forward pass. Returns (effective, i.e. clamped,
    coefficients, loss per step).
    """
    call = forward or default_forward
    coef = torch.full((stack.n_tasks, blocks), float(init), requires_grad=True)
    opt = torch.optim.AdamW([coef], lr=lr, weight_decay=weight_decay)

    def effective(raw: Tensor) -> Tensor:
        return raw if bounds is None else raw.clamp(*bounds)

    history: list[float] = []
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for step in range(steps):
            params = stack.params(effective(coef))
            loss = torch.zeros(())
            for t, task_batches in enumerate(batches):
                batch = task_batches[step % len(task_batches)]
                x = batch[0] if isinstance(batch, (tuple, list)) else batch
                loss = loss + loss_fn(call(model, params, x, t), batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
            history.append(float(loss.detach()))
    model.train(was_training)
    return effective(coef.detach()), history


class CoefficientMerger(Merger):
    """Base of the mergers that learn task-vector coefficients on data (AdaMerging, aTLAS).

    Keeps the optimisation settings and, after :meth:`fit`, the learned ``coefficients``
    [T, blocks], the loss ``history`` and the parameter ``keys`` the blocks follow.
    """

    def __init__(self, *, init: float, steps: int, lr: float, seed: int, weight_decay: float = 0.0) -> None:
        self.init, self.steps, self.lr, self.seed = float(init), int(steps), float(lr), int(seed)
        self.weight_decay = float(weight_decay)
        self.coefficients: Tensor | None = None
        self.history: list[float] = []
        self.keys: list[str] = []

    def fit(self, stack: TaskVectorStack, model: nn.Module, batches: list[list[Any]],
            loss_fn: Callable[[Tensor, Any], Tensor], *, blocks: int, forward: Forward | None,
            bounds: tuple[float, float] | None = None) -> dict[str, Tensor]:
        """Learn the coefficients with :func:`learn_coefficients`; return the merged state dict."""
        self.coefficients, self.history = learn_coefficients(
            stack, model, batches, loss_fn, blocks=blocks, init=self.init, steps=self.steps, lr=self.lr,
            seed=self.seed, forward=forward, bounds=bounds, weight_decay=self.weight_decay)
        self.keys = stack.keys
        return stack.state_dict(self.coefficients)
