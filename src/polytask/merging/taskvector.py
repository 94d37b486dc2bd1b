"""Checkpoints and task vectors (Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023).

A :class:`Checkpoint` is a read-only view of one model's tensors, read one key at a time:
a ``.safetensors`` file (memory-mapped through ``safetensors.safe_open``), a Hugging Face
model folder (``model.safetensors`` or shards ``model-0000x-of-0000y.safetensors`` with
``model.safetensors.index.json``), a polytask run directory (``model.safetensors`` beside
``config.yaml``), an in-memory state dict or an ``nn.Module``.

A task vector is τ = θ_ft − θ_0 (Ilharco et al., Sec. 2). :class:`TaskVector` supports the
paper's algebra: addition (τ_1 + τ_2), scaling (λτ) and negation (−τ, forgetting a task).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import json
import mmap
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence, Union

import torch
from safetensors import safe_open
from torch import Tensor, nn

from polytask.errors import PolytaskError

ModelSource = Union[str, os.PathLike, Mapping[str, Tensor], nn.Module, "Checkpoint"]

SAME_BASE = "merge only models fine-tuned from the same base"

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def _fmt_shape(shape: Sequence[int]) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def _fmt_dtype(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


class Checkpoint(ABC):
    """One model's tensors by name; ``get`` reads a single tensor (treat it as read-only)."""

    def __init__(self, label: str) -> None:
        self.label = label

    @abstractmethod
    def keys(self) -> list[str]:
        """Tensor names."""

    @abstractmethod
    def meta(self, key: str) -> tuple[tuple[int, ...], Any]:
        """(shape, dtype) without reading the tensor."""

    @abstractmethod
    def get(self, key: str) -> Tensor:
        """One tensor."""

    def release(self, key: str) -> None:
        """Done with tensor ``key`` for now: a memory-mapped checkpoint drops its pages from this process."""

    def load(self) -> dict[str, Tensor]:
        """All tensors in memory."""
        return {k: self.get(k) for k in self.keys()}


class DictCheckpoint(Checkpoint):
    """An in-memory state dict."""

    def __init__(self, tensors: Mapping[str, Tensor], label: str = "in-memory state dict") -> None:
        super().__init__(label)
        self.tensors = {k: v.detach() for k, v in tensors.items()}

    def keys(self) -> list[str]:
        return list(self.tensors)

    def meta(self, key: str) -> tuple[tuple[int, ...], Any]:
        t = self.tensors[key]
        return tuple(t.shape), t.dtype

    def get(self, key: str) -> Tensor:
        return self.tensors[key].clone()


class SafetensorsCheckpoint(Checkpoint):
    """One or more memory-mapped safetensors files (shards).

    Tensors are zero-copy views of a private (copy-on-write) mapping of each file; :meth:`release`
    hands a tensor's pages back to the kernel once a streaming merge is done with it, so a process
    holds only the tensors in use, not every page of every input it has read (the views stay valid:
    clean pages are read again from the file on the next access).
    """

    def __init__(self, files: Sequence[Path], label: str) -> None:
        super().__init__(label)
        self._where: dict[str, Any] = {}
        self._spans: dict[str, tuple[mmap.mmap, int, int]] = {}
        for path in files:
            try:
                handle = safe_open(str(path), framework="pt")
            except Exception as exc:  # safetensors raises several exception types for bad files
                raise PolytaskError(f"{str(path)!r} is not a readable safetensors file ({exc}); "
                                    f"pass a .safetensors file, a Hugging Face model folder or a polytask run directory") from exc
            for key in handle.keys():
                self._where[key] = handle
            self._spans |= _file_spans(Path(path))

    def keys(self) -> list[str]:
        return list(self._where)

    def meta(self, key: str) -> tuple[tuple[int, ...], Any]:
        sl = self._where[key].get_slice(key)
        code = sl.get_dtype()
        return tuple(sl.get_shape()), _ST_DTYPES.get(code, code)

    def get(self, key: str) -> Tensor:
        shape, dtype = self.meta(key)
        span = self._spans.get(key)
        if span is None or not isinstance(dtype, torch.dtype):
            return self._where[key].get_tensor(key)
        mapping, start, stop = span
        size = torch.empty((), dtype=dtype).element_size()
        if stop == start or start % size:  # empty, or misaligned for its dtype: safetensors' own copy
            return self._where[key].get_tensor(key)
        return torch.frombuffer(mapping, dtype=dtype, count=(stop - start) // size, offset=start).view(shape)

    def release(self, key: str) -> None:
        span = self._spans.get(key)
        if span is None:
            return
        mapping, start, stop = span
        first, last = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE, stop // mmap.PAGESIZE * mmap.PAGESIZE
        if last > first:
            mapping.madvise(mmap.MADV_DONTNEED, first, last - first)


def _file_spans(path: Path) -> dict[str, tuple[mmap.mmap, int, int]]:
    """Each tensor's byte range in a private mapping of the (already validated) safetensors file ``path``."""
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(length))
        if os.fstat(f.fileno()).st_size == 0:
            return {}
        mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    begin = 8 + length
    return {key: (mapping, begin + entry["data_offsets"][0], begin + entry["data_offsets"][1])
            for key, entry in header.items() if key != "__metadata__"}


def _shard_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = sorted({folder / f for f in weight_map.values()})
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise PolytaskError(f"{str(index)!r} names shard {missing[0].name!r}, which is missing; download every shard of the model")
        return files
    return sorted(folder.glob("model-*-of-*.safetensors"))


def open_checkpoint(source: ModelSource, label: str | None = None) -> Checkpoint:
    """A :class:`Checkpoint` for a file, folder, state dict or module."""
    if isinstance(source, Checkpoint):
        return source
    if isinstance(source, nn.Module):
        return DictCheckpoint(source.state_dict(), label or f"in-memory {type(source).__name__}")
    if isinstance(source, Mapping):
        return DictCheckpoint(source, label or "in-memory state dict")
    path = Path(source)
    name = label or path.name
    if path.is_file():
        return SafetensorsCheckpoint([path], name)
    if path.is_dir():
        if (path / "model.safetensors").is_file():
            return SafetensorsCheckpoint([path / "model.safetensors"], name)
        shards = _shard_files(path)
        if shards:
            return SafetensorsCheckpoint(shards, name)
        if (path / "config.yaml").is_file():
            raise PolytaskError(f"the run in {str(path)!r} did not finish (no model.safetensors); "
                                f"continue its training with out={path} resume=True")
        raise PolytaskError(f"{str(path)!r} holds no model.safetensors or model.safetensors.index.json; "
                            f"pass a .safetensors file, a Hugging Face model folder or a polytask run directory")
    raise PolytaskError(f"model {str(path)!r} does not exist; pass a .safetensors file, a Hugging Face model folder "
                        f"or a polytask run directory")


def _describe(source: ModelSource) -> str:
    if isinstance(source, (str, os.PathLike)):
        return Path(source).name
    if isinstance(source, Checkpoint):
        return source.label
    return "in-memory"


def open_models(base: ModelSource, finetuned: Sequence[ModelSource]) -> tuple[Checkpoint, list[Checkpoint]]:
    """Open the base and fine-tuned models and check they match tensor for tensor."""
    if len(finetuned) == 0:
        raise PolytaskError("no fine-tuned models given; pass at least one model to merge")
    base_ck = open_checkpoint(base, _describe(base))
    models = [open_checkpoint(m, _describe(m)) for m in finetuned]
    check_compatible(base_ck, models)
    return base_ck, models


def check_compatible(base: Checkpoint, models: Sequence[Checkpoint], what: str = "model",
                     keys: Iterable[str] | None = None, start: int = 1) -> None:
    """Raise a one-line PolytaskError naming the first tensor whose name, shape or dtype differs
    from the base (``keys`` limits the check and allows the others to lack the remaining keys)."""
    base_keys = base.keys()
    base_set = set(base_keys)
    wanted = base_keys if keys is None else list(keys)
    where = f"the base ({base.label})"
    for i, model in enumerate(models, start=start):
        who = f"{what} {i} ({model.label})"
        have = set(model.keys())
        for key in wanted:
            if key not in have:
                raise PolytaskError(f"{who} has no tensor {key!r} but {where} has; {SAME_BASE}")
            (bshape, bdtype), (shape, dtype) = base.meta(key), model.meta(key)
            if shape != bshape:
                raise PolytaskError(f"{who} tensor {key!r} has shape {_fmt_shape(shape)} but {where} has "
                                    f"{_fmt_shape(bshape)}; {SAME_BASE}")
            if what == "model" and dtype != bdtype:
                raise PolytaskError(f"{who} tensor {key!r} is {_fmt_dtype(dtype)} but {where} is {_fmt_dtype(bdtype)}; "
                                    f"convert the models to one dtype before merging")
        if keys is None:
            extra = [k for k in model.keys() if k not in base_set]
            if extra:
                raise PolytaskError(f"{who} has a tensor {extra[0]!r} that {where} lacks; {SAME_BASE}")


def is_mergeable(dtype: Any) -> bool:
    """Floating-point tensors are merged; integer/bool buffers (e.g. step counters) are taken from the base."""
    return isinstance(dtype, torch.dtype) and dtype.is_floating_point


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Mergers compute in float32, or float64 for float64 models."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class TaskVector:
    """τ = θ_ft − θ_0 for every floating-point tensor (Ilharco et al., ICLR 2023, Sec. 2).

    Entries are stored in float64: the difference of two float32 (or lower-precision) weights is
    then exact, so adding τ to θ_0 gives θ_ft bit for bit and adding −τ afterwards returns θ_0 bit
    for bit (forgetting exactly reverses learning), for any weights whose magnitudes differ by
    less than a factor 2**29.
    """

    def __init__(self, deltas: Mapping[str, Tensor]) -> None:
        self.deltas = dict(deltas)

    @classmethod
    def from_models(cls, base: ModelSource, finetuned: ModelSource) -> TaskVector:
        base_ck, (ft_ck,) = open_models(base, [finetuned])
        deltas = {}
        for key in base_ck.keys():
            if is_mergeable(base_ck.meta(key)[1]):
                deltas[key] = ft_ck.get(key).double() - base_ck.get(key).double()
        return cls(deltas)

    def _check(self, other: TaskVector) -> None:
        if self.deltas.keys() != other.deltas.keys():
            key = next(iter(self.deltas.keys() ^ other.deltas.keys()))
            raise PolytaskError(f"task vectors differ: only one has tensor {key!r}; {SAME_BASE}")
        for key, value in self.deltas.items():
            if value.shape != other.deltas[key].shape:
                raise PolytaskError(f"task vectors differ in tensor {key!r}: shape {_fmt_shape(value.shape)} vs "
                                    f"{_fmt_shape(other.deltas[key].shape)}; {SAME_BASE}")

    def __add__(self, other: TaskVector) -> TaskVector:
        self._check(other)
        return TaskVector({k: v + other.deltas[k] for k, v in self.deltas.items()})

    def __radd__(self, other: Any) -> TaskVector:
        if other == 0:  # lets sum([tv1, tv2, ...]) work
            return self
        return NotImplemented

    def __neg__(self) -> TaskVector:
        return TaskVector({k: -v for k, v in self.deltas.items()})

    def __sub__(self, other: TaskVector) -> TaskVector:
        return self + (-other)

    def __mul__(self, scale: float) -> TaskVector:
        return TaskVector({k: v * float(scale) for k, v in self.deltas.items()})

    __rmul__ = __mul__

    def apply_to(self, base: ModelSource, scale: float = 1.0) -> dict[str, Tensor]:
        """θ_0 + scale·τ, cast back to each tensor's dtype; non-float tensors are copied from ``base``."""
        base_ck = open_checkpoint(base, _describe(base))
        check_compatible(DictCheckpoint(self.deltas, "task vector"), [base_ck], what="base", keys=self.deltas)
        out = {}
        for key in base_ck.keys():
            value = base_ck.get(key)
            if key in self.deltas:
                value = (value.double() + scale * self.deltas[key]).to(value.dtype)
            out[key] = value
        return out
