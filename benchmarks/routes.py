"""Train jointly, learn in sequence, or merge? Every default method of every route on the comparison suites.

Each suite runs ``polytask compare`` in its own process with one torch thread (two at a time on two
cores); its cells are cached under ``benchmarks/results/routes/<suite>/cells``, so an interrupted
benchmark continues where it stopped. The summary (``routes.md``, ``routes.json``) checks the
published orderings on every suite:

* multi-task training at or near the individual models (LibMTL, Lin & Zhang 2023; here: joint
  shared-bottom + EW within 5 % of the individual models);
* task arithmetic below them (Ilharco et al., ICLR 2023, Sec. 4: adding task vectors keeps only part of
  the individual models' accuracy; their figures are not quoted here, as this session could not check
  them against the paper's tables) and TIES and aTLAS above task arithmetic;
* sequential fine-tuning forgetting (below the joint model) and replay / DER recovering most of it.

    python benchmarks/routes.py                                   # digits (3 seeds), vision, text
    python benchmarks/routes.py --suites digits-merge --seeds 3
    python benchmarks/routes.py --render                          # rewrite routes.md from the reports
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, setup  # noqa: E402

SUITES: dict[str, dict[str, Any]] = {
    "digits-merge": {"options": [], "seeds": 3},
    "vision-merge": {"options": [], "seeds": 3},
    "text-merge": {"options": ["subset=600"], "seeds": 3},
}
OUT = RESULTS / "routes"


def run_suite(name: str, seeds: int) -> float:
    args = [sys.executable, "-m", "polytask", "compare", "--suite", name, "--seeds", str(seeds), "--threads", "1",
            "--no-progress", "--out", str(OUT / name)]
    for option in SUITES[name]["options"]:
        args += ["--suite-option", option]
    start = time.perf_counter()
    subprocess.run(args, check=True)
    return time.perf_counter() - start


def _row(report: dict[str, Any], route: str, method: str) -> dict[str, Any] | None:
    return next((r for r in report["summary"] if r["route"] == route and r["method"] == method), None)


def checks(report: dict[str, Any]) -> list[tuple[str, bool | None]]:
    """The published orderings, each True / False, or None where a method is missing."""
    def score(route: str, method: str) -> float | None:
        row = _row(report, route, method)
        return None if row is None else row["average_normalized"]

    def check(text: str, ok: Any) -> tuple[str, bool | None]:
        return text, None if ok is None else bool(ok)

    sb, ta, ties, atlas = score("joint", "shared-bottom+ew"), score("merge", "task-arithmetic"), \
        score("merge", "ties"), score("merge", "atlas")
    ft, replay = score("continual", "finetune"), score("continual", "replay")
    der = score("continual", "der++") if _row(report, "continual", "der++") else score("continual", "der")  # pre-rename reports
    both = lambda *v: None if any(x is None for x in v) else True  # noqa: E731
    return [
        check("joint shared-bottom+ew within 5% of the individual models", both(sb) and sb >= 0.95),
        check("task arithmetic below the individual models", both(ta) and ta < 1.0),
        check("TIES above task arithmetic", both(ties, ta) and ties > ta),
        check("aTLAS above task arithmetic", both(atlas, ta) and atlas > ta),
        check("sequential fine-tuning below the joint model (forgetting)", both(ft, sb) and ft < sb),
        check("replay recovers at least half of the gap", both(replay, ft, sb) and replay - ft >= 0.5 * (sb - ft)),
        check("DER recovers at least half of the gap", both(der, ft, sb) and der - ft >= 0.5 * (sb - ft)),
    ]


def render(env: dict[str, Any], seconds: dict[str, float]) -> None:
    from polytask.io import write_json, write_text

    parts = ["# Routes: train jointly, learn in sequence, or merge?", "",
             f"`python benchmarks/routes.py`; torch {env['torch']}, {env['threads']} thread per suite, "
             f"{env['cpus']} CPUs. Each suite's full report (per-task tables, Pareto plots) is in "
             "`benchmarks/results/routes/<suite>/`.", ""]
    summary: dict[str, Any] = {"env": env, "suites": {}}
    for name in SUITES:
        path = OUT / name / "report.md"
        if not path.is_file():
            continue
        report = json.loads((OUT / name / "report.json").read_text())
        lines = path.read_text().splitlines()
        parts += [f"## {name}", "", *lines[2:], "Published orderings:", ""]
        results = checks(report)
        parts += [f"- {'holds' if ok else ('fails' if ok is False else 'not run')}: {text}" for text, ok in results]
        wall = seconds.get(name)
        known = isinstance(wall, (int, float)) and not math.isnan(wall)
        parts += ["", f"Wall time: {wall:.0f} s." if known else
                  f"Wall time: not recorded (run as `polytask compare --suite {name}`).", ""]
        summary["suites"][name] = {"summary": report["summary"], "checks": dict(results),
                                   "seconds": seconds.get(name)}
    write_json(RESULTS / "routes.json", summary)
    write_text(RESULTS / "routes.md", "\n".join(parts) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suites", default=",".join(SUITES))
    parser.add_argument("--seeds", type=int, default=None, help="seeds per suite (default: 3)")
    parser.add_argument("--render", action="store_true", help="only rewrite routes.md from the saved reports")
    args = parser.parse_args()
    env = setup(1)
    previous = json.loads((RESULTS / "routes.json").read_text()) if (RESULTS / "routes.json").is_file() else {}
    seconds = {k: v.get("seconds") or float("nan") for k, v in previous.get("suites", {}).items()}
    if not args.render:
        names = [s for s in args.suites.split(",") if s]
        with ThreadPoolExecutor(2) as pool:
            for name, s in zip(names, pool.map(lambda n: run_suite(n, args.seeds or SUITES[n]["seeds"]), names)):
                seconds[name] = s
    render(env, seconds)


if __name__ == "__main__":
    main()
