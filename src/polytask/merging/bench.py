"""The merge benchmark: every chosen merger and seed on one merge suite, scored by normalised accuracy.

:func:`run_bench` builds (or loads) the suite, evaluates each method with
:func:`~polytask.merging.evaluate.evaluate_merger` and, given ``out``, writes ``metrics.json``
(the whole payload), ``runs/<method>/seed-<k>/metrics.json``, ``results.csv`` and
``normalized_accuracy.png``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from polytask.errors import PolytaskError
from polytask.io import write_json
from polytask.merging.evaluate import check_methods, evaluate_merger
from polytask.merging.report import results_csv, summary_rows, write_plot
from polytask.merging.suites import get_spec, load_merge_suite


@dataclass
class BenchConfig:
    """A suite, the mergers to run on it with their options, how many seeds (0..seeds-1), and whether to tune λ."""

    suite: str
    methods: list[str]
    seeds: int = 1
    options: dict[str, dict[str, Any]] = field(default_factory=dict)  # method -> merger options
    suite_options: dict[str, Any] = field(default_factory=dict)       # build options of the suite
    tune: bool = True                                                 # choose λ on validation where a merger has a grid

    def __post_init__(self) -> None:
        get_spec(self.suite)
        check_methods(self.methods)
        if self.seeds < 1:
            raise PolytaskError(f"seeds must be at least 1, not {self.seeds}")


def run_bench(config: BenchConfig, out: Path | None = None, progress: bool = True,
              report: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Evaluate every method and seed of ``config``; ``report`` sees each run's metrics as it finishes."""
    suite = load_merge_suite(config.suite, progress=progress, **config.suite_options)
    runs = []
    for method in config.methods:
        for seed in range(config.seeds):
            r = evaluate_merger(suite, method, seed, config.options.get(method), tune=config.tune)
            runs.append(r)
            if report is not None:
                report(r)
    payload = {
        "route": "merge", "suite": config.suite, "methods": config.methods, "seeds": list(range(config.seeds)),
        "suite_options": config.suite_options, "threads": torch.get_num_threads(),
        "finetuned": {t: {"accuracy": suite.meta["finetuned_accuracy"][t]} for t in suite.tasks},
        "base": {t: {"accuracy": suite.meta["base_accuracy"][t]} for t in suite.tasks},
        "summary": summary_rows(runs, suite.tasks), "runs": runs,
    }
    if out is not None:
        for r in runs:
            write_json(out / "runs" / r["method"] / f"seed-{r['seed']}" / "metrics.json", r)
        write_json(out / "metrics.json", payload)
        results_csv(out / "results.csv", payload["summary"], suite.tasks)
        write_plot(out / "normalized_accuracy.png", payload["summary"], suite.tasks,
                   f"{config.suite}: merged / fine-tuned accuracy")
    return payload
