"""``compare``: run every route on one suite, cell by cell, and write one report across them.

A cell is one method of one route at one seed (plus the two references). Each finished cell is
written to ``out/cells/<route>/<method>/seed-<s>.json`` (atomically) with the key it was run
for; a restarted comparison loads the cells whose key matches and runs only the others, so a
killed run loses at most the cell in progress, and the numbers do not depend on which cells were
run in which process (every cell reseeds).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from polytask.comparison.cells import REFERENCES, run_cell
from polytask.comparison.report import summarize, write_report
from polytask.comparison.suite import COMPARE_SUITES, ComparisonSuite, comparison_suite
from polytask.config import RouteConfig
from polytask.errors import PolytaskError
from polytask.io import write_json
from polytask.registry import ARCHITECTURES, FUSERS, MERGERS, STRATEGIES, WEIGHTINGS

ROUTES = ("joint", "continual", "merge")
#: what every trained cell starts from (part of each cell's key: a cell run from another start is redone)
START = "pretrained body; linear heads from the linear probes (LP-FT)"
DEFAULT_METHODS: dict[str, tuple[str, ...]] = {
    "joint": ("shared-bottom+ew", "mmoe+uw", "shared-bottom+mgda"),
    "continual": ("finetune", "ewc", "replay", "der++"),
    "merge": ("task-arithmetic", "ties", "atlas", "twin-merging"),
}


@dataclass
class CompareConfig(RouteConfig):
    """Suite, routes, methods per route, seeds and the training budget: ``epochs`` per task for every
    route, the individual (and so the merged) models included (default: the suite's fine-tuning epochs)."""

    suite: str = "digits-merge"
    routes: list[str] = field(default_factory=lambda: list(ROUTES))
    methods: dict[str, list[str]] = field(default_factory=dict)
    seeds: int = 1
    epochs: int | None = None
    suite_options: dict[str, Any] = field(default_factory=dict)
    threads: int = 1

    def resolved_methods(self) -> dict[str, list[str]]:
        """The methods of every chosen route (a route's defaults where none are given)."""
        return {r: list(self.methods.get(r) or DEFAULT_METHODS[r]) for r in self.routes}


def parse_methods(spec: str | None) -> dict[str, list[str]]:
    """``"joint:mmoe+uw,merge:ties,merge:atlas"`` -> {"joint": ["mmoe+uw"], "merge": ["ties", "atlas"]}."""
    out: dict[str, list[str]] = {}
    for item in (spec or "").split(","):
        item = item.strip()
        if not item:
            continue
        route, sep, method = item.partition(":")
        if not sep or not method:
            raise PolytaskError(f"method {item!r} names no route; write ROUTE:METHOD, e.g. joint:mmoe+uw, "
                                "continual:ewc or merge:ties")
        out.setdefault(route, []).append(method)
    return out


def check_config(config: CompareConfig) -> None:
    """One-line errors for a suite the routes cannot share, unknown routes or methods, or no seeds."""
    if config.suite not in COMPARE_SUITES:
        raise PolytaskError(f"suite {config.suite!r} cannot serve all three routes (it has no pretrained body "
                            f"fine-tuned per task); choose one of: {', '.join(COMPARE_SUITES)}")
    if config.seeds < 1:
        raise PolytaskError(f"seeds must be at least 1, not {config.seeds}")
    if config.epochs is not None and config.epochs < 1:
        raise PolytaskError(f"epochs must be at least 1, not {config.epochs}")
    if not config.routes:
        raise PolytaskError(f"choose at least one route among: {', '.join(ROUTES)}")
    for route in list(config.routes) + list(config.methods):
        if route not in ROUTES:
            raise PolytaskError(f"unknown route {route!r}; choose among: {', '.join(ROUTES)}")
    unused = [r for r in config.methods if r not in config.routes]
    if unused:
        raise PolytaskError(f"methods are given for route {unused[0]!r}, which is not among the routes "
                            f"({', '.join(config.routes)}); add it to the routes or drop its methods")
    for route, methods in config.resolved_methods().items():
        for method in methods:
            _check_method(route, method)


def _check_method(route: str, method: str) -> None:
    if route == "joint":
        arch, plus, weighting = method.partition("+")
        if not plus:
            raise PolytaskError(f"joint method {method!r} must be ARCH+WEIGHTING, e.g. mmoe+uw")
        ARCHITECTURES.get(arch)
        WEIGHTINGS.get(weighting)
    elif route == "continual":
        STRATEGIES.get(method)
    elif method not in FUSERS:  # the merge route also takes a fuser (fusion at the output)
        MERGERS.get(method)


def suite_options(config: CompareConfig) -> dict[str, Any]:
    """The merge suite's build options: compare's defaults for the suite, the user's, and the budget (the
    epochs its individual models are fine-tuned for)."""
    budget = {"epochs": config.epochs} if config.epochs is not None else {}
    return {**COMPARE_SUITES[config.suite], **config.suite_options, **budget}


def _cell_key(config: CompareConfig, suite: ComparisonSuite, route: str, method: str, seed: int) -> dict[str, Any]:
    key = {"suite": config.suite, "suite_options": suite_options(config), "route": route, "method": method,
           "seed": seed, "suite_built": suite.merge.meta.get("build_seconds")}
    return {**key, "start": START} if route in ("joint", "continual") else key


def cells(config: CompareConfig) -> list[tuple[str, str, int]]:
    """Every (route, method, seed) of the comparison, references first (they do not depend on the seed)."""
    out = [("reference", r, 0) for r in REFERENCES]
    for route, methods in config.resolved_methods().items():
        out += [(route, m, s) for m in methods for s in range(config.seeds)]
    return out


def compare(config: CompareConfig | None = None, out: str | os.PathLike[str] | None = None, *, progress: bool = False,
            console: Any = None, **fields: Any) -> dict[str, Any]:
    """Run the comparison and return the report payload (``summary`` rows, ``cells``, references).

    ``polytask.compare(suite="digits-merge", seeds=1, out="runs/cmp")``; with ``out`` every cell is
    cached there and the report (report.md/json, results.csv, plots) is written there.
    """
    from polytask.merging import load_merge_suite

    config = config or CompareConfig(**fields)
    check_config(config)
    torch.set_num_threads(config.threads)
    out_path = Path(out) if out is not None else None
    start = time.perf_counter()
    suite = comparison_suite(load_merge_suite(config.suite, progress=progress, **suite_options(config)))
    todo = cells(config)
    records: list[dict[str, Any]] = []
    with Progress(TextColumn("[bold]compare[/bold] {task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), disable=not progress, transient=False) as bar:
        job = bar.add_task("", total=len(todo))
        for route, method, seed in todo:
            bar.update(job, description=f"{route}: {method} (seed {seed})")
            key = _cell_key(config, suite, route, method, seed)
            path = out_path / "cells" / route / method / f"seed-{seed}.json" if out_path is not None else None
            record = _load_cell(path, key)
            if record is None:
                record = run_cell(suite, route, method, seed)
                if path is not None:
                    write_json(path, {"key": key, "record": record})
            records.append(record)
            bar.advance(job)
    payload = {"suite": config.suite, "tasks": suite.task_names, "seeds": config.seeds,
               "epochs": suite.finetune["epochs"], "threads": config.threads,
               "config": config.to_dict(), "ceiling": suite.reference("individual"), "floor": suite.reference("probe"),
               "summary": summarize(records, suite.reference("individual")),
               "seconds": round(time.perf_counter() - start, 1)}
    if out_path is not None:
        write_report(out_path, payload, records)
    payload["cells"] = records
    return payload


def _load_cell(path: Path | None, key: dict[str, Any]) -> dict[str, Any] | None:
    if path is None or not path.is_file():
        return None
    saved = json.loads(path.read_text())
    return saved["record"] if saved.get("key") == json.loads(json.dumps(key)) else None
