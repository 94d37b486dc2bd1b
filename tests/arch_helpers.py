"""Helpers shared by the architecture tests: per-parameter gradients of one loss, fixed labels."""

from __future__ import annotations

import torch


def grads_of(model, loss):
    """Gradients of ``loss`` per parameter name (None where it does not reach)."""
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: (None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()}


def nonzero(g) -> bool:
    return g is not None and bool(g.abs().sum() > 0)


def names_of(model, params):
    ids = {id(p) for p in params}
    return [n for n, p in model.named_parameters() if id(p) in ids]


def abc_losses(tasks, out, batch: int):
    """Mean losses of the binary 'a', 3-class 'b' and regression 'c' test tasks on fixed random labels."""
    g = torch.Generator().manual_seed(1)
    y = {"a": torch.randint(0, 2, (batch,), generator=g).float(), "b": torch.randint(0, 3, (batch,), generator=g),
         "c": torch.randn(batch, generator=g)}
    return {t.name: t.loss(out[t.name], y[t.name]).mean() for t in tasks}
