"""``polytask eval``: re-evaluate a saved run."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command("eval")
    def eval_cmd(run_dir: Path = typer.Argument(..., help="a run directory written by polytask train"),
                 split: str = typer.Option("test", help="train, val or test")) -> None:
        """Re-evaluate a saved run and print its per-task metrics."""
        from polytask.commands._common import print_results
        from polytask.joint import evaluate_run

        print_results(evaluate_run(run_dir, split), f"{run_dir} ({split})")
