"""One checkpoint-folder sequence for every loop: write a folder atomically, point ``LATEST`` at it, prune.

A run directory's ``checkpoints/`` holds one folder per finished unit of work (``epoch-0003``,
``exp-002``); ``LATEST`` names the newest. A folder is filled under a temporary name and renamed
into place, and ``LATEST`` is written atomically after it, so a kill at any moment leaves either
the previous checkpoint or the new one, never a half-written one.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from polytask.io import write_text


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``target``; on success it replaces ``target``."""
    target = Path(target)
    tmp = target.with_name(f".tmp-{target.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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

    def latest(self) -> Path | None:
        """The newest finished checkpoint folder, or None."""
        latest = self.root / "LATEST"
        if not latest.exists():
            return None
        folder = self.root / latest.read_text().strip()
        return folder if folder.is_dir() else None
