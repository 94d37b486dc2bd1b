"""Backbones: the shared, task-agnostic encoder that maps raw inputs to a vector.

Every architecture puts its shared and task-specific blocks on top of a backbone's
``out_dim``-sized output. The default backbone follows the input kind.
"""

from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import Tensor, nn

from polytask.errors import PolytaskError
from polytask.registry import BACKBONES
from polytask.tasks import InputSpec

DEFAULT_BACKBONE = {"dense": "identity", "features": "identity", "image": "cnn", "recsys": "embedding",
                    "tokens": "minilm"}


def mlp(in_dim: int, hidden: Sequence[int], activation: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    """A stack of Linear + activation layers (no output layer)."""
    if any(not isinstance(h, int) or h < 1 for h in hidden):
        raise PolytaskError(f"layer sizes must be positive whole numbers, got {list(hidden)}; give sizes such as [64, 32]")
    layers: list[nn.Module] = []
    for h in hidden:
        layers += [nn.Linear(in_dim, h), activation()]
        in_dim = h
    return nn.Sequential(*layers)


@BACKBONES.register("identity")
class Identity(nn.Module):
    """Pass dense vectors or precomputed features through unchanged (MMoE's raw-input setting)."""

    def __init__(self, spec: InputSpec) -> None:
        super().__init__()
        if spec.kind not in ("dense", "features"):
            raise PolytaskError(f"backbone 'identity' takes dense or feature inputs, not {spec.kind}; use backbone 'cnn' for images or 'embedding' for recsys")
        self.out_dim = spec.dim

    def forward(self, x: Tensor) -> Tensor:
        return x


@BACKBONES.register("cnn")
class SmallCNN(nn.Module):
    """A small conv net for small images: conv-relu-pool blocks, then global average pooling."""

    def __init__(self, spec: InputSpec, *, channels: Sequence[int] = (32, 64)) -> None:
        super().__init__()
        if spec.kind != "image":
            raise PolytaskError(f"backbone 'cnn' takes image inputs, not {spec.kind}; "
                                "omit backbone= to use the default for this suite")
        c_in = spec.shape[0]
        blocks: list[nn.Module] = []
        for c in channels:
            blocks += [nn.Conv2d(c_in, c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True)]
            c_in = c
        self.net = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.out_dim = c_in

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


@BACKBONES.register("embedding")
class RecsysEmbedding(nn.Module):
    """Recommender input layer: one embedding per categorical field, mean-pooled behaviour
    sequences (one shared item table, padding id 0) and dense features, concatenated."""

    def __init__(self, spec: InputSpec, *, embedding_dim: int = 16) -> None:
        super().__init__()
        if spec.kind != "recsys":
            raise PolytaskError(f"backbone 'embedding' takes recsys inputs, not {spec.kind}; "
                                "omit backbone= to use the default for this suite")
        self.fields = nn.ModuleList(nn.Embedding(v, embedding_dim) for v in spec.field_vocab)
        self.items = nn.Embedding(max(spec.item_vocab, 1), embedding_dim, padding_idx=0)
        self.embedding_dim = embedding_dim
        self.out_dim = embedding_dim * (len(spec.field_vocab) + len(spec.seq_names)) + spec.dense_dim

    def field_embeddings(self, x: dict[str, Tensor]) -> Tensor:
        """[B, F, E] embeddings of the categorical fields."""
        return torch.stack([emb(x["fields"][:, i]) for i, emb in enumerate(self.fields)], 1)

    def sequence_embeddings(self, x: dict[str, Tensor]) -> Tensor:
        """[B, S, L, E] item embeddings of each behaviour sequence (zeros at padding)."""
        return self.items(x["seqs"])

    def forward(self, x: dict[str, Tensor]) -> Tensor:
        parts = [self.field_embeddings(x).flatten(1)]
        if "seqs" in x:
            seq = self.sequence_embeddings(x)
            count = (x["seqs"] > 0).sum(-1, keepdim=True).clamp(min=1)
            parts.append((seq.sum(2) / count).flatten(1))
        if "dense" in x:
            parts.append(x["dense"])
        return torch.cat(parts, 1)


#: a backbone by registered name, or a ready module with an ``out_dim`` (e.g. a pretrained body)
Backbone = Union[str, nn.Module]


def build_backbone(spec: InputSpec, name: Backbone = "auto", **options: object) -> nn.Module:
    """Create the backbone ``name`` (``auto`` picks the default for the input kind); a module is used as is."""
    if isinstance(name, nn.Module):
        if options:
            raise PolytaskError("backbone options apply to a backbone given by name, not to a module")
        if not isinstance(getattr(name, "out_dim", None), int):
            raise PolytaskError(f"a backbone module must have an integer out_dim; {type(name).__name__} has none")
        return name
    if name == "auto":
        name = DEFAULT_BACKBONE[spec.kind]
    return BACKBONES.create(name, spec, **options)


import polytask.models.pretrained  # noqa: E402,F401  (registers minilm and efficientnet-lite0)
