"""Controllable multi-task SuperNet (Aich et al., ICCV 2023) on digits-multi: one trained model,
many (task importance, FLOPs budget) settings.

Trains one ``controllable`` model with the Trainer (full-width task losses + CI-KD and in-place
distillation of sampled SubNets), calibrates the width search on the validation split, then for
each importance setting (uniform, and each task in turn at 0.7 with the others at 0.1) and each
budget it configures the widths and records the test metrics, the analytic FLOPs and the measured
latency of one forward over a batch (median of repeats, one thread).

The digits-multi images are flattened to 64-dim vectors so the whole encoder is slimmable
(the fixed CNN backbone would not be).

    python benchmarks/controllable.py [--epochs 40] [--repeats 30]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from _common import markdown_table, setup, write_results
from polytask import ARCHITECTURES, SUITES, TrainConfig, Trainer
from polytask.models.arch.controllable import Controllable
from polytask.tasks import InputSpec, MultiTaskData, TaskSuite
from polytask.trainer import evaluate_model, seed_everything

BUDGETS = (0.25, 0.5, 1.0)
ARCH = {"encoder": [128, 128], "rep_dim": 64, "decoder": [32], "widths": [0.25, 0.5, 0.75, 1.0], "num_sampled": 2}


def flat_suite() -> TaskSuite:
    suite = SUITES.create("digits-multi")
    flat = lambda d: MultiTaskData(d.x.flatten(1), d.y, d.mask)  # noqa: E731
    return TaskSuite(suite.name + " (flattened)", suite.tasks, InputSpec("dense", dim=64),
                     flat(suite.train), flat(suite.val), flat(suite.test))


def latencies_ms(model: Controllable, x: torch.Tensor, configs: list[dict], repeats: int) -> list[tuple[float, float]]:
    """(median, min) ms of one forward per configuration, timed round-robin so load drift hits all alike."""
    times: list[list[float]] = [[] for _ in configs]
    with torch.no_grad():
        for r in range(repeats + 3):
            for i, cfg in enumerate(configs):
                model.set_config(cfg)
                start = time.perf_counter()
                model(x)
                if r >= 3:  # the first rounds warm up
                    times[i].append(time.perf_counter() - start)
    return [(1000 * statistics.median(t), 1000 * min(t)) for t in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--batch", type=int, default=2048, help="rows in the latency batch")
    args = parser.parse_args()
    env = setup(threads=1)
    start = time.perf_counter()
    suite = flat_suite()
    names = suite.task_names
    seed_everything(0)
    model = ARCHITECTURES.create("controllable", suite.tasks, suite.input_spec, **ARCH)
    trainer = Trainer(model, suite.tasks, "ew", TrainConfig(epochs=args.epochs, batch_size=64, lr=2e-3, seed=0,
                                                            progress=False, num_threads=1))
    trainer.fit(suite.train, suite.val)
    train_s = time.perf_counter() - start
    quality = model.calibrate(suite.val)
    model.eval()
    x = suite.test.x.repeat(args.batch // len(suite.test) + 1, 1)[:args.batch]
    main_metric = {t.name: t.main_metric for t in suite.tasks}
    settings = [("uniform", {t: 1.0 for t in names})] + [(t, {u: (0.7 if u == t else 0.1) for u in names}) for t in names]
    rows, configs = [], []
    for budget in BUDGETS:
        for label, imp in settings:
            choice = model.configure(imp, budget)
            res = evaluate_model(model, suite.tasks, suite.test)
            model.eval()
            configs.append({"encoder": choice["encoder"], "decoders": choice["decoders"]})
            row = {"focus": label, "budget": budget, "flops_frac": round(choice["fraction"], 3), "enc": choice["encoder"]}
            row.update({f"dec_{t}": choice["decoders"][t] for t in names})
            row.update({f"{t}/{main_metric[t]}": res[t][main_metric[t]] for t in names})
            rows.append(row)
    for row, (med, low) in zip(rows, latencies_ms(model, x, configs, args.repeats)):
        row["latency_ms"], row["latency_min_ms"] = med, low
        print(row, flush=True)
    verdict = _verdict(rows, names, main_metric)
    payload = {"env": env, "args": vars(args), "arch": ARCH, "train_seconds": round(train_s, 1),
               "full_flops": model.flops(model.full_config()), "calibrated_quality": quality.tolist(),
               "widths": list(model.widths), "rows": rows, "verdict": verdict,
               "seconds": round(time.perf_counter() - start, 1)}
    metric_txt = ", ".join(f"{t} {m}" for t, m in main_metric.items())
    md = ("# Controllable multi-task SuperNet on digits-multi (Aich et al. 2023)\n\n"
          f"threads={env['threads']}, torch {env['torch']}; one model ({ARCH}) trained {args.epochs} epochs "
          f"(Adam 2e-3, batch 64, EW, seed 0) on digits-multi flattened to 64-dim vectors; search calibrated on "
          f"the validation split; test metrics ({metric_txt}; mse lower is better). Importances: `uniform`, or "
          f"the named task at 0.7 and the others at 0.1. FLOPs: analytic multiply-adds per sample "
          f"(full = {payload['full_flops']}); latency: median (and min) of {args.repeats} forwards of a {args.batch}-row batch, all settings timed round-robin.\n\n"
          + markdown_table(rows) + "\n" + verdict + "\n")
    write_results("controllable", payload, md)
    print(md)


def _verdict(rows: list[dict], names: list[str], main_metric: dict[str, str]) -> str:
    lines = []
    by = {(r["focus"], r["budget"]): r for r in rows}
    for budget in BUDGETS:
        wins = []
        for t in names:
            key = f"{t}/{main_metric[t]}"
            sign = -1 if main_metric[t] in ("mse", "mae") else 1
            focused = sign * by[(t, budget)][key]
            others = [sign * by[(u, budget)][key] for u in names if u != t]
            wins.append(f"{t} {'best' if focused >= max(others) else 'not best'} "
                        f"(dec {by[(t, budget)][f'dec_{t}']} vs {min(by[(u, budget)][f'dec_{t}'] for u in names if u != t)})")
        lines.append(f"- budget {budget}: focused task's own metric across foci: " + "; ".join(wins))
    lat = {b: statistics.median(r["latency_ms"] for r in rows if r["budget"] == b) for b in BUDGETS}
    low = {b: statistics.median(r["latency_min_ms"] for r in rows if r["budget"] == b) for b in BUDGETS}
    flops = {b: statistics.median(r["flops_frac"] for r in rows if r["budget"] == b) for b in BUDGETS}
    lines.append("- median over settings per budget: " + ", ".join(
        f"{b}: FLOPs {flops[b]:.3f} of full, latency {lat[b]:.2f} ms (min {low[b]:.2f})" for b in BUDGETS))
    ok = all(r["flops_frac"] <= r["budget"] + 1e-9 for r in rows)
    mono = all(low[a] <= low[b] for a, b in zip(BUDGETS, BUDGETS[1:]))
    lines.append(f"- every choice within its budget: {'yes' if ok else 'no'}; min latency rises with budget: {'yes' if mono else 'no'}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
