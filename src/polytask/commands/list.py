"""``polytask list``: the registered methods of every family, or of one."""

from __future__ import annotations

from typing import Optional

import typer

ALIASES = {"architecture": "arch", "suites": "suite", "mergers": "merger", "strategies": "strategy",
           "scenarios": "scenario", "weightings": "weighting", "backbones": "backbone"}


def register(app: typer.Typer) -> None:
    @app.command("list")
    def list_cmd(family: Optional[str] = typer.Argument(None, help="suite, arch, backbone, weighting, strategy, scenario or merger")) -> None:
        """List every registered suite, architecture, weighting, strategy and merger."""
        from rich.markup import escape
        from rich.table import Table

        from polytask.commands._common import console
        from polytask.errors import PolytaskError
        from polytask.registry import FAMILIES

        key = ALIASES.get(family, family) if family else None
        if key is not None and key not in FAMILIES:
            raise PolytaskError(f"unknown family {family!r}; choose one of: {', '.join(FAMILIES)}")
        table = Table(show_header=True)
        for col in ("family", "name", "description"):
            table.add_column(col)
        for fam, registry in FAMILIES.items():
            if key in (None, fam):
                for entry in registry.entries():
                    table.add_row(fam, escape(entry.name), escape(entry.description))
        console.print(table)
