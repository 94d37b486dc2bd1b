"""The ``polytask`` command (typer). Bad input ends with one ``error:`` line and exit code 2.

Each module of :mod:`polytask.commands` (except ``_``-prefixed helpers) defines ``register(app)``.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys

import typer
from rich.markup import escape

import polytask.commands
from polytask.commands._common import as_flags, err_console
from polytask.errors import PolytaskError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="polytask: one model, many tasks (joint training, continual learning, merging).")


def _register_commands() -> None:
    for info in pkgutil.iter_modules(polytask.commands.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"polytask.commands.{info.name}").register(app)


_register_commands()


def main(argv: list[str] | None = None) -> None:
    """Console entry point: user errors print one line, in flags not Python names, never a traceback."""
    try:
        app(args=argv, prog_name="polytask")
    except PolytaskError as exc:
        err_console.print(f"[red]error:[/red] {escape(as_flags(str(exc)))}", highlight=False, soft_wrap=True)
        sys.exit(2)
