"""``polytask train``: train one multi-task model on a suite (the joint route)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command("train")
    def train_cmd(
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
        device: Optional[str] = typer.Option(None, help="cpu (default), cuda, cuda:N, mps, or auto (cuda > mps > cpu)"),
        precision: Optional[str] = typer.Option(None, help="fp32 (default), bf16 or fp16 autocast (fp16 with a grad scaler)"),
        scheduler: Optional[str] = typer.Option(None, help="learning-rate schedule per optimiser step: none, cosine, linear"),
        warmup_steps: Optional[int] = typer.Option(None, help="linear warm-up over this many optimiser steps"),
        warmup_fraction: Optional[float] = typer.Option(None, help="... or over this fraction of all optimiser steps"),
        accumulate: Optional[int] = typer.Option(None, help="micro-batches of --batch-size per optimiser step"),
        optimizer_impl: Optional[str] = typer.Option(None, help="auto (fused on CUDA), fused, foreach or loop"),
        baseline: Optional[str] = typer.Option(None, help="Δm baselines: auto (train single-task, cached), none, or a JSON file"),
        main: Optional[str] = typer.Option(None, help="main task: its metric alone drives model selection and Δm "
                                                      "(the other tasks are auxiliary)"),
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
        from rich.markup import escape

        from polytask.commands._common import console, parse_options, print_results
        from polytask.config import read_yaml
        from polytask.errors import PolytaskError
        from polytask.joint import RunConfig, run

        stored = out / "config.yaml"
        base: dict[str, Any] = {}
        if resume and stored.is_file():  # flags given with --resume change the stored config (or are refused)
            base = RunConfig.from_yaml(stored).to_dict()
        if config is not None:
            base.update(read_yaml(config))
        flags = {"suite": suite, "arch": arch, "weighting": weighting, "backbone": backbone, "baseline": baseline,
                 "main": main}
        base.update({k: v for k, v in flags.items() if v is not None})
        for key, pairs in (("suite_options", suite_option), ("arch_options", arch_option),
                           ("weighting_options", weighting_option), ("backbone_options", backbone_option)):
            if pairs:
                base[key] = {**(base.get(key) or {}), **parse_options(pairs, "--" + key[:-1].replace("_", "-"))}
        train_flags = {"epochs": epochs, "seed": seed, "lr": lr, "batch_size": batch_size, "monitor": monitor,
                       "patience": patience, "num_threads": threads, "device": device, "precision": precision,
                       "scheduler": scheduler, "warmup_steps": warmup_steps, "warmup_fraction": warmup_fraction,
                       "accumulate": accumulate, "optimizer_impl": optimizer_impl}
        base["train"] = {**(base.get("train") or {}), **{k: v for k, v in train_flags.items() if v is not None}}
        base["train"].setdefault("num_threads", 1)
        if tensorboard:
            base["train"]["tensorboard"] = True
        cfg: RunConfig | None = None
        if not resume or stored.is_file():
            if "suite" not in base:
                raise PolytaskError("no suite given; pass --suite NAME (see polytask list suite) or --config run.yaml")
            base["train"]["progress"] = progress
            cfg = RunConfig.from_dict(base, source="the options")
        result = run(cfg, out, resume=resume, overwrite=overwrite)
        print_results(result.metrics["test"], f"{result.config.arch} + {result.config.weighting} on {result.config.suite} (test)")
        if result.metrics["delta_m"] is not None:
            console.print(f"Δm vs single-task baselines: {result.metrics['delta_m']:+.2f}%")
        console.print(escape(f"wrote {out}/model.safetensors, config.yaml, metrics.json"))
