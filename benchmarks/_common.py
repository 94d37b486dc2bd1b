"""Shared benchmark helpers: thread setup, timing, and writing results (JSON + Markdown)."""

from __future__ import annotations

import platform
import time
from pathlib import Path
from typing import Any, Callable

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def setup(threads: int = 1) -> dict[str, Any]:
    """Fix the torch thread count and return the environment facts every result records."""
    torch.set_num_threads(threads)
    return {"threads": threads, "torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "cpus": __import__("os").cpu_count()}


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def write_results(name: str, payload: dict[str, Any], markdown: str) -> None:
    from polytask.io import write_json, write_text

    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS / f"{name}.json", payload)
    write_text(RESULTS / f"{name}.md", markdown)


def markdown_table(rows: list[dict[str, Any]], keys: list[str] | None = None) -> str:
    keys = keys or list(dict.fromkeys(k for r in rows for k in r))
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines) + "\n"
