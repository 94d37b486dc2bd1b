"""Task-vector tools on files (Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023, Sec. 2):

- :func:`extract_task_vector`: τ = θ_ft − θ_0 of every floating-point tensor, written to one
  ``.safetensors`` file (float32, float64 for float64 models; metadata ``polytask_task_vector``);
- :func:`apply_task_vectors`: θ = θ_0 + Σ_i s_i τ_i written like a merge (a file or a Hugging Face
  folder of the base's dtype); a negative scale forgets a task (Sec. 3 of the paper);
- :func:`add_task_vectors`: Σ_i s_i τ_i as a new task-vector file;
- :func:`task_vector_stats`: each τ's L2 norm and the pairwise cosine similarities
  cos(τ_i, τ_j) = ⟨τ_i, τ_j⟩ / (‖τ_i‖ ‖τ_j‖), accumulated in float64 (the paper's Fig. 4 shows
  these are near zero between unrelated tasks).

Everything streams one tensor at a time (and the statistics blocks of 2^20 entries), so no model or
vector is held whole. Fine-tuned inputs may be files, Hugging Face folders, peft adapter folders
(folded, (α/r)·B·A) or polytask run directories, as for ``polytask merge``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors import safe_open
from torch import Tensor

from polytask.errors import PolytaskError
from polytask.io import SafetensorsWriter, atomic_path
from polytask.merging.base import Merger, merge_files
from polytask.merging.hf import open_inputs
from polytask.merging.taskvector import (Checkpoint, ModelSource, check_compatible, compute_dtype, is_mergeable,
                                         open_checkpoint)

VECTOR_TAG = "polytask_task_vector"
_BLOCK = 1 << 20


class DeltaCheckpoint(Checkpoint):
    """τ = θ_ft − θ_0 of the floating-point tensors, computed key by key in the compute dtype."""

    def __init__(self, base: Checkpoint, finetuned: Checkpoint) -> None:
        super().__init__(finetuned.label)
        self.base, self.finetuned = base, finetuned
        self._keys = [k for k in base.keys() if is_mergeable(base.meta(k)[1])]

    def keys(self) -> list[str]:
        return list(self._keys)

    def meta(self, key: str) -> tuple[tuple[int, ...], Any]:
        shape, dtype = self.base.meta(key)
        return shape, compute_dtype(dtype)

    def get(self, key: str) -> Tensor:
        cd = compute_dtype(self.base.meta(key)[1])
        return self.finetuned.get(key).to(cd) - self.base.get(key).to(cd)


def _vector_file(out: str | os.PathLike[str]) -> Path:
    path = Path(out)
    if path.suffix != ".safetensors" or path.is_dir():
        raise PolytaskError(f"a task vector is written as one .safetensors file; pass --out NAME.safetensors, not {str(out)!r}")
    return path


def _write_vector(out: str | os.PathLike[str], vector: Checkpoint, note: str) -> dict[str, Any]:
    path = _vector_file(out)
    keys = vector.keys()
    layout = [(k, *vector.meta(k)) for k in keys]
    with atomic_path(path) as tmp:
        with SafetensorsWriter(tmp, layout, metadata={"format": "pt", VECTOR_TAG: note}) as writer:
            for key in keys:
                writer.write(key, vector.get(key))
    return {"tensors": len(keys), "parameters": sum(math.prod(shape) for _, shape, _ in layout), "out": str(path)}


def open_vectors(sources: Sequence[ModelSource]) -> list[Checkpoint]:
    """Open task-vector files (written by :func:`extract_task_vector` or :func:`add_task_vectors`) and
    check they hold the same tensors; one line naming the file otherwise."""
    if not sources:
        raise PolytaskError("no task vectors given; pass at least one file made by 'polytask task-vector extract'")
    vectors = []
    for source in sources:
        ck = open_checkpoint(source)
        if isinstance(source, (str, os.PathLike)):
            with safe_open(str(source), framework="pt") as handle:
                if VECTOR_TAG not in (handle.metadata() or {}):
                    raise PolytaskError(f"{str(source)!r} is not a task-vector file; make one with 'polytask task-vector "
                                        f"extract --base BASE MODEL'")
        vectors.append(ck)
    check_compatible(vectors[0], vectors[1:], what="task vector", start=2)
    return vectors


def _scales(scales: Sequence[float] | float | None, n: int) -> list[float]:
    if scales is None:
        return [1.0] * n
    if isinstance(scales, (int, float)):
        return [float(scales)] * n
    values = [float(s) for s in scales]
    if len(values) == 1:
        return values * n
    if len(values) != n:
        raise PolytaskError(f"got {len(values)} scales for {n} task vectors; give one scale, or one per vector")
    return values


def extract_task_vector(base: ModelSource, finetuned: ModelSource, out: str | os.PathLike[str]) -> dict[str, Any]:
    """Write τ = θ_ft − θ_0 to ``out`` (a .safetensors file, atomically); returns a summary."""
    _vector_file(out)
    base_ck, (ft,) = open_inputs(base, [finetuned])
    return _write_vector(out, DeltaCheckpoint(base_ck, ft), f"{ft.label} - {base_ck.label}")


class _Sum(Checkpoint):
    """Σ_i s_i τ_i, key by key."""

    def __init__(self, vectors: Sequence[Checkpoint], scales: Sequence[float]) -> None:
        super().__init__(" + ".join(f"{s:g}·{v.label}" for s, v in zip(scales, vectors)))
        self.vectors, self.scales = list(vectors), list(scales)

    def keys(self) -> list[str]:
        return self.vectors[0].keys()

    def meta(self, key: str) -> tuple[tuple[int, ...], Any]:
        return self.vectors[0].meta(key)

    def get(self, key: str) -> Tensor:
        total = self.scales[0] * self.vectors[0].get(key)
        for s, v in zip(self.scales[1:], self.vectors[1:]):
            total.add_(v.get(key), alpha=s)
        return total


def add_task_vectors(vectors: Sequence[ModelSource], out: str | os.PathLike[str],
                     scales: Sequence[float] | float | None = None) -> dict[str, Any]:
    """Write Σ_i s_i τ_i of task-vector files to ``out`` (a .safetensors file); returns a summary."""
    _vector_file(out)
    cks = open_vectors(vectors)
    total = _Sum(cks, _scales(scales, len(cks)))
    return _write_vector(out, total, total.label)


class ApplyTaskVectors(Merger):
    """θ_0 + Σ_i s_i τ_i: a data-free "merge" whose inputs are task vectors instead of fine-tuned models."""

    def __init__(self, scales: Sequence[float] | float | None, count: int) -> None:
        self.scales = _scales(scales, count)

    def open(self, base: ModelSource, finetuned: Sequence[ModelSource], data: Any = None) -> tuple[Checkpoint, list[Checkpoint]]:
        base_ck = open_checkpoint(base)
        vectors = open_vectors(finetuned)
        extra = [k for k in vectors[0].keys() if k not in set(base_ck.keys())]
        if extra:
            raise PolytaskError(f"task vector 1 ({vectors[0].label}) has tensor {extra[0]!r} that the base ({base_ck.label}) "
                                f"lacks; apply a task vector to the model it was extracted from")
        check_compatible(base_ck, vectors, what="task vector", keys=vectors[0].keys())
        self._keys = set(vectors[0].keys())
        return base_ck, vectors

    def merge_key(self, key: str, base: Checkpoint, models: Sequence[Checkpoint]) -> Tensor:
        value = base.get(key)
        if key not in self._keys:
            return value
        cd = compute_dtype(value.dtype)
        return _Sum(models, self.scales).get(key).to(cd).add_(value.to(cd)).to(value.dtype)


def apply_task_vectors(base: ModelSource, vectors: Sequence[ModelSource], out: str | os.PathLike[str],
                       scales: Sequence[float] | float | None = None, **write: Any) -> dict[str, Any]:
    """Write θ_0 + Σ_i s_i τ_i (negative s_i forgets) like :func:`~polytask.merging.merge_files` writes a
    merge: ``out`` ending in .safetensors is one file, anything else a Hugging Face folder of the base's dtype."""
    merger = ApplyTaskVectors(scales, len(vectors))
    return merge_files(merger, base, list(vectors), out, record={"method": "apply-task-vectors",
                                                                 "scales": merger.scales}, **write)


def task_vector_stats(vectors: Sequence[Checkpoint]) -> dict[str, Any]:
    """Norms and pairwise cosine similarities of task vectors (checked to hold the same tensors)."""
    labels = [v.label for v in vectors]
    n = len(vectors)
    gram = torch.zeros(n, n, dtype=torch.float64)
    for key in vectors[0].keys():
        flat = [v.get(key).reshape(-1) for v in vectors]
        for start in range(0, flat[0].numel(), _BLOCK):
            block = torch.stack([f[start:start + _BLOCK] for f in flat]).double()
            gram += block @ block.T
    norms = gram.diagonal().sqrt()
    denom = torch.outer(norms, norms)
    cosine = torch.where(denom > 0, gram / denom.clamp(min=1e-300), torch.zeros_like(gram))
    return {"labels": labels, "norms": norms.tolist(), "cosine": cosine.tolist()}


def vectors_of(sources: Sequence[ModelSource], base: ModelSource | None = None) -> list[Checkpoint]:
    """Task vectors of fine-tuned models against ``base``, or (no base) task-vector files."""
    if base is None:
        return open_vectors(sources)
    if not sources:
        raise PolytaskError("no fine-tuned models given; pass the models whose task vectors to compare")
    base_ck, models = open_inputs(base, sources)
    return [DeltaCheckpoint(base_ck, m) for m in models]
