"""``polytask merge-bench``: merge a suite's fine-tuned models with several methods and score them."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer


def parse_method_options(pairs: list[str] | None, methods: list[str]) -> dict[str, dict[str, Any]]:
    """``--option ties.k=30`` -> {"ties": {"k": 30}}; a key without ``method.`` applies to every method."""
    from polytask.cli import parse_options
    from polytask.errors import PolytaskError

    out: dict[str, dict[str, Any]] = {m: {} for m in methods}
    for key, value in parse_options(pairs, "--option").items():
        method, dot, name = key.rpartition(".")
        if dot and method not in out:
            raise PolytaskError(f"--option {key}=... names method {method!r}, which is not in --methods ({', '.join(methods)})")
        for m in ([method] if dot else methods):
            out[m][name] = value
    return out


def run_bench(suite_name: str, methods: list[str], seeds: int, out: Path | None, options: dict[str, dict[str, Any]],
              suite_options: dict[str, Any], tune: bool = True, progress: bool = True, console: Any = None) -> dict[str, Any]:
    """Build/load the suite, evaluate every method and seed, write metrics.json, results.csv and a plot."""
    from polytask.errors import PolytaskError
    from polytask.io import write_json
    from polytask.merging._evaluate import check_methods, evaluate_method
    from polytask.merging._report import results_csv, summary_rows, write_plot
    from polytask.merging._suites import get_spec, load_merge_suite

    get_spec(suite_name)
    check_methods(methods)
    if seeds < 1:
        raise PolytaskError(f"--seeds must be at least 1, not {seeds}")
    suite = load_merge_suite(suite_name, progress=progress, **suite_options)
    runs = []
    for method in methods:
        for seed in range(seeds):
            r = evaluate_method(suite, method, seed, options.get(method), tune=tune)
            runs.append(r)
            if console is not None:
                console.print(f"  {method:16s} seed {seed}: average normalised accuracy "
                              f"{r['average_normalized_accuracy']:.3f}", highlight=False)
    payload = {
        "route": "merge", "suite": suite_name, "methods": methods, "seeds": list(range(seeds)),
        "suite_options": suite_options, "threads": __import__("torch").get_num_threads(),
        "finetuned": {t: {"accuracy": suite.meta["finetuned_accuracy"][t]} for t in suite.tasks},
        "base": {t: {"accuracy": suite.meta["base_accuracy"][t]} for t in suite.tasks},
        "summary": summary_rows(runs, suite.tasks), "runs": runs,
    }
    if out is not None:
        for r in runs:
            write_json(out / "runs" / r["method"] / f"seed-{r['seed']}" / "metrics.json", r)
        write_json(out / "metrics.json", payload)
        results_csv(out / "results.csv", payload["summary"], suite.tasks)
        write_plot(out / "normalized_accuracy.png", payload["summary"], suite.tasks, f"{suite_name}: merged / fine-tuned accuracy")
    return payload


def register(app: typer.Typer) -> None:
    @app.command("merge-bench")
    def merge_bench_cmd(
        suite: str = typer.Option("digits-merge", help="merge suite: digits-merge, vision-merge, text-merge, text-merge-lora"),
        methods: str = typer.Option("average,task-arithmetic,ties,dare,breadcrumbs",
                                    help="comma-separated mergers (polytask list merger)"),
        seeds: int = typer.Option(1, help="number of seeds (0..K-1) for randomised mergers and data draws"),
        out: Optional[Path] = typer.Option(None, help="directory for metrics.json, results.csv, normalized_accuracy.png"),
        option: Optional[list[str]] = typer.Option(None, help="merger option METHOD.key=value or key=value (repeatable)"),
        suite_option: Optional[list[str]] = typer.Option(None, help="suite build option key=value, e.g. epochs=5"),
        tune: bool = typer.Option(True, help="choose λ of task-arithmetic/ties/dare/breadcrumbs on the validation split"),
        threads: int = typer.Option(1, help="torch CPU threads"),
        progress: bool = typer.Option(True, help="show a progress bar while building the suite"),
    ) -> None:
        """Merge a suite's fine-tuned models with each method; report accuracy normalised by the fine-tuned models."""
        import torch

        from polytask.cli import console, parse_options
        from polytask.merging._report import print_table

        torch.set_num_threads(threads)
        names = [m.strip() for m in methods.split(",") if m.strip()]
        payload = run_bench(suite, names, seeds, out, parse_method_options(option, names),
                            parse_options(suite_option, "--suite-option"), tune=tune, progress=progress, console=console)
        print_table(console, payload)
        if out is not None:
            console.print(f"wrote {out}/metrics.json, results.csv, normalized_accuracy.png")
