"""Shared plumbing of the prompt-based learners (L2P, DualPrompt, CODA-Prompt) on a frozen encoder.

* :func:`frozen_encoder`: the encoder prompts are read against. By default the run's
  architecture's backbone (``--backbone minilm`` / ``efficientnet-lite0`` gives a frozen
  pretrained one); ``encoder=<backbone name>`` builds a named pretrained encoder instead, with
  ``image_shape=[C,H,W]`` for scenarios whose images come flattened (split-mnist: [1,28,28]).
  Either way its weights are frozen and it stays in eval mode.
* :func:`prefix_attention`: how a prompt reaches a frozen *feature vector*. The encoders here
  return one pooled vector, so there is no ViT layer to prefix; a prompt of length L is split,
  as in prefix-tuning, into L/2 keys and L/2 values prepended to the feature's own key and value
  in a parameter-free single-query attention (identity projections):

      PA(h; P_k, P_v) = Σ_j softmax_j(<h, k_j> / √d) v_j,   k = [P_k; h],  v = [P_v; h],

  so with no prompt PA(h) = h (the frozen feature) and a prompt moves the representation by an
  input-dependent mixture of its values. This is the deviation from DualPrompt and CODA-Prompt,
  which prefix the keys and values of several MSA layers of a frozen ViT.
* :class:`PromptModel`: frozen encoder + one linear head per task, with the class-incremental
  train-time mask of logits outside the current experience (the authors' ``train_mask``).
* :class:`PromptStrategy`: builds the model, sets and clears that mask around every fit.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from polytask.continual.base import Strategy
from polytask.errors import PolytaskError
from polytask.models.arch.base import AuxiliaryLoss
from polytask.models.backbones import build_backbone
from polytask.tasks import Inputs, InputSpec, Task
from polytask.trainer import Trainer


class Reshaped(nn.Module):
    """Feed flattened rows to an image encoder as [B, *shape]."""

    def __init__(self, encoder: nn.Module, shape: Sequence[int]) -> None:
        super().__init__()
        self.encoder, self.shape, self.out_dim = encoder, tuple(shape), int(encoder.out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.encoder(x.reshape(len(x), *self.shape))


def frozen_encoder(default: Callable[[], nn.Module], spec: InputSpec, encoder: str | None,
                   encoder_options: dict[str, Any] | None, image_shape: Sequence[int] | None, strategy: str) -> nn.Module:
    """The frozen encoder a prompt learner reads: the run's backbone, or the pretrained ``encoder`` by name."""
    if encoder is None:
        backbone = getattr(default(), "backbone", None)
        if backbone is None or not hasattr(backbone, "out_dim"):
            raise PolytaskError(f"{strategy} needs an architecture with a .backbone (e.g. shared-bottom) "
                                "or encoder=<backbone name>")
    else:
        if image_shape is not None:
            shape = tuple(int(s) for s in image_shape)
            if spec.kind != "dense" or math.prod(shape) != spec.dim:
                raise PolytaskError(f"image_shape {list(shape)} does not match the scenario's {spec.kind} inputs of "
                                    f"dim {spec.dim}; pass a shape whose product is the input dim")
            backbone = Reshaped(build_backbone(InputSpec("image", shape=shape), encoder, **(encoder_options or {})), shape)
        else:
            backbone = build_backbone(spec, encoder, **(encoder_options or {}))
    backbone.requires_grad_(False)
    backbone.eval()
    return backbone


def prefix_attention(h: Tensor, keys: Tensor, values: Tensor) -> Tensor:
    """PA(h; P_k, P_v): h [B, d] attends over [P_k; h] with values [P_v; h]; P_k, P_v [B, L, d] or [L, d]."""
    if keys.dim() == 2:
        keys, values = keys.expand(len(h), -1, -1), values.expand(len(h), -1, -1)
    k = torch.cat([keys, h[:, None]], 1)
    v = torch.cat([values, h[:, None]], 1)
    w = (torch.einsum("bld,bd->bl", k, h) / math.sqrt(h.shape[-1])).softmax(1)
    return torch.einsum("bl,bld->bd", w, v)


def split_prefix(prompt: Tensor) -> tuple[Tensor, Tensor]:
    """A [..., L, d] prompt as prefix keys (first L/2 rows) and values (last L/2)."""
    half = prompt.shape[-2] // 2
    return prompt[..., :half, :], prompt[..., half:, :]


class PromptModel(AuxiliaryLoss):
    """A frozen encoder plus one linear head per task; subclasses turn queries into features."""

    def __init__(self, backbone: nn.Module, tasks: Sequence[Task], head_dim: int | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.backbone.requires_grad_(False)
        self.backbone.eval()
        self.dim = int(backbone.out_dim)
        self.heads = nn.ModuleDict({t.name: nn.Linear(head_dim or self.dim, t.out_dim) for t in tasks})
        self.train_classes: dict[str, list[int]] = {}
        # masked columns: -inf for softmax heads; 0 (a constant, no gradient) for independent sigmoids,
        # where -inf would make the loss of a positive label infinite (as MULTI-LANE's authors do)
        self.fill = {t.name: 0.0 if t.kind == "multilabel" else float("-inf") for t in tasks}

    def train(self, mode: bool = True) -> PromptModel:
        super().train(mode)
        self.backbone.eval()  # frozen: no dropout, no statistics updates
        return self

    def query(self, x: Inputs) -> Tensor:
        """q(x): the frozen encoder's feature (no gradient)."""
        with torch.no_grad():
            return self.backbone(x)

    def read_out(self, h: Tensor) -> dict[str, Tensor]:
        """Head logits; in training, classes outside ``train_classes`` are masked (-inf, or 0 for multi-label)."""
        out = {}
        for name, head in self.heads.items():
            logits = head(h)
            cols = self.train_classes.get(name)
            if self.training and cols:
                keep = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
                keep[cols] = True
                logits = logits.masked_fill(~keep, self.fill[name])
            out[name] = logits
        return out


class PromptStrategy(Strategy):
    """Builds a :class:`PromptModel` on the frozen encoder; sets the class-incremental train mask per fit."""

    name = "prompt"

    def __init__(self, *, encoder: str | None = None, encoder_options: dict[str, Any] | None = None,
                 image_shape: Sequence[int] | None = None, train_mask: bool = True) -> None:
        super().__init__()
        self.encoder, self.encoder_options, self.image_shape = encoder, encoder_options, image_shape
        self.train_mask = train_mask
        self.model: PromptModel | None = None

    def make_model(self, backbone: nn.Module) -> PromptModel:  # pragma: no cover - abstract
        raise NotImplementedError

    def build_model(self, default: Callable[[], nn.Module]) -> nn.Module:
        assert self.scenario is not None
        backbone = frozen_encoder(default, self.scenario.input_spec, self.encoder, self.encoder_options,
                                  self.image_shape, self.name)
        self.model = self.make_model(backbone)
        return self.model

    def before_fit(self, trainer: Trainer) -> None:
        assert self.scenario is not None and self.model is not None
        exp = self.scenario[self.current]
        if (self.train_mask and not self.scenario.task_free and self.scenario.kind == "class-incremental"
                and exp.classes):
            self.model.train_classes = {name: list(exp.classes) for name in exp.tasks}
        else:
            self.model.train_classes = {}

    def after_fit(self, trainer: Trainer) -> None:
        assert self.model is not None
        self.model.train_classes = {}
