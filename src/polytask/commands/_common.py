"""What the commands share: the consoles, ``key=value`` options, result tables and error text."""

from __future__ import annotations

import re
from typing import Any

import yaml
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from polytask.config import load_yaml
from polytask.errors import PolytaskError

console = Console()
err_console = Console(stderr=True)

# Library messages name Python parameters; the command line calls them flags.
FLAGS: dict[str, str] = {
    "overwrite=True": "--overwrite",
    "resume=True": "--resume",
    "out=": "--out ",
    "lr=": "--lr ",
    "backbone=": "--backbone ",
    "device=": "--device ",
    "optimizer_impl=": "--optimizer-impl ",
    "accumulate=": "--accumulate ",
}
_PARAMETER = re.compile(r"(?<![\w.'\"-])(" + "|".join(map(re.escape, FLAGS)) + ")")


def as_flags(message: str) -> str:
    """``message`` with the Python parameter spellings of :data:`FLAGS` written as CLI flags."""
    return " ".join(_PARAMETER.sub(lambda m: FLAGS[m.group(1)], message).split())


def parse_options(pairs: list[str] | None, what: str) -> dict[str, Any]:
    """Turn repeated ``key=value`` strings into a dict; values are parsed as YAML (numbers, lists, ...)."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise PolytaskError(f"{what} {pair!r} is not key=value; write e.g. {what} num_experts=4")
        try:
            parsed = load_yaml(value)
        except yaml.YAMLError as exc:
            raise PolytaskError(f"{what} {pair!r} has a value that is not valid YAML") from exc
        out[key.strip().replace("-", "_")] = parsed
    return out


def print_results(results: dict[str, dict[str, float]], title: str) -> None:
    """A table of per-task metrics, one row per task."""
    table = Table(title=escape(title))
    table.add_column("task")
    metrics = list(dict.fromkeys(m for r in results.values() for m in r))
    for m in metrics:
        table.add_column(escape(m), justify="right")
    for task, r in results.items():
        table.add_row(escape(task), *[f"{r[m]:.4f}" if m in r else "" for m in metrics])
    console.print(table)
