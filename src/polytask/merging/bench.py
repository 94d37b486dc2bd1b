"""The merge benchmark: every chosen merger and seed on one merge suite, scored by normalised accuracy.

:func:`run_bench` builds (or loads) the suite, evaluates each method with
:func:`~polytask.merging.evaluate.evaluate_merger` and, given ``out``, writes ``metrics.json``
(the whole payload), ``runs/<method>/seed-<k>/metrics.json``, ``results.csv`` and
``normalized_accuracy.png``. ``bench.json`` (the settings) is written first and each run's
metrics as soon as it finishes, so a killed benchmark restarted with the same ``--out`` and
settings redoes only the runs that had not finished; ``metrics.json`` is written last.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from polytask.errors import PolytaskError
from polytask.io import read_json_if, write_json
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
    settings = json.loads(json.dumps(asdict(config)))
    resume = out is not None and _check_earlier(out, settings)
    suite = load_merge_suite(config.suite, progress=progress, **config.suite_options)
    if out is not None:
        write_json(out / "bench.json", settings)
    runs = []
    for method in config.methods:
        for seed in range(config.seeds):
            path = None if out is None else out / "runs" / method / f"seed-{seed}" / "metrics.json"
            r = read_json_if(path) if resume and path is not None else None
            if r is None:
                r = evaluate_merger(suite, method, seed, config.options.get(method), tune=config.tune)
                if path is not None:
                    write_json(path, r)
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
        results_csv(out / "results.csv", payload["summary"], suite.tasks)
        write_plot(out / "normalized_accuracy.png", payload["summary"], suite.tasks,
                   f"{config.suite}: merged / fine-tuned accuracy")
        write_json(out / "metrics.json", payload)
    return payload


def _check_earlier(out: Path, settings: dict[str, Any]) -> bool:
    """Whether ``out`` holds a benchmark (``bench.json``) of these settings to finish; refuse a file or other settings."""
    if out.exists() and not out.is_dir():
        raise PolytaskError(f"--out {out} is a file; pass a folder for the benchmark's results")
    earlier = read_json_if(out / "bench.json")
    if earlier is not None and earlier != settings:
        changed = next(k for k in settings if earlier.get(k) != settings[k])
        raise PolytaskError(f"--out {out} holds a merge-bench with other settings ({changed} was {earlier.get(changed)!r}); "
                            "pass a new --out, or the same settings to finish that one")
    return earlier is not None
