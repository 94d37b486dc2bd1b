"""The merging section of ``polytask tour``: digits-merge with average, task arithmetic and TIES."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rich.console import Console

TOUR_METHODS = ("average", "task-arithmetic", "ties")


def tour_section(out: Path, quick: bool, console: Console) -> list[dict[str, Any]]:
    """Build (or load) digits-merge, merge it three ways, print a table, write ``merge_normalized_accuracy.png``.

    ``quick`` uses three tasks and shorter fine-tuning (a separately cached suite).
    """
    from polytask.merging.evaluate import evaluate_merger
    from polytask.merging.report import print_table, summary_rows, write_plot
    from polytask.merging.suites import load_merge_suite

    options: dict[str, Any] = ({"tasks": ["parity", "mirror", "invert"], "pretrain_epochs": 2, "epochs": 8}
                               if quick else {})
    start = time.perf_counter()
    suite = load_merge_suite("digits-merge", progress=True, **options)
    runs = [evaluate_merger(suite, m, seed=0) for m in TOUR_METHODS]
    summary = summary_rows(runs, suite.tasks)
    payload = {"suite": suite.name, "summary": summary,
               "finetuned": {t: {"accuracy": suite.meta["finetuned_accuracy"][t]} for t in suite.tasks},
               "base": {t: {"accuracy": suite.meta["base_accuracy"][t]} for t in suite.tasks}}
    print_table(console, payload)
    out.mkdir(parents=True, exist_ok=True)
    write_plot(out / "merge_normalized_accuracy.png", summary, suite.tasks, "digits-merge: merged / fine-tuned accuracy")
    seconds = round(time.perf_counter() - start, 1)
    console.print(f"  merging: {len(suite.tasks)} fine-tuned MLPs merged 3 ways in {seconds} s "
                  f"-> {out / 'merge_normalized_accuracy.png'}", highlight=False)
    return [{"route": "merge", "suite": suite.name, "method": r["method"],
             "average_normalized_accuracy": round(r["average_normalized_accuracy"], 4),
             **{t: round(v, 4) for t, v in r["normalized_accuracy"].items()}} for r in runs]
