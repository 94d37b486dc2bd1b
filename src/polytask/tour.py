"""``polytask tour``: a guided run on bundled data that prints tables and writes plots."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from polytask.joint import RunConfig, run
from polytask.io import write_json
from polytask.registry import ARCHITECTURES, WEIGHTINGS
from polytask.trainer import TrainConfig

JOINT_SUITES: list[tuple[str, dict[str, Any], int]] = [
    ("synthetic-mmoe", {"correlation": 0.5, "num_samples": 4000}, 12),
    ("digits-multi", {}, 25),
    ("penguins", {}, 60),
]
JOINT_METHODS = [("shared-bottom", "ew"), ("mmoe", "ew"), ("mmoe", "uw"), ("ple", "ew"),
                 ("mmoe", "pcgrad"), ("mmoe", "nash-mtl"), ("home", "famo")]
# same widths for every architecture: experts as wide as the shared bottom (64), towers 32
WIDTHS: dict[str, dict[str, Any]] = {"shared-bottom": {"bottom": [64], "tower": [32]}}
EXPERT_WIDTHS = {"expert": [64], "tower": [32]}


def joint_section(out: Path, quick: bool, console: Console) -> list[dict[str, Any]]:
    """Joint route: architectures x weightings on two suites, Δm against single-task baselines."""
    methods = [(a, w) for a, w in JOINT_METHODS if a in ARCHITECTURES and w in WEIGHTINGS]
    suites = JOINT_SUITES[1:] if quick else JOINT_SUITES
    methods = methods[:2] if quick else methods
    rows: list[dict[str, Any]] = []
    for suite, suite_options, epochs in suites:
        for arch, weighting in methods:
            cfg = RunConfig(suite=suite, arch=arch, weighting=weighting, suite_options=suite_options,
                            arch_options=WIDTHS.get(arch, EXPERT_WIDTHS),
                            train=TrainConfig(epochs=2 if quick else epochs, batch_size=128, lr=3e-3,
                                              num_threads=1, progress=False))
            start = time.perf_counter()
            result = run(cfg)
            main = {t.name: result.metrics["test"][t.name][t.main_metric] for t in result.suite.tasks}
            rows.append({"suite": suite, "arch": arch, "weighting": weighting, "delta_m": result.metrics["delta_m"],
                         "seconds": round(time.perf_counter() - start, 1),
                         **{f"{k} ({result.suite.task(k).main_metric})": round(v, 4) for k, v in main.items()}})
            console.print(f"  {suite:15s} {arch:14s} {weighting:10s} Δm={result.metrics['delta_m']:+7.2f}%")
    for suite, _, _ in suites:
        _table(console, f"Joint route on {suite}: test metrics, Δm vs single-task baselines",
               [{k: v for k, v in r.items() if k != "suite"} for r in rows if r["suite"] == suite])
    _plot_delta_m(rows, out / "joint_delta_m.png")
    return rows


def _table(console: Console, title: str, rows: list[dict[str, Any]]) -> None:
    table = Table(title=title)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    for k in keys:
        table.add_column(k, justify="right" if k not in ("arch", "weighting") else "left", overflow="fold")
    for r in rows:
        table.add_row(*[f"{r[k]:+.2f}" if k == "delta_m" else str(r.get(k, "")) for k in keys])
    console.print(table)


def _plot_delta_m(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    suites = list(dict.fromkeys(r["suite"] for r in rows))
    fig, axes = plt.subplots(1, len(suites), figsize=(5 * len(suites), 3.5), squeeze=False)
    for ax, suite in zip(axes[0], suites):
        sub = [r for r in rows if r["suite"] == suite]
        labels = [f"{r['arch']}\n{r['weighting']}" for r in sub]
        values = [r["delta_m"] for r in sub]
        ax.bar(labels, values, color=["tab:green" if v >= 0 else "tab:red" for v in values])
        ax.axhline(0, color="black", lw=0.8)
        ax.set_title(suite)
        ax.set_ylabel("Δm vs single-task (%)")
        ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def compare_section(out: Path, quick: bool, console: Console) -> list[dict[str, Any]]:
    """All three routes on digits-merge from one pretrained body: the table and the Pareto plot."""
    from polytask.comparison import CompareConfig, compare
    from polytask.comparison.report import rich_table

    methods = {"joint": ["shared-bottom+ew", "mmoe+uw"], "continual": ["finetune", "replay"],
               "merge": ["task-arithmetic", "ties"]}
    payload = compare(CompareConfig(suite="digits-merge", methods=methods, epochs=1 if quick else 5),
                      out / "compare", progress=True)
    console.print(rich_table(payload))
    console.print(escape(f"  Pareto plots: {out}/compare/pareto_cost.png, pareto_params.png"), highlight=False)
    return payload["summary"]


def run_tour(out: Path, quick: bool = False, console: Console | None = None) -> None:
    """Run every section of the tour, writing tables (JSON) and plots (PNG) under ``out``."""
    console = console or Console()
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    from polytask.continual._tour import tour_section as continual_section
    from polytask.merging._tour import tour_section as merge_section

    results: dict[str, list[dict[str, Any]]] = {}
    for key, title, section in (("joint", "joint multi-task training", joint_section),
                                ("continual", "continual learning, one task after another", continual_section),
                                ("merge", "merging separately fine-tuned models", merge_section),
                                ("compare", "one suite, three routes: which one should you ship?", compare_section)):
        console.rule(f"polytask tour — {title}")
        results[key] = section(out, quick, console)
    write_json(out / "tour_results.json", results)
    console.print(escape(f"tour finished in {time.perf_counter() - start:.0f} s; tables and plots in {out}/"))
