"""Every merging method on digits-merge, vision-merge, text-merge and text-merge-lora.

Normalised accuracy (merged body + each task's own head, divided by the individually fine-tuned
model's accuracy) per task and on average, with the literature's ordering checked:
TIES and the learned methods above task arithmetic, task arithmetic above averaging.
The fusers (fusion at the output: ensembles of the experts' outputs and Dynamic Logits Fusion) are
reported beside them as the upper bound that keeps every expert, with the models and parameters kept.
Each suite runs in its own process with one torch thread (two processes at a time on two cores);
the suites are built first if not cached (fine-tuning time is in the table).

    python benchmarks/merging.py                   # everything (~20 min on 2 cores)
    python benchmarks/merging.py --suites digits-merge
    python benchmarks/merging.py --render          # re-render merging.md/.png from merging.json
    python benchmarks/merging.py --suites digits-merge --methods dlf,prob-ensemble   # rerun some methods only
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, markdown_table, setup  # noqa: E402

SUITES: dict[str, dict[str, Any]] = {
    "digits-merge": {"options": {}, "seeds": 3},
    "vision-merge": {"options": {}, "seeds": 1},
    "text-merge": {"options": {"subset": 600}, "seeds": 1},
    "text-merge-lora": {"options": {"subset": 600}, "seeds": 1},
}
METHODS = ["average", "task-arithmetic", "ties", "dare", "breadcrumbs", "fisher", "adamerging", "atlas", "twin-merging"]
LEARNED = ("adamerging", "atlas", "twin-merging")
FUSION = ["prob-ensemble", "logit-ensemble", "dlf"]  # keep every expert: reported apart, as the upper bound

NOTES = """\
The literature's ordering (learned methods and TIES > task arithmetic > averaging; Ilharco et al. 2023,
Yadav et al. 2023, Yang et al. 2024) holds only partly at this scale, and the test sets are small
(text: 129 samples per task, so one sample is 0.8 points and most gaps between methods are within noise).

* digits-merge (3 seeds): every method lands between the base (0.751) and the fine-tuned models.
  Averaging (0.876) equals tuned task arithmetic (0.877) and TIES is below both (0.855): the MLP's task
  vectors are dense, with six tasks the tuned λ (0.1) makes task arithmetic nearly the uniform average
  (1/6), and trimming 80% of each tensor (TIES, density = 0.2) removes much of what each task learned.
  aTLAS (0.905, few labelled shots) and Twin-Merging (0.943, which routes each input to its task's
  exclusive part: not a static merge) are best; AdaMerging (0.694, below the base) fails: minimising
  the entropy of heads trained with their fine-tuned bodies rewards confident wrong predictions on the
  mirror task (0.42).
* Fusion at the output (digits-merge; the other suites have not been rerun with the fusers): keeping all
  six experts (6 models, 5.2x the parameters of one merged model; DLF also keeps the base, 6.0x) buys
  little here. The output ensembles
  (mean of probabilities 0.892, of logits 0.888) beat every static merge (task arithmetic 0.877) but not
  aTLAS (0.905) or Twin-Merging (0.943): no fuser is told which expert owns the task, so every input is
  also scored by five bodies through a head fine-tuned with another body. Dynamic Logits Fusion (0.756)
  stays at the base's level (0.751): its rule (Fan et al. 2024, Eq. 3 and its multi-expert form) puts the
  fused distribution's KL from the base at the centroid of the experts' KLs, which fixes how far to move
  from the base but not towards which expert, and the one-expert-per-step search gives the task's own
  expert a mean weight of only 0.08-0.16 (of about 1.1 in total). The paper targets a different setting:
  a larger receiving model and a generation vocabulary that every expert shares.
* text-merge (full fine-tuning): TIES (0.969) and the learned methods beat tuned task arithmetic (0.935),
  but averaging (0.945) also beats task arithmetic: the λ chosen on 64 validation samples per task
  (λ = 1) over-weights wordnet-pos at the expense of tweet-sentiment.
* text-merge-lora: task vectors are low rank and small (the base already reaches 0.94 normalised);
  task arithmetic (0.977) > averaging (0.958) holds, TIES ties task arithmetic, Twin-Merging is best,
  and AdaMerging/aTLAS with the short schedules used here (30 and 20 steps) stay at averaging's level.
* vision-merge: fine-tuning the last EfficientNet-Lite0 blocks for 2 epochs on 2,000 images moves the
  models little (the base with each fine-tuned head already reaches 0.972 normalised; fashion-mnist's
  fine-tuned model is no better than the base), so all static merges sit at 0.98-0.99. Within that narrow
  range the ordering holds for TIES (0.988) > task arithmetic (0.980) > averaging (0.979) and aTLAS
  (1.011); AdaMerging (0.921) and Twin-Merging (0.953) fall below on multi-mnist, whose left and right
  tasks share inputs, so the router cannot tell them apart and the entropy objective cannot either.

The tuned λ sometimes sits at the edge of the grid (TIES: 1.6 on both text suites), so the grid, not the
method, may limit TIES there.
"""


def run_suite(name: str, out: Path, methods: list[str]) -> dict[str, Any]:
    """One suite in a fresh process (threads=1): build/load, run the methods, return merge-bench's payload."""
    cfg = SUITES[name]
    code = (
        "import json, sys, time, torch; torch.set_num_threads(1)\n"
        "from polytask.merging import BenchConfig, load_merge_suite, run_bench\n"
        f"t = time.perf_counter(); s = load_merge_suite({name!r}, progress=False, **{cfg['options']!r})\n"
        "load = time.perf_counter() - t; t = time.perf_counter()\n"
        f"p = run_bench(BenchConfig({name!r}, {methods!r}, {cfg['seeds']}, suite_options={cfg['options']!r}), progress=False)\n"
        "p['seconds'] = {'build_or_load': round(load, 1), 'merge_and_eval': round(time.perf_counter() - t, 1)}\n"
        "p['build'] = {k: s.meta[k] for k in ('build_seconds', 'merged_parameters', 'merged_tensors', 'samples', 'info', 'finetune')}\n"
        f"open({str(out)!r}, 'w').write(json.dumps(p))\n"
    )
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        return {"suite": name, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed",
                "seconds_total": round(time.perf_counter() - start, 1)}
    payload = json.loads(out.read_text())
    payload["seconds_total"] = round(time.perf_counter() - start, 1)
    for r in payload["runs"]:  # keep the JSON small
        r.pop("finetuned", None), r.pop("base", None)
    print(f"{name}: done in {payload['seconds_total']} s", flush=True)
    return payload


def ordering(summary: list[dict[str, Any]]) -> dict[str, Any]:
    avg = {r["method"]: r["average"] for r in summary}
    checks = {
        "ties > task-arithmetic": avg["ties"] > avg["task-arithmetic"],
        "task-arithmetic > average": avg["task-arithmetic"] > avg["average"],
    }
    for m in LEARNED:
        checks[f"{m} > task-arithmetic"] = avg[m] > avg["task-arithmetic"]
    return checks


def render(payload: dict[str, Any]) -> None:
    from polytask.io import atomic_path, write_json, write_text

    lines = ["# Model merging: normalised accuracy on four merge suites", "",
             "Merged body + each task's own fine-tuned head; normalised accuracy = merged / individually "
             "fine-tuned accuracy on the task's test split (Ilharco et al. 2023). λ of task-arithmetic, TIES, DARE "
             "and Breadcrumbs chosen on the validation split; learned methods use the inputs documented in "
             "`polytask/merging/_data.py`.", "",
             f"Environment: {json.dumps(payload['env'])}; one torch thread per process, two processes at a time.", ""]
    for name, res in payload["suites"].items():
        lines += [f"## {name}", ""]
        if "error" in res:
            lines += [f"Failed: `{res['error']}`", ""]
            continue
        b = res["build"]
        lines += [f"{len(res['finetuned'])} tasks, {b['merged_parameters']:,} merged parameters in {b['merged_tensors']} tensors; "
                  f"build {b['build_seconds']} s (cached afterwards), merging + evaluation {res['seconds']['merge_and_eval']} s; "
                  f"seeds: {len(res['seeds'])}; test samples per task: "
                  + ", ".join(f"{t} {v['test']}" for t, v in b["samples"].items()) + ".", ""]
        tasks = list(res["finetuned"])
        rows = [{"method": "fine-tuned (accuracy)", **{t: res["finetuned"][t]["accuracy"] for t in tasks}, "average": ""},
                {"method": "base, λ=0", **{t: res["base"][t]["accuracy"] / res["finetuned"][t]["accuracy"] for t in tasks},
                 "average": sum(res["base"][t]["accuracy"] / res["finetuned"][t]["accuracy"] for t in tasks) / len(tasks)}]
        for r in res["summary"]:
            if r["method"] not in FUSION:
                rows.append({"method": r["method"], **{t: r[t] for t in tasks},
                             "average": f"{r['average']:.4f}" + (f" ± {r['std']:.4f}" if r["seeds"] > 1 else "")})
        lines += [markdown_table(rows, ["method", *tasks, "average"]), ""]
        lines += fusion_table(res, tasks)
        checks = ordering(res["summary"])
        res["ordering"] = checks
        lines += ["Ordering: " + "; ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in checks.items()) + ".", ""]
    if NOTES.strip():
        lines += ["## Reading", "", NOTES.strip(), ""]
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS / "merging.json", payload)
    write_text(RESULTS / "merging.md", "\n".join(lines))
    _plot(payload, atomic_path)


def fusion_table(res: dict[str, Any], tasks: list[str]) -> list[str]:
    """The fusers' rows: normalised accuracy, and what they keep next to one merged model."""
    kept = {r["method"]: r for r in res["runs"] if r.get("family") == "fusion"}
    rows = [{"method": r["method"], **{t: r[t] for t in tasks}, "average": f"{r['average']:.4f}",
             "average accuracy": f"{r['average_accuracy']:.4f}", "models kept": kept[r["method"]]["models_kept"],
             "parameters kept": f"{kept[r['method']]['parameters_kept']:,}",
             "inference s": kept[r["method"]]["inference_seconds"]}
            for r in res["summary"] if r["method"] in kept]
    if not rows:
        return []
    merged = res["build"]["merged_parameters"]
    return ["Fusion at the output, the upper bound in memory that keeps every expert (normalised accuracy; a "
            f"merged model keeps 1 model; each fine-tuned model adds {merged:,} parameters; inference s: every "
            "test set, all models run; one seed's run, fusers are deterministic):", "",
            markdown_table(rows, ["method", *tasks, "average", "average accuracy", "models kept", "parameters kept",
                                  "inference s"]), ""]


def merge_methods(previous: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """``new`` (a run of some methods) with the rows and runs of the other methods kept from ``previous``."""
    if "error" in new or "error" in previous or not previous:
        return new
    redone = set(new["methods"])
    return {**new, "methods": [m for m in previous["methods"] if m not in redone] + new["methods"],
            **{k: [r for r in previous[k] if r["method"] not in redone] + new[k] for k in ("summary", "runs")}}


def _plot(payload: dict[str, Any], atomic_path: Any) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = {k: v for k, v in payload["suites"].items() if "error" not in v}
    fig, axes = plt.subplots(1, len(done), figsize=(4.2 * len(done), 3.6), squeeze=False)
    for ax, (name, res) in zip(axes[0], done.items()):
        rows = res["summary"]
        ax.bar(range(len(rows)), [r["average"] for r in rows], yerr=[r["std"] for r in rows], color="tab:blue", alpha=0.75)
        for i, r in enumerate(rows):
            ax.scatter([i] * len(res["finetuned"]), [r[t] for t in res["finetuned"]], s=8, color="black", zorder=3)
        base = sum(res["base"][t]["accuracy"] / res["finetuned"][t]["accuracy"] for t in res["finetuned"]) / len(res["finetuned"])
        ax.axhline(base, color="tab:red", lw=0.8, ls=":", label="base (λ=0)")
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set_xticks(range(len(rows)), [r["method"] for r in rows], rotation=40, ha="right", fontsize=7)
        ax.set_ylim(max(0.0, min(min(r[t] for r in rows for t in res["finetuned"]), base) - 0.05), 1.03)
        ax.set_title(name, fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
    axes[0][0].set_ylabel("merged / fine-tuned accuracy")
    fig.tight_layout()
    with atomic_path(RESULTS / "merging.png") as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--suites", default=",".join(SUITES))
    parser.add_argument("--render", action="store_true", help="only re-render merging.md/.png from merging.json")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--methods", default=None, help="comma-separated methods to (re)run; the others' rows are kept")
    args = parser.parse_args()
    if args.render:
        render(json.loads((RESULTS / "merging.json").read_text()))
        return
    env = setup(1)
    names = [s.strip() for s in args.suites.split(",") if s.strip()]
    tmp = RESULTS / ".merging-tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    order = sorted(names, key=lambda n: n.startswith("digits"))  # long text suites first
    methods = [m.strip() for m in args.methods.split(",")] if args.methods else METHODS + FUSION
    with ThreadPoolExecutor(args.jobs) as pool:
        results = dict(zip(order, pool.map(lambda n: run_suite(n, tmp / f"{n}.json", methods), order)))
    previous = json.loads((RESULTS / "merging.json").read_text()) if (RESULTS / "merging.json").exists() else {}
    suites = {**previous.get("suites", {}),
              **{n: merge_methods(previous.get("suites", {}).get(n, {}), r) for n, r in results.items()}}
    render({"env": env, "methods": METHODS + FUSION, "suites": {n: suites[n] for n in SUITES if n in suites}})


if __name__ == "__main__":
    main()
