"""Expert health of MMoE, PLE and HoME on synthetic-recsys: the three anomalies HoME names
(Wang et al., KDD 2025, "HoME: Hierarchy of Multi-Gate Experts for Multi-Task Learning at
Kuaishou", Sec. 3):

- expert collapse: experts whose outputs are mostly zero (ReLU) — measured per expert as the
  share of exactly-zero activations on the test set (HoME's Swish experts are never exactly
  zero, so for them we count |a| < 1e-3 and say so), plus the share of dead units (zero on
  >= 99% of test samples) and the mean |activation| (the scale gap between experts);
- expert degradation: a shared expert taken over by one task — for each shared expert, the
  largest share one task holds of the gate mass all tasks put on it (1/T = evenly shared);
- expert underfitting: sparse tasks ignoring their own experts — per task, the softmax gate
  mass on its own experts vs on shared experts (MMoE has no task experts: own = 0 by design);

and per-task test AUC. The data is fixed (suite seed 0); each model is trained from
``--seeds`` initialisations (same data, different init and batch order), single thread.

    python benchmarks/expert_health.py [--epochs 6] [--seeds 3] [--samples 20000]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

from _common import RESULTS, markdown_table, setup, write_results
from polytask import ARCHITECTURES, SUITES, TrainConfig, Trainer
from polytask.trainer import seed_everything

MODELS: dict[str, dict[str, Any]] = {"mmoe": {}, "ple": {}, "home": {}}  # each architecture's defaults
SWISH_EPS = 1e-3
DENSE_TASKS = ("click", "long_view")


def zero_mask(model_name: str, act: torch.Tensor) -> torch.Tensor:
    """Exact zeros for ReLU experts; |a| < 1e-3 for HoME's Swish experts (never exactly zero)."""
    return act.abs() < SWISH_EPS if model_name == "home" else act == 0


def diagnose(name: str, model: torch.nn.Module, suite: Any) -> dict[str, Any]:
    """Forward the whole test set once (eval mode) and read the model's gate/expert diagnostics."""
    model.eval()
    with torch.no_grad():
        model(suite.test.x)
    experts = []
    for expert, act in model.last_expert_activations.items():
        zeros = zero_mask(name, act).float()
        experts.append({"model": name, "expert": expert, "zero_share": float(zeros.mean()),
                        "dead_units": float((zeros.mean(0) >= 0.99).float().mean()),
                        "mean_abs": float(act.abs().mean())})
    groups = model.expert_groups()
    shared = groups["shared"]
    gates = {t: g.mean(0) for t, g in model.last_gates.items()}  # mean gate vector per task
    tasks = []
    for t in suite.task_names:
        tasks.append({"model": name, "task": t, "gate_shared": float(gates[t][shared].sum()),
                      "gate_own": float(gates[t][groups[t]].sum()) if groups[t] else 0.0})
    mass = torch.stack([gates[t][shared] for t in suite.task_names])  # [T, shared experts]
    degradation = []
    for j, k in enumerate(shared):
        share = mass[:, j] / mass[:, j].sum().clamp(min=1e-12)
        top = int(share.argmax())
        degradation.append({"model": name, "shared_expert": k, "dominant_task": suite.task_names[top],
                            "dominant_share": float(share[top]), "total_gate_mass": float(mass[:, j].sum()),
                            "by_task": {t: float(share[i]) for i, t in enumerate(suite.task_names)}})
    return {"experts": experts, "tasks": tasks, "degradation": degradation}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    env = setup(threads=1)
    start = time.perf_counter()
    suite = SUITES.create("synthetic-recsys", seed=0, num_samples=args.samples)
    rates = {t: float(suite.train.y[t][suite.train.mask[t]].mean()) for t in suite.task_names}
    runs: dict[str, list[dict[str, Any]]] = {}
    for name, options in MODELS.items():
        runs[name] = []
        for seed in range(args.seeds):
            seed_everything(seed)
            model = ARCHITECTURES.create(name, suite.tasks, suite.input_spec, **options)
            cfg = TrainConfig(epochs=args.epochs, batch_size=128, lr=1e-3, seed=seed, progress=False, num_threads=1)
            trainer = Trainer(model, suite.tasks, "ew", cfg)
            t0 = time.perf_counter()
            trainer.fit(suite.train, suite.val)
            seconds = time.perf_counter() - t0
            results = trainer.evaluate(suite.test)
            runs[name].append({"seed": seed, "auc": {t: results[t]["auroc"] for t in suite.task_names},
                               "params": sum(p.numel() for p in model.parameters()),
                               "train_seconds": round(seconds, 1), **diagnose(name, model, suite)})
            print(name, seed, runs[name][-1]["auc"], f"{seconds:.0f}s", flush=True)
    payload = {"env": env, "args": vars(args), "suite": suite.description, "train_positive_rates": rates,
               "zero_rule": {"mmoe": "a == 0", "ple": "a == 0", "home": f"abs(a) < {SWISH_EPS} (Swish)"},
               "runs": runs, "reading": reading(runs, suite.task_names),
               "seconds": round(time.perf_counter() - start, 1)}
    plot(runs, suite.task_names)
    write_results("expert_health", payload, markdown(payload, suite.task_names))
    print(markdown(payload, suite.task_names))


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _fmt(values: list[float]) -> str:
    m, sd = _mean_sd(values)
    return f"{m:.3f} ± {sd:.3f}"


def _collapse(run: dict[str, Any]) -> dict[str, float]:
    z = [e["zero_share"] for e in run["experts"]]
    scale = [e["mean_abs"] for e in run["experts"]]
    return {"mean_zero": sum(z) / len(z), "max_zero": max(z), "over90": sum(v > 0.9 for v in z),
            "dead": sum(e["dead_units"] for e in run["experts"]) / len(z), "scale_ratio": max(scale) / max(min(scale), 1e-12),
            "max_dominance": max(d["dominant_share"] for d in run["degradation"])}


def _gate(run: dict[str, Any], task: str, key: str) -> float:
    return next(x[key] for x in run["tasks"] if x["task"] == task)


def reading(runs: dict[str, list[dict[str, Any]]], tasks: list[str]) -> list[str]:
    """Plain statements computed from the numbers (means over seeds)."""
    lines = []
    sparse = [t for t in tasks if t not in DENSE_TASKS]
    for name, seeds in runs.items():
        c = [_collapse(r) for r in seeds]
        lines.append(f"{name}: zero share {_fmt([x['mean_zero'] for x in c])} on average, worst expert "
                     f"{_fmt([x['max_zero'] for x in c])}; experts with >90% zeros per run: "
                     f"{[int(x['over90']) for x in c]}; largest/smallest expert scale {_fmt([x['scale_ratio'] for x in c])}")
        lines.append(f"{name}: most monopolised shared expert holds {_fmt([x['max_dominance'] for x in c])} of its "
                     f"gate mass from one task (even sharing = {1 / len(tasks):.2f})")
        if any(_gate(r, t, "gate_own") > 0 for r in seeds for t in tasks):
            dense = [sum(_gate(r, t, "gate_own") for t in DENSE_TASKS) / len(DENSE_TASKS) for r in seeds]
            rare = [sum(_gate(r, t, "gate_own") for t in sparse) / len(sparse) for r in seeds]
            lines.append(f"{name}: gate mass on own experts — dense tasks {_fmt(dense)}, sparse tasks {_fmt(rare)}")
            own = [_gate(r, t, "gate_own") for r in seeds for t in tasks]
            polar = sum(v < 0.1 or v > 0.9 for v in own)
            lines.append(f"{name}: {polar}/{len(own)} (task, seed) gates put < 0.1 or > 0.9 of their mass on own experts")
    return lines


def markdown(payload: dict[str, Any], tasks: list[str]) -> str:
    runs = payload["runs"]
    env, args = payload["env"], payload["args"]
    auc_rows = [{"task": t, "train positive rate": payload["train_positive_rates"][t],
                 **{m: _fmt([r["auc"][t] for r in runs[m]]) for m in runs}} for t in tasks]
    summary = []
    for m, seeds in runs.items():
        c = [_collapse(r) for r in seeds]
        summary.append({"model": m, "params": seeds[0]["params"],
                        "train s/run": statistics.mean(r["train_seconds"] for r in seeds),
                        "experts": len(seeds[0]["experts"]), "zero rule": payload["zero_rule"][m],
                        "mean zero share": _fmt([x["mean_zero"] for x in c]),
                        "worst expert zero share": _fmt([x["max_zero"] for x in c]),
                        "experts >90% zero": "/".join(str(int(x["over90"])) for x in c),
                        "dead units": _fmt([x["dead"] for x in c]),
                        "expert scale max/min": _fmt([x["scale_ratio"] for x in c])})
    gate_rows = [{"task": t, **{f"{m} own": _fmt([_gate(r, t, "gate_own") for r in runs[m]]) for m in runs if m != "mmoe"},
                  **{f"{m} shared": _fmt([_gate(r, t, "gate_shared") for r in runs[m]]) for m in runs if m != "mmoe"}}
                 for t in tasks]
    degr_summary = [{"model": m, "shared experts": len(seeds[0]["degradation"]),
                     "max single-task share": _fmt([_collapse(r)["max_dominance"] for r in seeds]),
                     "mean single-task share": _fmt([statistics.mean(d["dominant_share"] for d in r["degradation"])
                                                     for r in seeds])} for m, seeds in runs.items()]
    degr_rows = [{"model": m, "gate index": d["shared_expert"],
                  **{k: d[k] for k in ("dominant_task", "dominant_share", "total_gate_mass")}}
                 for m in runs for d in runs[m][0]["degradation"]]
    expert_rows = [{k: e[k] for k in ("model", "expert", "zero_share", "dead_units", "mean_abs")}
                   for m in runs for e in runs[m][0]["experts"]]
    n = args["seeds"]
    return ("# Expert health: MMoE vs PLE vs HoME on synthetic-recsys\n\n"
            f"threads={env['threads']}, torch {env['torch']}; synthetic-recsys (seed 0) with {args['samples']} "
            f"impressions (70/15/15); {args['epochs']} epochs, Adam 1e-3, batch 128, equal weighting, best epoch by "
            f"validation loss; {n} training seeds per model (mean ± sd over seeds); {payload['seconds']} s in all. "
            "Each architecture uses its default sizes. Diagnostics are read on the whole test split in eval mode.\n\n"
            "## Per-task test AUC\n\n" + markdown_table(auc_rows) +
            "\n## Expert collapse\n\n"
            "Zero share: share of expert output entries that are exactly 0 (ReLU experts of MMoE/PLE) or, for "
            f"HoME's BatchNorm+Swish experts, below {SWISH_EPS} in absolute value (Swish is never exactly 0). "
            "Dead units: units that are zero on >= 99% of test samples. Expert scale max/min: ratio between the "
            "largest and the smallest expert's mean absolute activation. All experts of every level are counted.\n\n"
            + markdown_table(summary) +
            "\n## Underfitting: softmax gate mass on a task's own vs shared experts (last level)\n\n"
            "MMoE has only shared experts (own = 0, shared = 1 by design) and is left out. HoME's own experts also "
            "enter through its sigmoid self-gate, which this softmax mass does not count.\n\n"
            + markdown_table(gate_rows) +
            "\n## Degradation: how much of a shared expert one task holds\n\n"
            "For each shared expert of the last level: the largest share one task holds of the gate mass all tasks put "
            f"on it (1/{len(tasks)} = {1 / len(tasks):.2f} is even sharing, 1 is one task owning it).\n\n"
            + markdown_table(degr_summary) + "\nSeed 0, per shared expert (total_gate_mass = summed mean gate "
            "weight over tasks; gate index = the expert's position in the task gates):\n\n" + markdown_table(degr_rows) +
            "\n## Reading (computed)\n\n" + "\n".join(f"- {line}" for line in payload["reading"]) +
            "\n\n![expert health](expert_health.png)\n\n<details><summary>Per-expert numbers, seed 0</summary>\n\n"
            + markdown_table(expert_rows) + "\n</details>\n")


def plot(runs: dict[str, list[dict[str, Any]]], tasks: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    width = 0.25
    ax = axes[0, 0]
    offset = 0
    for m, seeds in runs.items():
        z = [e["zero_share"] for e in seeds[0]["experts"]]
        ax.bar(range(offset, offset + len(z)), z, label=m)
        if max(z) < 0.02:
            ax.text(offset, 0.02, f"{m}: all < {max(z):.3f}", fontsize=8)
        offset += len(z) + 2
    ax.set_ylabel("share of zero activations")
    ax.set_title("collapse: zeros per expert, seed 0 (HoME: |a| < 1e-3)")
    ax.set_xticks([])
    ax.legend()
    ax = axes[0, 1]
    for i, (m, seeds) in enumerate(runs.items()):
        stats = [_mean_sd([_gate(r, t, "gate_own") for r in seeds]) for t in tasks]
        ax.bar([j + i * width for j in range(len(tasks))], [s[0] for s in stats], width,
               yerr=[s[1] for s in stats], capsize=2, label=m)
    ax.set_xticks([j + width for j in range(len(tasks))], tasks, rotation=30)
    ax.set_ylabel("softmax gate mass on own experts")
    ax.set_title("underfitting: own-expert gate mass per task (mean ± sd)")
    ax.legend()
    ax = axes[1, 0]
    offset = 0
    for m, seeds in runs.items():
        d = [x["dominant_share"] for x in seeds[0]["degradation"]]
        ax.bar(range(offset, offset + len(d)), d, label=m)
        offset += len(d) + 2
    ax.axhline(1 / len(tasks), color="k", ls="--", lw=1, label="even sharing")
    ax.set_ylabel("largest single-task share of gate mass")
    ax.set_title("degradation: per shared expert, seed 0")
    ax.set_xticks([])
    ax.legend()
    ax = axes[1, 1]
    for i, (m, seeds) in enumerate(runs.items()):
        stats = [_mean_sd([r["auc"][t] for r in seeds]) for t in tasks]
        ax.bar([j + i * width for j in range(len(tasks))], [s[0] for s in stats], width,
               yerr=[s[1] for s in stats], capsize=2, label=m)
    ax.set_xticks([j + width for j in range(len(tasks))], tasks, rotation=30)
    ax.set_ylim(0.5, 0.8)
    ax.set_ylabel("test AUC")
    ax.set_title("per-task test AUC (mean ± sd)")
    ax.legend()
    fig.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    fig.savefig(RESULTS / "expert_health.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
