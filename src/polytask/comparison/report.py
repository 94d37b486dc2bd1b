"""The cross-route report: normalised scores, Δm, costs; report.md/json, results.csv and plots.

For a method m, task t and seed s with test accuracy a_{m,t,s} and the individual fine-tuned
model's accuracy a*_t (the ceiling, fine-tuned on t alone from the same pretrained body):

    normalised_{m,t,s} = a_{m,t,s} / a*_t                       (Ilharco et al., ICLR 2023, Sec. 4)
    Δm_{m,s} = 100/T · Σ_t (a_{m,t,s} − a*_t) / a*_t            (Maninis et al. 2019; single-task = a*)

Rows report the mean over seeds (and the standard deviation of the average normalised score).
"""

from __future__ import annotations

import csv
import io
import statistics
from pathlib import Path
from typing import Any, Sequence

from polytask.io import atomic_path, write_json, write_text

COST_KEYS = ("train_seconds", "gradient_steps", "stored_parameters", "inference_parameters", "inference_seconds")
ROUTE_ORDER = {"reference": 0, "joint": 1, "continual": 2, "merge": 3}


def score(record: dict[str, Any], ceiling: dict[str, float]) -> dict[str, Any]:
    """Normalised accuracy per task, its average, the average accuracy and Δm of one cell."""
    tasks = list(ceiling)
    norm = {t: record["accuracy"][t] / max(ceiling[t], 1e-12) for t in tasks}
    return {"normalized": norm, "average_normalized": sum(norm.values()) / len(tasks),
            "average_accuracy": sum(record["accuracy"][t] for t in tasks) / len(tasks),
            "delta_m": 100.0 * sum(norm[t] - 1.0 for t in tasks) / len(tasks)}


def _mean(values: Sequence[Any]) -> Any:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def summarize(records: list[dict[str, Any]], ceiling: dict[str, float]) -> list[dict[str, Any]]:
    """One row per (route, method): means over seeds of the scores and costs."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["route"], r["method"]), []).append({**r, **score(r, ceiling)})
    rows = []
    for (route, method), runs in sorted(groups.items(), key=lambda kv: (ROUTE_ORDER.get(kv[0][0], 9), kv[0][1])):
        avg = [r["average_normalized"] for r in runs]
        row = {"route": route, "method": method, "seeds": len(runs),
               "average_normalized": _mean(avg), "average_normalized_std": statistics.pstdev(avg) if len(avg) > 1 else 0.0,
               "average_accuracy": _mean([r["average_accuracy"] for r in runs]),
               "delta_m": _mean([r["delta_m"] for r in runs]),
               "normalized": {t: _mean([r["normalized"][t] for r in runs]) for t in ceiling},
               "accuracy": {t: _mean([r["accuracy"][t] for r in runs]) for t in ceiling},
               "data_access": runs[0]["data_access"]}
        row.update({k: _mean([r.get(k) for r in runs]) for k in COST_KEYS})
        for extra in ("forgetting", "backward_transfer"):
            if extra in runs[0]:
                row[extra] = _mean([r[extra] for r in runs])
        rows.append(row)
    return rows


def _fmt(v: Any, kind: str = "") -> str:
    if v is None:
        return "–"
    if kind == "int":
        return f"{v / 1e6:.2f}M" if v >= 1e6 else (f"{v / 1e3:.1f}k" if v >= 1e3 else f"{int(v)}")
    if kind == "s":
        return f"{v:.1f}"
    return f"{v:.3f}"


TABLE_COLUMNS = (("route", "route", ""), ("method", "method", ""), ("normalised acc.", "average_normalized", "pm"),
                 ("avg acc.", "average_accuracy", "f3"), ("Δm %", "delta_m", "pct"), ("train s", "train_seconds", "s"),
                 ("grad steps", "gradient_steps", "int"), ("stored params", "stored_parameters", "int"),
                 ("inference params", "inference_parameters", "int"), ("inference ms", "inference_seconds", "ms"),
                 ("data access", "data_access", ""))


def cell_text(row: dict[str, Any], key: str, kind: str) -> str:
    v = row.get(key)
    if kind == "pm":
        return f"{v:.3f} ± {row['average_normalized_std']:.3f}" if row["seeds"] > 1 else f"{v:.3f}"
    if kind == "pct":
        return f"{v:+.1f}"
    if kind == "":
        return str(v)
    if kind == "ms":
        return "–" if v is None else f"{1000 * v:.0f}"
    return _fmt(v, kind)


def markdown(payload: dict[str, Any]) -> str:
    rows, tasks = payload["summary"], payload["tasks"]
    head = [c[0] for c in TABLE_COLUMNS]
    lines = [f"# {payload['suite']}: train jointly, learn in sequence, or merge?", "",
             f"Seeds: {payload['seeds']}; budget: {payload['epochs']} epochs per task; torch threads: {payload['threads']}. "
             "Normalised accuracy = accuracy / the individual fine-tuned model's (mean over tasks); "
             "Δm against the individual models.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join(cell_text(r, key, kind) for _, key, kind in TABLE_COLUMNS) + " |")
    lines += ["", "Per task (normalised accuracy):", "",
              "| route | method | " + " | ".join(tasks) + " |", "|---|---|" + "---|" * len(tasks)]
    for r in rows:
        lines.append(f"| {r['route']} | {r['method']} | " + " | ".join(f"{r['normalized'][t]:.3f}" for t in tasks) + " |")
    lines += ["", "Individual fine-tuned accuracy (the ceiling): " +
              ", ".join(f"{t} {a:.3f}" for t, a in payload["ceiling"].items()),
              "Frozen pretrained body + linear probe (the floor): " +
              ", ".join(f"{t} {a:.3f}" for t, a in payload["floor"].items()), ""]
    return "\n".join(lines)


def results_csv(path: Path, records: list[dict[str, Any]], ceiling: dict[str, float]) -> None:
    """One row per cell (route, method, seed): accuracy and normalised accuracy per task, scores, costs."""
    tasks = list(ceiling)
    out = io.StringIO()
    w = csv.writer(out)
    w.writerow(["route", "method", "seed", "average_normalized", "average_accuracy", "delta_m", *COST_KEYS,
                *[f"accuracy/{t}" for t in tasks], *[f"normalized/{t}" for t in tasks]])
    for r in records:
        s = score(r, ceiling)
        w.writerow([r["route"], r["method"], r["seed"], f"{s['average_normalized']:.6f}", f"{s['average_accuracy']:.6f}",
                    f"{s['delta_m']:.4f}", *["" if r.get(k) is None else r[k] for k in COST_KEYS],
                    *[f"{r['accuracy'][t]:.6f}" for t in tasks], *[f"{s['normalized'][t]:.6f}" for t in tasks]])
    write_text(path, out.getvalue())


COLORS = {"reference": "#555555", "joint": "#1f77b4", "continual": "#d62728", "merge": "#2ca02c"}
MARKERS = {"reference": "s", "joint": "o", "continual": "^", "merge": "D"}


def _save(fig: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=130, bbox_inches="tight")


def pareto_plot(path: Path, rows: list[dict[str, Any]], records: list[dict[str, Any]], ceiling: dict[str, float],
                x_key: str, x_label: str, title: str) -> None:
    """Average normalised accuracy against one cost, one marker per method, seeds as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    placed: list[tuple[float, float]] = []
    for r in rows:
        if r["route"] == "reference" and r["method"] == "probe":
            ax.axhline(r["average_normalized"], color=COLORS["reference"], lw=0.8, ls=":")
            ax.text(0.01, r["average_normalized"], " floor: frozen body + linear probes", transform=ax.get_yaxis_transform(),
                    va="bottom", fontsize=7, color=COLORS["reference"])
            continue
        if r.get(x_key) is None:
            continue
        x, y = r[x_key], r["average_normalized"]
        seeds = [score(c, ceiling)["average_normalized"] for c in records
                 if c["route"] == r["route"] and c["method"] == r["method"]]
        ax.errorbar(x, y, yerr=[[y - min(seeds)], [max(seeds) - y]], fmt=MARKERS[r["route"]],
                    color=COLORS[r["route"]], markersize=8, capsize=3)
        near = sum(1 for px, py in placed if abs(px - x) <= 0.15 * max(px, x) and abs(py - y) < 0.012)
        placed.append((x, y))
        ax.annotate(r["method"], (x, y), textcoords="offset points", xytext=(7, 3 - 10 * near), fontsize=8)
    for route, color in COLORS.items():
        if any(r["route"] == route for r in rows):
            ax.plot([], [], MARKERS[route], color=color, label=route)
    ax.axhline(1.0, color="#999999", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set_xlabel(x_label)
    ax.set_ylabel("average normalised accuracy (individual = 1)")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, path)
    plt.close(fig)


def per_task_plot(path: Path, rows: list[dict[str, Any]], tasks: list[str], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(7, 0.5 * len(rows) * len(tasks) / 2), 4.5))
    width = 0.8 / max(len(rows), 1)
    for i, r in enumerate(rows):
        xs = [j + i * width for j in range(len(tasks))]
        ax.bar(xs, [r["normalized"][t] for t in tasks], width, label=f"{r['route']}: {r['method']}",
               color=COLORS[r["route"]], alpha=0.35 + 0.65 * (i + 1) / len(rows))
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(tasks))], tasks)
    ax.axhline(1.0, color="#999999", lw=0.8, ls="--")
    ax.set_ylabel("normalised accuracy")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    _save(fig, path)
    plt.close(fig)


def write_report(out: Path, payload: dict[str, Any], records: list[dict[str, Any]]) -> None:
    """report.md, report.json, results.csv, pareto_cost.png, pareto_params.png, per_task.png under ``out``."""
    ceiling, rows, name = payload["ceiling"], payload["summary"], payload["suite"]
    write_json(out / "report.json", {**payload, "cells": records})
    results_csv(out / "results.csv", records, ceiling)
    pareto_plot(out / "pareto_cost.png", rows, records, ceiling, "train_seconds",
                "training seconds from the pretrained body, all tasks (log)", f"{name}: score against training cost")
    pareto_plot(out / "pareto_params.png", rows, records, ceiling, "stored_parameters",
                "parameters stored after training (log)", f"{name}: score against stored parameters")
    per_task_plot(out / "per_task.png", rows, payload["tasks"], f"{name}: normalised accuracy per task")
    write_text(out / "report.md", markdown(payload))


def rich_table(payload: dict[str, Any]) -> Any:
    """The summary as a rich Table (what ``polytask compare`` prints)."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=escape(f"{payload['suite']}: normalised to the individual fine-tuned models "
                               f"({payload['seeds']} seed(s), {payload['epochs']} epochs per task)"))
    for head, _, kind in TABLE_COLUMNS:
        table.add_column(head, justify="left" if kind == "" else "right")
    for row in payload["summary"]:
        table.add_row(*[escape(cell_text(row, key, kind)) for _, key, kind in TABLE_COLUMNS])
    return table
