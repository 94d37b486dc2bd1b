"""The ``polytask`` command (typer). Bad input ends with one ``error:`` line and exit code 2."""

from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path
from typing import Any, Optional

import typer
import yaml
from rich.console import Console
from rich.table import Table

import polytask.commands
from polytask.errors import PolytaskError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="polytask: one model, many tasks (joint training, continual learning, merging).")
console = Console()
err_console = Console(stderr=True)


def load_families() -> None:
    """Import every method family so the registries are filled."""
    for pkg in ("data", "models.arch", "weighting", "continual", "merging"):
        importlib.import_module(f"polytask.{pkg}")
    importlib.import_module("polytask.models.backbones")


def parse_options(pairs: list[str] | None, what: str) -> dict[str, Any]:
    """Turn repeated ``key=value`` strings into a dict; values are parsed as YAML (numbers, lists, ...)."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise PolytaskError(f"{what} {pair!r} is not key=value; write e.g. {what} num_experts=4")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise PolytaskError(f"{what} {pair!r} has a value that is not valid YAML") from exc
        if isinstance(parsed, str):  # YAML reads 1e-3 as a string; numbers should be numbers
            try:
                parsed = float(parsed)
            except ValueError:
                pass
        out[key.strip().replace("-", "_")] = parsed
    return out


def print_results(results: dict[str, dict[str, float]], title: str) -> None:
    table = Table(title=title)
    table.add_column("task")
    metrics = list(dict.fromkeys(m for r in results.values() for m in r))
    for m in metrics:
        table.add_column(m, justify="right")
    for task, r in results.items():
        table.add_row(task, *[f"{r[m]:.4f}" if m in r else "" for m in metrics])
    console.print(table)


@app.command("list")
def list_cmd(family: Optional[str] = typer.Argument(None, help="suite, arch, backbone, weighting, strategy, scenario or merger")) -> None:
    """List every registered suite, architecture, weighting, strategy and merger."""
    from polytask.registry import FAMILIES

    load_families()
    aliases = {"architecture": "arch", "suites": "suite", "mergers": "merger", "strategies": "strategy",
               "scenarios": "scenario", "weightings": "weighting", "backbones": "backbone"}
    key = aliases.get(family, family) if family else None
    if key is not None and key not in FAMILIES:
        raise PolytaskError(f"unknown family {family!r}; choose one of: {', '.join(FAMILIES)}")
    table = Table(show_header=True)
    for col in ("family", "name", "description"):
        table.add_column(col)
    for fam, registry in FAMILIES.items():
        if key in (None, fam):
            for entry in registry.entries():
                table.add_row(fam, entry.name, entry.description)
    console.print(table)


@app.command()
def train(
    suite: Optional[str] = typer.Option(None, help="suite name (polytask list suite)"),
    arch: Optional[str] = typer.Option(None, help="architecture name (polytask list arch)"),
    weighting: Optional[str] = typer.Option(None, help="loss/gradient weighting (polytask list weighting)"),
    backbone: Optional[str] = typer.Option(None, help="backbone name; 'auto' follows the input kind"),
    epochs: Optional[int] = typer.Option(None, min=1),
    seed: Optional[int] = typer.Option(None),
    lr: Optional[float] = typer.Option(None),
    batch_size: Optional[int] = typer.Option(None, min=1),
    monitor: Optional[str] = typer.Option(None, help="'loss' or TASK/METRIC for model selection"),
    patience: Optional[int] = typer.Option(None, help="early stopping after this many epochs without gain"),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads (1 is fastest for small models)"),
    baseline: Optional[str] = typer.Option(None, help="Δm baselines: auto (train single-task, cached), none, or a JSON file"),
    suite_option: Optional[list[str]] = typer.Option(None, help="suite option key=value (repeatable)"),
    arch_option: Optional[list[str]] = typer.Option(None, help="architecture option key=value (repeatable)"),
    weighting_option: Optional[list[str]] = typer.Option(None, help="weighting option key=value (repeatable)"),
    backbone_option: Optional[list[str]] = typer.Option(None, help="backbone option key=value (repeatable)"),
    config: Optional[Path] = typer.Option(None, help="YAML run config with the same fields; flags override it"),
    out: Path = typer.Option(..., help="run directory: model.safetensors, config.yaml, metrics.json, checkpoints/"),
    resume: bool = typer.Option(False, help="continue the unfinished run in --out from its last checkpoint"),
    overwrite: bool = typer.Option(False, help="replace an existing run in --out"),
    tensorboard: bool = typer.Option(False, help="also write TensorBoard logs"),
    progress: bool = typer.Option(True, help="show a progress bar"),
) -> None:
    """Train one multi-task model and write it, its config and its test metrics to --out."""
    from polytask.joint import run
    from polytask.config import read_yaml
    from polytask.joint import RunConfig

    if resume:
        cfg = RunConfig(suite="(from checkpoint)")
    else:
        base: dict[str, Any] = {}
        if config is not None:
            base = read_yaml(config)
        flags = {"suite": suite, "arch": arch, "weighting": weighting, "backbone": backbone, "baseline": baseline}
        base.update({k: v for k, v in flags.items() if v is not None})
        for key, pairs in (("suite_options", suite_option), ("arch_options", arch_option),
                           ("weighting_options", weighting_option), ("backbone_options", backbone_option)):
            if pairs:
                base[key] = {**(base.get(key) or {}), **parse_options(pairs, "--" + key[:-1].replace("_", "-"))}
        train_flags = {"epochs": epochs, "seed": seed, "lr": lr, "batch_size": batch_size, "monitor": monitor,
                       "patience": patience, "num_threads": threads}
        base["train"] = {**(base.get("train") or {}), **{k: v for k, v in train_flags.items() if v is not None}}
        base["train"].setdefault("num_threads", 1)
        if tensorboard:
            base["train"]["tensorboard"] = True
        if "suite" not in base:
            raise PolytaskError("no suite given; pass --suite NAME (see polytask list suite) or --config run.yaml")
        cfg = RunConfig.from_dict(base, source="the options")
    cfg.train.progress = progress
    result = run(cfg, out, resume=resume, overwrite=overwrite)
    print_results(result.metrics["test"], f"{result.config.arch} + {result.config.weighting} on {result.config.suite} (test)")
    if result.metrics["delta_m"] is not None:
        console.print(f"Δm vs single-task baselines: {result.metrics['delta_m']:+.2f}%")
    console.print(f"wrote {out}/model.safetensors, config.yaml, metrics.json")


@app.command("eval")
def eval_cmd(run_dir: Path = typer.Argument(..., help="a run directory written by polytask train"),
             split: str = typer.Option("test", help="train, val or test")) -> None:
    """Re-evaluate a saved run and print its per-task metrics."""
    from polytask.joint import evaluate_run

    print_results(evaluate_run(run_dir, split), f"{run_dir} ({split})")


@app.command()
def tour(out: Path = typer.Option(Path("polytask-tour"), help="where tables and plots go"),
         quick: bool = typer.Option(False, help="a smaller tour (used by the tests)")) -> None:
    """A guided run on bundled data: several architectures and weightings, a table and plots."""
    from polytask.tour import run_tour

    run_tour(out, quick=quick, console=console)


def _register_commands() -> None:
    for info in pkgutil.iter_modules(polytask.commands.__path__):
        module = importlib.import_module(f"polytask.commands.{info.name}")
        module.register(app)


_register_commands()


def main(argv: list[str] | None = None) -> None:
    """Console entry point: user errors print one line, never a traceback."""
    try:
        app(args=argv, prog_name="polytask")
    except PolytaskError as exc:
        err_console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
