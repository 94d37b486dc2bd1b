"""The Fuser base class, the fused model it builds, and that model on a merge suite.

A merger turns N fine-tuned models into one set of weights; a fuser keeps every expert and
combines their *outputs* at inference, per sample (per token for a sequence of logits). It is the
upper bound of the merge route that pays for what merging avoids: N models stored and run.

A fuser is a pure rule on logits in two steps: :meth:`Fuser.weights` gives each expert's weight for
each sample, ``[..., T]``, and :meth:`Fuser.combine` the fused logits ``[..., C]`` from them
(:meth:`Fuser.fuse` does both), with ``experts`` of shape ``[T, ..., C]`` and ``base`` (the pretrained
model's logits, read only by rules that declare :attr:`Fuser.needs_base`) of shape ``[..., C]``.
:class:`FusedModel` runs the models and applies the rule;
:func:`fuse_suite` builds one fused classifier per task of a merge suite: each expert is a
fine-tuned body with the task's own head (the head every merged body is scored with), the base is
the pretrained body with that head.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Sequence

import torch
from safetensors.torch import load_file
from torch import Tensor, nn
from torch.func import functional_call

from polytask.errors import PolytaskError
from polytask.merging.suites import MergeSuite
from polytask.registry import FUSERS


class Fuser:
    """Base class: fuse the logits of T expert models (and, where declared, the base model) per sample."""

    #: Whether :meth:`fuse` reads the base model's logits (then the base is kept and run too).
    needs_base: ClassVar[bool] = False

    def weights(self, base: Tensor | None, experts: Tensor) -> Tensor:
        """The weight of each expert for each sample, ``[..., T]``."""
        raise NotImplementedError

    def combine(self, base: Tensor | None, experts: Tensor, weights: Tensor) -> Tensor:
        """The fused logits ``[..., C]`` under per-sample expert ``weights`` ``[..., T]``."""
        raise NotImplementedError

    def fuse(self, base: Tensor | None, experts: Tensor) -> Tensor:
        """The fused logits, ``[..., C]``."""
        return self.combine(base, experts, self.weights(base, experts))

    def check(self, base: Tensor | None, experts: Tensor) -> None:
        """A one-line error for no experts, experts of different shapes, or a missing or mismatched base."""
        check_logits(base, experts, self.needs_base, type(self).__name__)


class UniformFuser(Fuser):
    """An output ensemble: every expert weighs 1/T on every sample; subclasses define :meth:`combine`."""

    def weights(self, base: Tensor | None, experts: Tensor) -> Tensor:
        self.check(base, experts)
        return torch.full((*experts.shape[1:-1], experts.shape[0]), 1.0 / experts.shape[0], dtype=experts.dtype)


def check_logits(base: Tensor | None, experts: Tensor, needs_base: bool, who: str) -> None:
    if experts.dim() < 2 or experts.shape[0] == 0:
        raise PolytaskError(f"{who} needs the logits of at least one expert stacked as [T, ..., classes], "
                            f"got shape {tuple(experts.shape)}")
    if needs_base and base is None:
        raise PolytaskError(f"{who} reads the base model's logits; pass base=")
    if base is not None and tuple(base.shape) != tuple(experts.shape[1:]):
        raise PolytaskError(f"{who}: the base logits have shape {tuple(base.shape)} but each expert's have "
                            f"{tuple(experts.shape[1:])}; every model must score the same samples and classes")


def stack_logits(outputs: Sequence[Tensor], who: str) -> Tensor:
    """The experts' logits as one ``[T, ..., C]`` tensor, or a one-line error naming the first mismatch."""
    if not outputs:
        raise PolytaskError(f"{who} got no experts; pass at least one fine-tuned model")
    for i, out in enumerate(outputs[1:], 1):
        if out.shape != outputs[0].shape:
            raise PolytaskError(f"{who}: expert {i} gives logits of shape {tuple(out.shape)} but expert 0 gives "
                                f"{tuple(outputs[0].shape)}; fuse models with the same classes")
    return torch.stack(list(outputs))


class FusedModel(nn.Module):
    """The base (if the rule reads it) and every expert, run on the same input; returns the fused logits."""

    def __init__(self, fuser: Fuser, experts: Sequence[nn.Module], base: nn.Module | None = None) -> None:
        super().__init__()
        who = type(fuser).__name__
        if len(experts) == 0:
            raise PolytaskError(f"{who} got no experts; pass at least one fine-tuned model")
        if fuser.needs_base and base is None:
            raise PolytaskError(f"{who} reads the base model's logits; pass the pretrained model as base")
        self.fuser = fuser
        self.experts = nn.ModuleList(experts)
        self.base = base if fuser.needs_base else None

    def logits(self, x: Any) -> tuple[Tensor | None, Tensor]:
        """(base logits or None, the experts' logits ``[T, ..., C]``) on ``x``."""
        who = type(self.fuser).__name__
        experts = stack_logits([e(x) for e in self.experts], who)
        base = self.base(x) if self.base is not None else None
        self.fuser.check(base, experts)
        return base, experts

    def forward(self, x: Any) -> Tensor:
        return self.fuser.fuse(*self.logits(x))

    def weights(self, x: Any) -> Tensor:
        """Each expert's weight for each sample of ``x``, ``[..., T]``."""
        return self.fuser.weights(*self.logits(x))


def create_fuser(method: str | Fuser, **options: Any) -> Fuser:
    return method if isinstance(method, Fuser) else FUSERS.create(method, **options)


def fuse_models(method: str | Fuser, base: nn.Module | None, finetuned: Sequence[nn.Module],
                **options: Any) -> FusedModel:
    """Fuse models that return logits: ``fuse_models("dlf", base, [expert_1, ...])``."""
    return FusedModel(create_fuser(method, **options), finetuned, base)


class _SuiteNet(nn.Module):
    """A merge suite's body run with one model's merged tensors, then one task's head."""

    def __init__(self, body: nn.Module, params: dict[str, Tensor], head: nn.Module) -> None:
        super().__init__()
        self.body, self.params, self.head = body, params, head

    def forward(self, x: Tensor) -> Tensor:
        return self.head(functional_call(self.body, self.params, (x,)))


def fuse_suite(suite: MergeSuite, method: str | Fuser, **options: Any) -> dict[str, FusedModel]:
    """One fused classifier per task of a merge suite: every fine-tuned body (and the base where the rule
    reads it) with that task's own head. The fine-tuned tensors are loaded once and shared by the tasks."""
    fuser = create_fuser(method, **options)
    tuned = [_load(suite.model_path(t)) for t in suite.tasks]
    base = _load(suite.base_path) if fuser.needs_base else None
    out = {}
    for t in suite.tasks:
        head = suite.heads[t]
        experts = [_SuiteNet(suite.body, p, head) for p in tuned]
        out[t] = FusedModel(fuser, experts, _SuiteNet(suite.body, base, head) if base is not None else None)
    return out


def kept_parameters(suite: MergeSuite, fuser: Fuser) -> tuple[int, int]:
    """(models kept, parameters kept) by a fuser on ``suite``: the body's frozen part once, the fine-tuned
    tensors of every expert (and of the base if the rule reads it), and the task heads."""
    body = sum(p.numel() for p in suite.body.parameters())
    tuned = int(suite.meta["merged_parameters"])
    heads = sum(p.numel() for h in suite.heads.values() for p in h.parameters())
    models = len(suite.tasks) + int(fuser.needs_base)
    return models, body + (models - 1) * tuned + heads


def _load(path: Path) -> dict[str, Tensor]:
    return load_file(str(path))
