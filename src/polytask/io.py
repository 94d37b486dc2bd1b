"""Atomic file writing: nothing half-written is ever left behind."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
import yaml
from safetensors.torch import save_file


def prepare_run_dir(out: Path, resume: bool, overwrite: bool, kind: str = "run") -> None:
    """Check a run directory before a run: resuming needs one, a fresh run must not clobber one."""
    from polytask.errors import PolytaskError

    if resume:
        if not (out / "config.yaml").exists():
            raise PolytaskError(f"{str(out)!r} holds no {kind} to resume; start it with out={out}")
        return
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            what = "a finished run" if (out / "metrics.json").exists() else "an unfinished run (pass resume=True to continue it)"
            raise PolytaskError(f"output directory {str(out)!r} already holds {what}; pass overwrite=True or choose another out=")
        shutil.rmtree(out)


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


def write_yaml(path: str | os.PathLike[str], obj: Any) -> None:
    write_text(path, yaml.safe_dump(obj, sort_keys=False))


def save_safetensors(path: str | os.PathLike[str], tensors: dict[str, torch.Tensor],
                     metadata: dict[str, str] | None = None) -> None:
    """Save contiguous CPU copies of ``tensors`` to ``path`` atomically."""
    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(flat, str(tmp), metadata=metadata)
