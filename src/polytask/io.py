"""Atomic file writing: nothing half-written is ever left behind."""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file


def cache_dir() -> Path:
    """Where polytask caches derived data: ``$POLYTASK_CACHE`` or ``~/.cache/polytask``."""
    return Path(os.environ.get("POLYTASK_CACHE", Path.home() / ".cache" / "polytask"))


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` atomically."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: str | os.PathLike[str], text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json_if(path: str | os.PathLike[str]) -> Any:
    """The JSON in ``path``, or None if there is no such file or it does not parse (then it is redone)."""
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def write_yaml(path: str | os.PathLike[str], obj: Any) -> None:
    write_text(path, yaml.safe_dump(obj, sort_keys=False))


def save_safetensors(path: str | os.PathLike[str], tensors: dict[str, torch.Tensor],
                     metadata: dict[str, str] | None = None) -> None:
    """Save contiguous CPU copies of ``tensors`` to ``path`` atomically (tied weights, e.g. a T5's
    shared embeddings, are written once under each of their names)."""
    flat, seen = {}, set()
    for k, v in tensors.items():
        t = v.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        flat[k] = t.clone() if ptr in seen else t  # safetensors refuses tensors that share memory
        seen.add(ptr)
    with atomic_path(path) as tmp:
        save_file(flat, str(tmp), metadata=metadata)


_SAFETENSORS_CODES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}


class SafetensorsWriter:
    """Write a safetensors file one tensor at a time, in the order of ``layout`` (name -> (shape, dtype)),
    so no more than one tensor is ever held: the header is known before the first tensor arrives.

    The file is the format ``safetensors.torch.save_file`` writes (8-byte header length, JSON header
    padded with spaces to 8 bytes, the tensors' bytes back to back); write it into a temporary path.
    """

    def __init__(self, path: str | os.PathLike[str], layout: list[tuple[str, tuple[int, ...], torch.dtype]],
                 metadata: dict[str, str] | None = None) -> None:
        header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
        offset = 0
        self._expect: list[tuple[str, tuple[int, ...], torch.dtype, int]] = []
        for name, shape, dtype in layout:
            size = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": _SAFETENSORS_CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            self._expect.append((name, tuple(shape), dtype, size))
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._file = open(path, "wb")
        self._file.write(len(raw).to_bytes(8, "little") + raw)
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append tensor ``name``, which must be the next one of the layout, with its shape and dtype."""
        want, shape, dtype, size = self._expect[self._next]
        if name != want or tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise ValueError(f"expected tensor {want!r} {shape} {dtype}, got {name!r} {tuple(tensor.shape)} {tensor.dtype}")
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        if size:
            self._file.write(data.view(torch.uint8).numpy().data if data.dtype != torch.bool else data.numpy().tobytes())
        self._next += 1

    def close(self) -> None:
        """Finish the file (every tensor of the layout must have been written)."""
        missing = len(self._expect) - self._next
        self._file.close()
        if missing:
            raise ValueError(f"{missing} tensors of the layout were not written")

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, kind: Any, *rest: Any) -> None:
        if kind is None:
            self.close()
        else:
            self._file.close()


def load_safetensors(path: str | os.PathLike[str], root: str | os.PathLike[str] | None = None) -> dict[str, torch.Tensor]:
    """Read a safetensors file (never a pickle) with one-line errors for a missing, truncated or
    lying file; with ``root``, a file (or link) that resolves outside ``root`` is refused."""
    from polytask.errors import PolytaskError

    p = Path(path)
    if root is not None and not p.resolve().is_relative_to(Path(root).resolve()):
        raise PolytaskError(f"{str(p)!r} points outside {str(root)!r} (a symbolic link?); refusing to read it")
    if not p.is_file():
        raise PolytaskError(f"{str(p)!r} does not exist; pass the path of a .safetensors file")
    try:
        return load_file(str(p))
    except (SafetensorError, OSError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PolytaskError(f"{str(p)!r} is not a readable safetensors file ({reason}); "
                            "it is damaged or of another format") from exc
