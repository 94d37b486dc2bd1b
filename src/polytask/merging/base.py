"""The Merger base class and the streaming file merge.

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
from typing import Any, ClassVar, Sequence

import torch
from torch import Tensor

from polytask.errors import PolytaskError
from polytask.io import save_safetensors
from polytask.merging.taskvector import Checkpoint, ModelSource, compute_dtype, is_mergeable, open_models
from polytask.registry import MERGERS


class Merger:
    """Base class: combine a base model and N fine-tuned models into one set of weights."""

    #: False for methods that learn from data (they take a model and batches in ``merge``).
    data_free: ClassVar[bool] = True

    def merge_tensor(self, name: str, base: Tensor, deltas: list[Tensor]) -> Tensor:
        """Merged weights of tensor ``name`` from the base and the task vectors' entries (``deltas`` may be
        modified in place)."""
        raise NotImplementedError(f"{type(self).__name__} implements neither merge_tensor nor merge_models")

    def merge_models(self, name: str, base: Tensor, models: list[Tensor]) -> Tensor:
        """Merged weights of tensor ``name`` from the base and the fine-tuned weights."""
        return self.merge_tensor(name, base, [m - base for m in models])

    def prepare(self, base: Checkpoint, models: Sequence[Checkpoint]) -> None:
        """Hook run once the inputs are open and checked (e.g. to open Fisher files)."""

    def merge(self, base: ModelSource, finetuned: Sequence[ModelSource]) -> dict[str, Tensor]:
        """Merge state dicts, files or folders tensor by tensor; returns the merged state dict."""
        base_ck, models = open_models(base, finetuned)
        self.prepare(base_ck, models)
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
        raise PolytaskError(f"merger {method!r} learns from data; call it from Python with a model and batches, "
                            f"or pick a data-free merger: {free}")
    merged = merger.merge(base_path, finetuned_paths)
    meta = {"polytask_merger": method, "polytask_options": json.dumps(options, default=str)}
    save_safetensors(out_path, merged, metadata=meta)
    return {"method": method, "models": len(finetuned_paths), "tensors": len(merged),
            "seconds": time.perf_counter() - start}
