"""Tables, CSV and bar plots of merge results (normalised accuracy per task and on average)."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from polytask.io import atomic_path, write_text


def summary_rows(runs: list[dict[str, Any]], tasks: list[str]) -> list[dict[str, Any]]:
    """One row per method: mean normalised accuracy per task and on average (and its std over seeds)."""
    rows = []
    for method in dict.fromkeys(r["method"] for r in runs):
        mine = [r for r in runs if r["method"] == method]
        avg = [r["average_normalized_accuracy"] for r in mine]
        row: dict[str, Any] = {"method": method, "seeds": len(mine)}
        for t in tasks:
            row[t] = statistics.fmean(r["normalized_accuracy"][t] for r in mine)
        row["average"] = statistics.fmean(avg)
        row["std"] = statistics.stdev(avg) if len(avg) > 1 else 0.0
        row["average_accuracy"] = statistics.fmean(r["average_accuracy"] for r in mine)
        rows.append(row)
    return rows


def results_csv(path: Path, rows: list[dict[str, Any]], tasks: list[str]) -> None:
    keys = ["method", "seeds", *tasks, "average", "std", "average_accuracy"]
    lines = [",".join(keys)] + [",".join(f"{r[k]:.4f}" if isinstance(r[k], float) else str(r[k]) for k in keys) for r in rows]
    write_text(path, "\n".join(lines) + "\n")


def print_table(console: Any, payload: dict[str, Any]) -> None:
    from rich.table import Table

    tasks = list(payload["finetuned"])
    table = Table(title=f"{payload['suite']}: normalised accuracy (merged / fine-tuned)")
    for col in ["method", *tasks, "average"]:
        table.add_column(col, justify="left" if col == "method" else "right")
    table.add_row("fine-tuned acc.", *[f"{payload['finetuned'][t]['accuracy']:.3f}" for t in tasks], "")
    table.add_row("base (λ=0)", *[f"{payload['base'][t]['accuracy'] / payload['finetuned'][t]['accuracy']:.3f}"
                                  for t in tasks],
                  f"{sum(payload['base'][t]['accuracy'] / payload['finetuned'][t]['accuracy'] for t in tasks) / len(tasks):.3f}")
    for r in payload["summary"]:
        avg = f"{r['average']:.3f}" + (f" ± {r['std']:.3f}" if r["seeds"] > 1 else "")
        table.add_row(r["method"], *[f"{r[t]:.3f}" for t in tasks], avg)
    console.print(table)


def write_plot(path: Path, rows: list[dict[str, Any]], tasks: list[str], title: str) -> None:
    """Bars of the average normalised accuracy per method, dots for the individual tasks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(rows) + 1.5), 3.6))
    xs = range(len(rows))
    ax.bar(xs, [r["average"] for r in rows], yerr=[r["std"] for r in rows], color="tab:blue", alpha=0.7, label="average")
    for i, r in enumerate(rows):
        ax.scatter([i] * len(tasks), [r[t] for t in tasks], s=10, color="black", zorder=3,
                   label="tasks" if i == 0 else None)
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_xticks(list(xs), [r["method"] for r in rows], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("merged / fine-tuned accuracy")
    low = min([r[t] for r in rows for t in tasks] + [r["average"] for r in rows])
    ax.set_ylim(max(0.0, low - 0.05), 1.05)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
