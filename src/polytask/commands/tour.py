"""``polytask tour``: a guided run of every route on bundled data."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command("tour")
    def tour_cmd(out: Path = typer.Option(Path("polytask-tour"), help="where tables and plots go"),
                 quick: bool = typer.Option(False, help="a smaller tour (used by the tests)")) -> None:
        """A guided run on bundled data: several architectures and weightings, a table and plots."""
        from polytask.commands._common import console
        from polytask.tour import run_tour

        run_tour(out, quick=quick, console=console)
