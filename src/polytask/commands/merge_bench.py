"""``polytask merge-bench``: merge a suite's fine-tuned models with several methods and score them."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer


def parse_method_options(pairs: list[str] | None, methods: list[str]) -> dict[str, dict[str, Any]]:
    """``--option ties.density=0.3`` -> {"ties": {"density": 0.3}}; a key without ``method.`` applies to every method."""
    from polytask.commands._common import parse_options
    from polytask.errors import PolytaskError

    out: dict[str, dict[str, Any]] = {m: {} for m in methods}
    for key, value in parse_options(pairs, "--option").items():
        method, dot, name = key.rpartition(".")
        if dot and method not in out:
            raise PolytaskError(f"--option {key}=... names method {method!r}, which is not in --methods ({', '.join(methods)})")
        for m in ([method] if dot else methods):
            out[m][name] = value
    return out


def register(app: typer.Typer) -> None:
    @app.command("merge-bench")
    def merge_bench_cmd(
        suite: str = typer.Option("digits-merge", help="merge suite (polytask list merge-suite): digits-merge, "
                                                       "vision-merge, text-merge, text-merge-lora"),
        methods: str = typer.Option("average,task-arithmetic,ties,dare,breadcrumbs",
                                    help="comma-separated mergers or fusers (polytask list merger, polytask list fuser)"),
        seeds: int = typer.Option(1, min=1, help="number of seeds (0..K-1) for randomised mergers and data draws"),
        out: Optional[Path] = typer.Option(None, help="directory for metrics.json, results.csv, normalized_accuracy.png"),
        option: Optional[list[str]] = typer.Option(None, help="merger option METHOD.key=value or key=value (repeatable)"),
        suite_option: Optional[list[str]] = typer.Option(None, help="suite build option key=value, e.g. epochs=5"),
        tune: bool = typer.Option(True, help="choose λ of task-arithmetic/ties/dare/breadcrumbs on the validation split"),
        threads: int = typer.Option(1, min=1, help="torch CPU threads"),
        progress: bool = typer.Option(True, help="show a progress bar while building the suite"),
    ) -> None:
        """Merge a suite's fine-tuned models with each method; report accuracy normalised by the fine-tuned models."""
        import torch

        from polytask.commands._common import console, parse_options
        from polytask.merging.bench import BenchConfig, run_bench
        from polytask.merging.report import print_table

        torch.set_num_threads(threads)
        names = [m.strip() for m in methods.split(",") if m.strip()]
        config = BenchConfig(suite, names, seeds, parse_method_options(option, names),
                             parse_options(suite_option, "--suite-option"), tune)

        def report(r: dict[str, Any]) -> None:
            console.print(f"  {r['method']:16s} seed {r['seed']}: average normalised accuracy "
                          f"{r['average_normalized_accuracy']:.3f}", highlight=False)

        payload = run_bench(config, out, progress=progress, report=report)
        print_table(console, payload)
        if out is not None:
            console.print(f"wrote {out}/metrics.json, results.csv, normalized_accuracy.png")
