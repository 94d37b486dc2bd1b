"""``polytask continual``: run a continual-learning strategy through a scenario."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command("continual")
    def continual_cmd(
        ctx: typer.Context,
        scenario: Optional[str] = typer.Option(None, help="scenario name (polytask list scenario)"),
        strategy: str = typer.Option("finetune", help="continual strategy (polytask list strategy)"),
        arch: str = typer.Option("shared-bottom", help="architecture name (polytask list arch)"),
        backbone: str = typer.Option("auto", help="backbone name; 'auto' follows the input kind"),
        epochs: Optional[int] = typer.Option(None, min=1, help="epochs per experience (default: the scenario's)"),
        lr: Optional[float] = typer.Option(None),
        batch_size: Optional[int] = typer.Option(None, min=1),
        seed: int = typer.Option(0),
        threads: Optional[int] = typer.Option(None, help="torch CPU threads (1 is fastest for small models)"),
        scenario_option: Optional[list[str]] = typer.Option(None, help="scenario option key=value (repeatable)"),
        strategy_option: Optional[list[str]] = typer.Option(None, help="strategy option key=value (repeatable), e.g. lam=1000"),
        arch_option: Optional[list[str]] = typer.Option(None, help="architecture option key=value (repeatable)"),
        backbone_option: Optional[list[str]] = typer.Option(None, help="backbone option key=value (repeatable)"),
        out: Path = typer.Option(..., help="run directory: metrics.json, accuracy_matrix.csv/png, model, checkpoints/"),
        resume: bool = typer.Option(False, help="continue the run in --out from its last finished experience"),
        overwrite: bool = typer.Option(False, help="replace an existing run in --out"),
        progress: bool = typer.Option(True, help="show a progress bar per experience"),
    ) -> None:
        """Learn a scenario's experiences one after another with a strategy; print the accuracy matrix and BWT/forgetting."""
        from rich.markup import escape

        from polytask.commands._common import console, parse_options
        from polytask.continual.runner import ContinualConfig, run_continual
        from polytask.errors import PolytaskError

        if resume:
            given = [name for name in ctx.params if name not in ("out", "resume", "progress")
                     and ctx.get_parameter_source(name).name == "COMMANDLINE"]
            if given:  # an experience sequence cannot change its settings half-way through
                raise PolytaskError(f"--resume continues the run in --out exactly as configured; drop "
                                    f"--{given[0].replace('_', '-')} (or start a new run with another --out)")
            cfg = ContinualConfig(scenario="(from checkpoint)")
        else:
            if scenario is None:
                raise PolytaskError("no scenario given; pass --scenario NAME (see polytask list scenario)")
            train: dict[str, Any] = {k: v for k, v in {"epochs": epochs, "lr": lr, "batch_size": batch_size,
                                                        "num_threads": threads}.items() if v is not None}
            train.update(seed=seed, progress=progress)
            cfg = ContinualConfig(scenario=scenario, strategy=strategy, arch=arch, backbone=backbone,
                                  scenario_options=parse_options(scenario_option, "--scenario-option"),
                                  strategy_options=parse_options(strategy_option, "--strategy-option"),
                                  arch_options=parse_options(arch_option, "--arch-option"),
                                  backbone_options=parse_options(backbone_option, "--backbone-option"), train=train)
        result = run_continual(cfg, out, resume=resume, overwrite=overwrite)
        _print(console, result.metrics, [e.name for e in result.scenario])
        console.print(escape(f"wrote {out}/metrics.json, accuracy_matrix.csv, accuracy_matrix.png, "
                             "accuracy_over_time.png, model.safetensors"), highlight=False)


def _print(console: Any, metrics: dict[str, Any], names: list[str]) -> None:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=escape(f"{metrics['strategy']} on {metrics['scenario']}: accuracy after each experience "
                               "(rows) on each experience (columns)"))
    table.add_column("after")
    for j, name in enumerate(names):
        table.add_column(escape(f"{j}: {name}"), justify="right")
    for i, row in enumerate(metrics["accuracy_matrix"]):
        table.add_row(escape(f"{i}: {names[i]}"), *[f"{v:.3f}" for v in row])
    console.print(table)
    console.print(f"average accuracy {metrics['average_accuracy']:.4f}   BWT {metrics['backward_transfer']:+.4f}   "
                  f"FWT {metrics['forward_transfer']:+.4f}   forgetting {metrics['forgetting']:.4f}", highlight=False)
