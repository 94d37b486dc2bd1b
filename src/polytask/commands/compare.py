"""``polytask compare``: every route on one suite, one report (train jointly, learn in sequence, or merge?)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command("compare")
    def compare_cmd(
        suite: str = typer.Option("digits-merge", help="a suite every route can read: digits-merge, vision-merge, text-merge"),
        routes: str = typer.Option("joint,continual,merge", help="comma-separated routes"),
        methods: Optional[str] = typer.Option(None, help="ROUTE:METHOD list replacing that route's defaults, "
                                                         "e.g. joint:mmoe+uw,continual:ewc,merge:ties"),
        seeds: int = typer.Option(1, min=1, help="number of seeds (0..K-1)"),
        epochs: Optional[int] = typer.Option(None, help="training budget in epochs per task, the same for every "
                                                        "route (default: the suite's fine-tuning epochs)"),
        suite_option: Optional[list[str]] = typer.Option(None, help="suite build option key=value"),
        out: Optional[Path] = typer.Option(None, help="directory for the cells (cached, resumable) and the report"),
        threads: int = typer.Option(1, min=1, help="torch CPU threads"),
        progress: bool = typer.Option(True, help="show a progress bar over cells"),
    ) -> None:
        """Run joint, continual and merge methods on one suite from the same pretrained body; report them side by side."""
        from polytask.commands._common import console, parse_options
        from polytask.comparison import CompareConfig, compare, parse_methods
        from polytask.comparison.report import rich_table

        config = CompareConfig(suite=suite, routes=[r.strip() for r in routes.split(",") if r.strip()],
                               methods=parse_methods(methods), seeds=seeds, epochs=epochs,
                               suite_options=parse_options(suite_option, "--suite-option"), threads=threads)
        payload = compare(config, out, progress=progress)
        console.print(rich_table(payload))
        if out is not None:
            console.print(f"wrote {out}/report.md, report.json, results.csv, pareto_cost.png, pareto_params.png, "
                          "per_task.png", highlight=False)

