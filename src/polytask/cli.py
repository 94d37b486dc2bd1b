"""The ``polytask`` command (typer). Bad input ends with one ``error:`` line and exit code 2.

Each module of :mod:`polytask.commands` (except ``_``-prefixed helpers) defines ``register(app)``.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
import warnings
from typing import Any, NoReturn

import typer
from rich.markup import escape

import polytask.commands
from polytask.commands._common import as_flags, err_console
from polytask.errors import PolytaskError, PolytaskWarning

try:  # the click that typer runs on: recent typer vendors its own copy; older ones use click itself
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover - depends on the installed typer
    from click import exceptions as click_errors  # type: ignore[no-redef]

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="polytask: one model, many tasks (joint training, continual learning, merging).")


def _register_commands() -> None:
    for info in pkgutil.iter_modules(polytask.commands.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"polytask.commands.{info.name}").register(app)


_register_commands()


def main(argv: list[str] | None = None) -> None:
    """Console entry point: user errors print one line, in flags not Python names, never a traceback;
    warnings (e.g. a damaged checkpoint skipped on resume) print as one ``warning:`` line."""
    warnings.showwarning = _show_warning
    try:
        code = app(args=argv, prog_name="polytask", standalone_mode=False)
    except PolytaskError as exc:
        _fail(as_flags(str(exc)))
    except click_errors.NoArgsIsHelpError as exc:
        err_console.print(exc.ctx.get_help() if exc.ctx else "", highlight=False, markup=False)
        sys.exit(2)
    except click_errors.UsageError as exc:  # wrong flags or values, caught by the command-line parser
        command = exc.ctx.command_path if exc.ctx else "polytask"
        _fail(f"{exc.format_message()}; see '{command} --help'")
    except click_errors.ClickException as exc:
        _fail(exc.format_message(), exc.exit_code)
    except typer.Abort:
        sys.exit(130)
    if isinstance(code, int) and code:
        sys.exit(code)


def _fail(message: str, code: int = 2) -> NoReturn:
    err_console.print(f"[red]error:[/red] {escape(' '.join(message.split()))}", highlight=False, soft_wrap=True)
    sys.exit(code)


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: Any = None, line: str | None = None) -> None:
    if issubclass(category, PolytaskWarning):
        err_console.print(f"[yellow]warning:[/yellow] {escape(as_flags(str(message)))}", highlight=False, soft_wrap=True)
    else:
        _default_show_warning(message, category, filename, lineno, file, line)


_default_show_warning = warnings.showwarning
