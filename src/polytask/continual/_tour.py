"""The continual section of ``polytask tour``: three strategies on split-digits in seconds."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from polytask.continual.metrics import plot_heatmap, plot_over_time
from polytask.continual.runner import run

TOUR_STRATEGIES = ("finetune", "ewc", "replay")


def tour_section(out: Path, quick: bool, console: Console) -> list[dict[str, Any]]:
    """Class-incremental split-digits with finetune, EWC and replay: a table, R heatmaps and an accuracy-over-time plot."""
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    curves: dict[str, list[list[float]]] = {}
    for name in TOUR_STRATEGIES:
        start = time.perf_counter()
        m = run("split-digits", name, seed=0, epochs=2 if quick else None).metrics
        curves[name] = m["accuracy_matrix"]
        plot_heatmap(out / f"continual_{name}_matrix.png", m["accuracy_matrix"], f"{name} on split-digits (class-incremental)")
        rows.append({"scenario": "split-digits", "strategy": name, "average_accuracy": round(m["average_accuracy"], 4),
                     "backward_transfer": round(m["backward_transfer"], 4), "forgetting": round(m["forgetting"], 4),
                     "seconds": round(time.perf_counter() - start, 1)})
    plot_over_time(out / "continual_accuracy_over_time.png", curves, "split-digits, class-incremental")
    table = Table(title="Continual route on split-digits (5 experiences of 2 classes, one head): "
                        "accuracy after the last experience, backward transfer, forgetting")
    for key in ("strategy", "average_accuracy", "backward_transfer", "forgetting", "seconds"):
        table.add_column(key, justify="left" if key == "strategy" else "right")
    for r in rows:
        table.add_row(r["strategy"], f"{r['average_accuracy']:.3f}", f"{r['backward_transfer']:+.3f}",
                      f"{r['forgetting']:.3f}", f"{r['seconds']:.1f}")
    console.print(table)
    console.print("finetune forgets each pair of digits as soon as the next arrives; EWC's Fisher-weighted pull "
                  "keeps a little; replaying a 500-sample memory keeps the most.", highlight=False)
    return rows
