"""Every weighting method x seeds on digits-multi and synthetic-recsys: per-task metrics and Δm.

Δm is measured against single-task baselines trained with the same backbone and settings
(cached). Mean ± std over seeds; one thread.

    python benchmarks/weighting_quality.py [--seeds 3] [--methods ew,uw,...] [--suites digits-multi,...]
    python benchmarks/weighting_quality.py --methods nash-mtl,upgrad --update   # rerun these, keep the other rows
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from _common import RESULTS, markdown_table, setup, write_results
from polytask import WEIGHTINGS, RunConfig, TrainConfig, run

SETTINGS = {
    "digits-multi": dict(arch="shared-bottom", suite_options={}, epochs=30, lr=3e-3, batch_size=128),
    "synthetic-recsys": dict(arch="mmoe", suite_options={"num_samples": 20000}, epochs=6, lr=3e-3, batch_size=256),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--methods", default=",".join(WEIGHTINGS.names()))
    parser.add_argument("--suites", default=",".join(SETTINGS))
    parser.add_argument("--update", action="store_true", help="keep the stored rows of methods not rerun")
    args = parser.parse_args()
    env = setup(threads=1)
    runs, rows = [], []
    if args.update:
        stored = json.loads((RESULTS / "weighting_quality.json").read_text())
        again = set(args.methods.split(","))
        runs = [r for r in stored["runs"] if r["method"] not in again]
        rows = [r for r in stored["rows"] if r["method"] not in again]
    for suite in args.suites.split(","):
        s = SETTINGS[suite]
        for method in args.methods.split(","):
            per_seed = []
            for seed in range(args.seeds):
                cfg = RunConfig(suite=suite, arch=s["arch"], weighting=method, suite_options=s["suite_options"],
                                train=TrainConfig(epochs=s["epochs"], lr=s["lr"], batch_size=s["batch_size"],
                                                  seed=seed, progress=False))
                start = time.perf_counter()
                m = run(cfg).metrics
                rec = {"suite": suite, "method": method, "seed": seed, "delta_m": m["delta_m"],
                       "seconds": time.perf_counter() - start,
                       **{f"{t}/{k}": v for t, r in m["test"].items() for k, v in r.items() if k != "loss"}}
                runs.append(rec)
                per_seed.append(rec)
            row = {"suite": suite, "method": method}
            for key in [k for k in per_seed[0] if "/" in k or k == "delta_m"]:
                vals = [r[key] for r in per_seed]
                row[key] = f"{statistics.mean(vals):.4f} ± {statistics.stdev(vals) if len(vals) > 1 else 0:.4f}"
            row["s/run"] = round(statistics.mean(r["seconds"] for r in per_seed), 1)
            rows.append(row)
            print(row, flush=True)
    rows.sort(key=lambda r: (list(SETTINGS).index(r["suite"]), r["method"]))
    runs.sort(key=lambda r: (list(SETTINGS).index(r["suite"]), r["method"], r["seed"]))
    md = ["# Weighting methods: quality\n",
          f"threads={env['threads']}; {args.seeds} seeds; mean ± std; Δm in % vs single-task baselines (higher is better).\n"]
    for suite in args.suites.split(","):
        s = SETTINGS[suite]
        md.append(f"\n## {suite} ({s['arch']}, {s['epochs']} epochs, lr {s['lr']}, batch {s['batch_size']})\n\n")
        md.append(markdown_table([{k: v for k, v in r.items() if k != "suite"} for r in rows if r["suite"] == suite]))
    plot(runs, args.suites.split(","))
    md.append("\n![delta m](weighting_quality.png)\n")
    stored_args = {**vars(args), "methods": ",".join(dict.fromkeys(r["method"] for r in rows))}
    write_results("weighting_quality", {"env": env, "args": stored_args, "rows": rows, "runs": runs}, "".join(md))
    print("".join(md))


def plot(runs: list[dict], suites: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(suites), 1, figsize=(9, 3.2 * len(suites)), squeeze=False)
    for ax, suite in zip(axes[:, 0], suites):
        sub = [r for r in runs if r["suite"] == suite]
        methods = list(dict.fromkeys(r["method"] for r in sub))
        means = [statistics.mean(r["delta_m"] for r in sub if r["method"] == m) for m in methods]
        stds = [statistics.pstdev([r["delta_m"] for r in sub if r["method"] == m]) for m in methods]
        ax.bar(methods, means, yerr=stds, capsize=2, color=["tab:green" if v >= 0 else "tab:red" for v in means])
        ax.axhline(0, color="black", lw=0.8)
        ax.set_ylabel("Δm (%)")
        ax.set_title(suite)
        ax.tick_params(axis="x", rotation=45, labelsize=8)
    fig.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    fig.savefig(RESULTS / "weighting_quality.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
