"""Helpers shared by the architecture tests: inputs, per-parameter gradients of one loss, fixed labels."""

from __future__ import annotations

import torch
from torch import nn

from polytask.models.arch._experts import FeatureGate
from polytask.tasks import InputSpec


def example_inputs(spec: InputSpec, batch: int, seed: int = 0):
    """Random inputs of ``spec`` (dense, image, recsys or tokens) for ``batch`` samples."""
    if spec.kind == "tokens":
        from hf_helpers import token_inputs

        return token_inputs(batch, spec.seq_len, seed)
    g = torch.Generator().manual_seed(seed)
    if spec.kind == "dense":
        return torch.randn(batch, spec.dim, generator=g)
    if spec.kind == "image":
        return torch.randn(batch, *spec.shape, generator=g)
    return {"fields": torch.stack([torch.randint(0, v, (batch,), generator=g) for v in spec.field_vocab], 1),
            "seqs": torch.randint(0, spec.item_vocab, (batch, len(spec.seq_names), spec.seq_len), generator=g),
            "dense": torch.randn(batch, spec.dense_dim, generator=g)}


def open_feature_gates(model: nn.Module) -> nn.Module:
    """Start HoME's feature gates away from the identity, so every weight gets gradient."""
    for m in model.modules():
        if isinstance(m, FeatureGate):
            nn.init.normal_(m.up.weight, std=0.5)
    return model


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
