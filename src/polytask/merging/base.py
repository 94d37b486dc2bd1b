"""The Merger base class, what a merger declares it needs, and the streaming file merge.

A merger is called one way, ``merge(base, finetuned, data=None)``. It declares as class attributes
what it needs beyond the checkpoints (:attr:`Merger.needs`, from :data:`NEEDS`), which λ values
a benchmark should try (:attr:`Merger.lambda_grid`) and, per suite size class, option defaults and
how much data to hand over; a harness reads these and fills a :class:`MergeData`, so it knows no
merger by name.

A data-free merger is a per-tensor rule. Task-vector methods implement
``merge_tensor(name, base, deltas)`` (τ_t = θ_t − θ_0 as deltas); weight-space methods
(averaging, Fisher merging) override ``merge_models(name, base, models)`` instead. Both see
float32 tensors (float64 for float64 models) and the result is cast back to the base dtype.
Integer and bool tensors (e.g. BatchNorm step counters) are copied from the base.

Merging reads one key at a time from every input (memory-mapped safetensors), so peak memory
is about one merged model plus one tensor per input. Inputs are never written to: an in-place
write into a tensor of a memory-mapped file would copy its pages into private memory for as
long as the file stays open; :func:`merge_files` then writes the
result atomically. The in-memory :meth:`Merger.merge` runs the very same loop, so both give
identical bits.
"""

from __future__ import annotations

import json
import os
import time
import zlib
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from polytask.errors import PolytaskError
from polytask.io import save_safetensors
from polytask.merging.taskvector import Checkpoint, ModelSource, compute_dtype, is_mergeable, open_models
from polytask.registry import MERGERS


#: What a merger may need besides the checkpoints: ``fisher`` (a diagonal Fisher per fine-tuned model),
#: ``unlabeled`` (unlabeled input batches per task, e.g. test inputs), ``labeled`` (a few (x, y) batches
#: per task) or ``routing`` (a few input batches per task, their task id as the label).
NEEDS = frozenset({"fisher", "unlabeled", "labeled", "routing"})
#: The needs met by batches in :attr:`MergeData.batches` (a merger has at most one).
BATCH_NEEDS = frozenset({"unlabeled", "labeled", "routing"})
#: Suite size classes, cheapest first; they key :attr:`Merger.suite_defaults` and :attr:`Merger.data_sizes`.
SIZE_CLASSES = ("small", "vision", "text")

#: ``forward(model, params, x, task_index) -> logits`` of that task's head on the model run with ``params``
Forward = Callable[[nn.Module, dict[str, Tensor], Tensor, int], Tensor]


@dataclass
class MergeData:
    """What a merger gets besides the checkpoints; which fields it reads follows its :attr:`Merger.needs`."""

    model: nn.Module | None = None                       # the network the checkpoints belong to
    batches: Sequence[Iterable[Any]] | None = None       # one list of batches per task: inputs x or (x, y)
    forward: Forward | None = None                       # default: run ``model``, a dict output gives its t-th entry
    features: Callable[[Tensor], Tensor] | None = None   # router input φ(x); default: the flattened input
    fishers: Sequence[ModelSource] | None = None         # one diagonal Fisher per fine-tuned model


class Merger:
    """Base class: combine a base model and N fine-tuned models into one set of weights."""

    #: Subset of :data:`NEEDS`; empty for a data-free rule.
    needs: ClassVar[frozenset[str]] = frozenset()
    #: False when ``merge`` needs batches (set from :attr:`needs`; Fisher merging takes Fishers as an option too).
    data_free: ClassVar[bool] = True
    #: Values of the option ``lam`` a benchmark tries on the validation split; empty: λ is not tuned.
    lambda_grid: ClassVar[tuple[float, ...]] = ()
    #: Per size class (:data:`SIZE_CLASSES`): options a benchmark uses instead of the constructor's defaults.
    suite_defaults: ClassVar[Mapping[str, Mapping[str, Any]]] = {}
    #: Per size class: (batches per task, None for all; batch size) of the data a benchmark hands over.
    data_sizes: ClassVar[Mapping[str, tuple[int | None, int]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.needs <= NEEDS or len(cls.needs & BATCH_NEEDS) > 1:
            raise TypeError(f"{cls.__name__}.needs must be a subset of {sorted(NEEDS)} with at most one of "
                            f"{sorted(BATCH_NEEDS)}, not {sorted(cls.needs)}")
        if cls.needs and set(cls.data_sizes) != set(SIZE_CLASSES):
            raise TypeError(f"{cls.__name__} needs data: give data_sizes for each size class {SIZE_CLASSES}")
        cls.data_free = not cls.needs & BATCH_NEEDS

    def merge_tensor(self, name: str, base: Tensor, deltas: list[Tensor]) -> Tensor:
        """Merged weights of tensor ``name`` from the base and the task vectors' entries (``deltas`` may be
        modified in place)."""
        raise NotImplementedError(f"{type(self).__name__} implements neither merge_tensor nor merge_models")

    def merge_models(self, name: str, base: Tensor, models: list[Tensor]) -> Tensor:
        """Merged weights of tensor ``name`` from the base and the fine-tuned weights."""
        return self.merge_tensor(name, base, [m - base for m in models])

    def prepare(self, base: Checkpoint, models: Sequence[Checkpoint], data: MergeData | None) -> None:
        """Hook run once the inputs are open and checked (e.g. to open Fisher files)."""

    def merge(self, base: ModelSource, finetuned: Sequence[ModelSource], data: MergeData | None = None) -> dict[str, Tensor]:
        """Merge state dicts, files or folders tensor by tensor; returns the merged state dict.

        ``data`` carries what :attr:`needs` names; a rule that needs nothing ignores it.
        """
        base_ck, models = open_models(base, finetuned)
        self.prepare(base_ck, models, data)
        out: dict[str, Tensor] = {}
        for key in base_ck.keys():
            value = base_ck.get(key)
            if is_mergeable(value.dtype):
                cd = compute_dtype(value.dtype)
                merged = self.merge_models(key, value.to(cd), [m.get(key).to(cd) for m in models])
                value = merged.to(value.dtype)
            out[key] = value
        return out


def tensor_generator(seed: int, name: str, index: int = 0) -> torch.Generator:
    """A generator seeded by (seed, tensor name, model index): the same draws whatever the key order."""
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode()) * 131 + index) % 2**63)


def merge_files(method: str, base_path: ModelSource, finetuned_paths: Sequence[ModelSource],
                out_path: str | os.PathLike[str], **options: Any) -> dict[str, Any]:
    """Merge models with the data-free ``method`` and write ``out_path`` atomically (nothing on error).

    Returns a summary: method, models, tensors, seconds.
    """
    start = time.perf_counter()
    merger = MERGERS.create(method, **options)
    if not merger.data_free:
        free = ", ".join(n for n in MERGERS.names() if MERGERS.get(n).data_free)
        raise PolytaskError(f"merger {method!r} learns from data; call its merge from Python with "
                            f"data=MergeData(model=..., batches=...), "
                            f"or pick a data-free merger: {free}")
    merged = merger.merge(base_path, finetuned_paths)
    meta = {"polytask_merger": method, "polytask_options": json.dumps(options, default=str)}
    save_safetensors(out_path, merged, metadata=meta)
    return {"method": method, "models": len(finetuned_paths), "tensors": len(merged),
            "seconds": time.perf_counter() - start}
