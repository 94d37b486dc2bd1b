"""One checkpoint-folder sequence for every loop: write a folder atomically, point ``LATEST`` at it, prune;
and one run-state format inside it.

A run directory's ``checkpoints/`` holds one folder per finished unit of work (``epoch-0003``,
``exp-002``); ``LATEST`` names the newest. A folder is filled under a temporary name and renamed
into place, and ``LATEST`` is written atomically after it, so a kill at any moment leaves either
the previous checkpoint or the new one, never a half-written one.

Run state (optimizer, weighting, strategy, RNG, loop counters) is written by :func:`save_state` as
``state.safetensors`` (every tensor) plus ``state.json`` (everything else, with references to the
tensors), so it loads without unpickling anything.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
import shutil
from contextlib import contextmanager
from pathlib import Path
import warnings
from typing import Any, Callable, Iterator

from torch import Tensor

from polytask.errors import PolytaskError, PolytaskWarning
from polytask.io import load_safetensors, save_safetensors, write_json, write_text


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``target``; on success it replaces ``target``.

    Safe with several processes building the same ``target`` (a cache) at once: each fills its
    own temporary folder, and if another copy lands between our removal of the old one and our
    rename, that copy is kept and ours dropped (both are builds of the same thing).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".tmp-{target.name}-*-*"):  # left by a killed process
        if not _alive(stale.name.rsplit("-", 2)[-2]):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-{os.getpid()}-", dir=target.parent))
    try:
        yield tmp
        old = target.with_name(f".old-{target.name}-{os.getpid()}-{tmp.name[-8:]}")
        try:
            os.replace(target, old)
        except FileNotFoundError:
            pass
        try:
            os.replace(tmp, target)
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: str) -> bool:
    """Whether process ``pid`` (a string from a folder name) still runs on this machine."""
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class CheckpointDir:
    """``root/<prefix>-NNNN`` folders plus ``root/LATEST``; only the newest ``keep`` are kept."""

    def __init__(self, root: Path, prefix: str, width: int = 4, keep: int = 1) -> None:
        self.root, self.prefix, self.width, self.keep = Path(root), prefix, width, keep

    def name(self, index: int) -> str:
        return f"{self.prefix}-{index:0{self.width}d}"

    @contextmanager
    def write(self, index: int) -> Iterator[Path]:
        """Yield a folder to fill for checkpoint ``index``; afterwards it is in place and ``LATEST`` names it."""
        folder = self.root / self.name(index)
        with atomic_dir(folder) as tmp:
            yield tmp
        write_text(self.root / "LATEST", folder.name + "\n")
        kept = sorted(self.root.glob(f"{self.prefix}-*"))[-self.keep:]
        for old in self.root.glob(f"{self.prefix}-*"):
            if old not in kept and old.name != folder.name:
                shutil.rmtree(old, ignore_errors=True)

    def restore(self, load: Callable[[Path], None]) -> Path | None:
        """Call ``load`` on the newest checkpoint it accepts: ``LATEST`` first, then older folders.

        A checkpoint that is missing or fails to load (damaged files) is skipped with a
        :class:`PolytaskWarning`; returns the folder loaded, or None if there was none to load.
        """
        named = self.latest()
        older = sorted((p for p in self.root.glob(f"{self.prefix}-*") if p.is_dir() and p != named), reverse=True)
        candidates = ([named] if named is not None else []) + older
        if (self.root / "LATEST").exists() and named is None:
            _warn(f"{self.root / 'LATEST'} names a checkpoint that does not exist")
        for folder in candidates:
            try:
                load(folder)
            except (PolytaskError, OSError, ValueError, KeyError, RuntimeError) as exc:
                _warn(f"skipping damaged checkpoint {folder} ({' '.join(str(exc).split())[:200]})")
                continue
            if folder != named:
                _warn(f"resuming from the older checkpoint {folder.name}")
            return folder
        if candidates or (self.root / "LATEST").exists():
            _warn("no usable checkpoint is left; starting from the beginning")
        return None

    def latest(self) -> Path | None:
        """The newest finished checkpoint folder, or None."""
        latest = self.root / "LATEST"
        if not latest.exists():
            return None
        folder = self.root / latest.read_text().strip()
        return folder if folder.is_dir() else None


def save_state(folder: Path, state: dict[str, Any]) -> None:
    """Write a nested state (dicts, lists, tensors, JSON scalars) as state.safetensors + state.json."""
    tensors: dict[str, Tensor] = {}
    meta = _encode(state, tensors, "")
    save_safetensors(folder / "state.safetensors", {k: v.detach().clone() for k, v in tensors.items()})
    write_json(folder / "state.json", meta)


def load_state(folder: Path) -> dict[str, Any]:
    """The state :func:`save_state` wrote in ``folder`` (one-line errors if it is damaged)."""
    tensors = load_safetensors(folder / "state.safetensors", root=folder)
    try:
        return _decode(json.loads((folder / "state.json").read_text()), tensors)
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise PolytaskError(f"{folder / 'state.json'} is missing or damaged ({type(exc).__name__})") from exc


def _warn(message: str) -> None:
    warnings.warn(message, PolytaskWarning, stacklevel=3)


def _encode(obj: Any, tensors: dict[str, Tensor], path: str) -> Any:
    if isinstance(obj, Tensor):
        tensors[path] = obj
        return {"__tensor__": path}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: _encode(v, tensors, f"{path}/{k}") for k, v in obj.items()}
        return {"__items__": [[k, _encode(v, tensors, f"{path}/{k}")] for k, v in obj.items()]}  # e.g. int keys
    if isinstance(obj, (list, tuple)):
        return [_encode(v, tensors, f"{path}/{i}") for i, v in enumerate(obj)]
    return obj


def _decode(obj: Any, tensors: dict[str, Tensor]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        if set(obj) == {"__items__"}:
            return {k: _decode(v, tensors) for k, v in obj["__items__"]}
        return {k: _decode(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    return obj
