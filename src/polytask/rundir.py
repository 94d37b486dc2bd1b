"""Run folders that survive bad input, kills and a second copy of the same command.

Every route that writes a run folder (``joint``, ``continual``) goes through two steps:

1. :func:`check_run_dir` before anything is built: the path is a folder (or can become one),
   is writable, is not in use by another process, holds a run to resume or no run to clobber.
   It changes nothing on disk, except that it puts back a run an interrupted ``overwrite``
   had moved aside.
2. :func:`open_run_dir` once every input has been validated: it takes the folder's lock
   (``.polytask.lock``, an ``flock`` the kernel releases when the process dies), moves an
   old run aside when overwriting, and on failure removes what the new run wrote and puts
   the old run back. The old run is deleted only when the new one commits (its first
   checkpoint is in place: :meth:`RunDir.commit`).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

from polytask.errors import PolytaskError

LOCK = ".polytask.lock"


def backup_path(out: Path) -> Path:
    """Where an overwritten run waits until the new run has its first checkpoint."""
    return out.with_name(f".{out.name}.replaced")


def _has_checkpoint(out: Path) -> bool:
    return (out / "checkpoints" / "LATEST").is_file()


def check_out_path(out: Path) -> None:
    """One-line errors for an ``out`` that is a file, lies under a file, or cannot be written."""
    if out.exists() and not out.is_dir():
        raise PolytaskError(f"out={out} is a file, not a folder; pass a folder path for the run")
    parent = out if out.is_dir() else out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise PolytaskError(f"out={out} cannot be created: {str(parent)!r} is a file; choose another out=")
    try:  # a real probe: os.access says yes to root even on a read-only file system
        tempfile.TemporaryDirectory(dir=parent, prefix=".polytask-probe-").cleanup()
    except OSError as exc:
        raise PolytaskError(f"out={out} cannot be written ({exc.strerror} in {str(parent)!r}); choose another out=") from exc


def _lock(path: Path) -> IO[str] | None:
    """The open lock file of ``path`` held exclusively, or None if another process holds it."""
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle


def _busy(out: Path) -> PolytaskError:
    return PolytaskError(f"another polytask process is writing to {str(out)!r}; wait for it to finish or choose another out=")


def _check_unlocked(out: Path) -> None:
    lock = out / LOCK
    if lock.is_file():
        handle = _lock(lock)
        if handle is None:
            raise _busy(out)
        handle.close()


def _recover_backup(out: Path) -> None:
    """Finish an overwrite that was interrupted: keep the new run if it has a checkpoint, else put the old one back."""
    backup = backup_path(out)
    if not backup.is_dir():
        return
    if _has_checkpoint(out):
        shutil.rmtree(backup, ignore_errors=True)
    else:
        shutil.rmtree(out, ignore_errors=True)
        os.replace(backup, out)


def check_run_dir(out: Path, resume: bool, overwrite: bool, kind: str = "run") -> None:
    """Validate ``out`` for a run without changing it (see the module docstring)."""
    check_out_path(out)
    _check_unlocked(out)
    _recover_backup(out)
    if resume:
        if not (out / "config.yaml").is_file():
            raise PolytaskError(f"{str(out)!r} holds no {kind} to resume (no config.yaml); start one with out={out}")
        return
    if out.exists() and any(p.name != LOCK for p in out.iterdir()) and not overwrite:
        what = ("a finished run" if (out / "metrics.json").exists()
                else "an unfinished run (pass resume=True to continue it)")
        raise PolytaskError(f"output directory {str(out)!r} already holds {what}; pass overwrite=True or choose another out=")


class RunDir:
    """A run folder held by this process (see :func:`open_run_dir`)."""

    def __init__(self, path: Path, backup: Path | None) -> None:
        self.path, self.backup = path, backup

    def commit(self) -> None:
        """The new run has a checkpoint: the run it replaces is no longer needed."""
        if self.backup is not None:
            shutil.rmtree(self.backup, ignore_errors=True)
            self.backup = None


@contextmanager
def open_run_dir(out: Path, resume: bool, overwrite: bool, kind: str = "run") -> Iterator[RunDir]:
    """Hold ``out`` for one run: lock it, move an old run aside, clean up and restore on failure."""
    check_run_dir(out, resume, overwrite, kind)
    fresh = not resume
    existed = out.is_dir()
    backup = None
    if fresh and out.exists() and any(p.name != LOCK for p in out.iterdir()):
        backup = backup_path(out)
        os.replace(out, backup)
    out.mkdir(parents=True, exist_ok=True)
    handle = _lock(out / LOCK)
    if handle is None:
        if backup is not None:
            os.replace(backup, out)
        raise _busy(out)
    run = RunDir(out, backup)
    try:
        yield run
        run.commit()
    except BaseException as exc:
        resumable = isinstance(exc, KeyboardInterrupt) and _has_checkpoint(out) and run.backup is None
        if fresh and not resumable:
            shutil.rmtree(out, ignore_errors=True)
            if run.backup is not None:
                os.replace(run.backup, out)
            elif existed:
                out.mkdir()
        raise
    finally:
        handle.close()
