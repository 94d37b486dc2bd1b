"""``polytask list``: the registered methods of every family, or of one."""

from __future__ import annotations

from typing import Optional

import typer

ALIASES = {"architecture": "arch", "suites": "suite", "mergers": "merger", "strategies": "strategy",
           "scenarios": "scenario", "weightings": "weighting", "backbones": "backbone", "merge-suites": "merge-suite",
           "fusers": "fuser"}


def routes(family: str, name: str) -> str:
    """The routes a suite serves: joint suites (one input, several labels) train jointly; the
    comparison suites (a pretrained body, one dataset per task) serve every route and ``compare``."""
    from polytask.comparison.suite import COMPARE_SUITES

    if family == "suite":
        return "joint"
    if family == "merge-suite":
        return "joint, continual, merge, compare" if name in COMPARE_SUITES else "merge"
    return ""


def register(app: typer.Typer) -> None:
    @app.command("list")
    def list_cmd(family: Optional[str] = typer.Argument(None, help="suite, merge-suite, arch, backbone, weighting, "
                                                                  "strategy, scenario, merger or fuser")) -> None:
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
        suites = key in (None, "suite", "merge-suite")
        for col in ("family", "name", "description") + (("routes",) if suites else ()):
            table.add_column(col)
        for fam, registry in FAMILIES.items():
            if key in (None, fam) or (key, fam) == ("suite", "merge-suite"):  # every suite, with its routes
                for entry in registry.entries():
                    table.add_row(fam, escape(entry.name), escape(entry.description),
                                  *((routes(fam, entry.name),) if suites else ()))
        console.print(table)
