"""Headline experiments of the seed methods' papers, at settings sized for one CPU thread.

1. EWC (Kirkpatrick et al., PNAS 2017) against plain fine-tuning on permuted MNIST: 10 fixed
   pixel permutations (domain-incremental, one 10-way head), a two-hidden-layer MLP with the
   scenario's default width (784-1000-1000-10, van de Ven & Tolias 2019's permuted-MNIST setting;
   the EWC paper's own width is not quoted here, its text being unavailable), Adam lr 1e-3, batch 128, 5 epochs over 5000 training
   images per permutation (200 optimiser steps per permutation; the continual benchmark gives 34),
   λ = 1000, Fisher from 500 samples. Average accuracy over all permutations after the last one.

    python benchmarks/reproductions.py            # ~2.5 min on one thread (2 shared cores: 136 s measured)
    python benchmarks/reproductions.py --quick    # 5 permutations, 2 epochs: ~50 s

Published figure: none quoted. The paper's text could not be found via search; the stored
descriptions of its Fig. 2 give curves, not numbers (``published`` is "unverified").
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Any

from _common import markdown_table, setup, write_results
from polytask.continual import run
from polytask.registry import SCENARIOS

PUBLISHED_NOTE = ("unverified: the paper's text could not be found via search from this machine; the only "
                  "stored descriptions of its permuted-MNIST result (third-party descriptions of the Fig. 2 image: "
                  "fraction correct per task over training, and vs the number of tasks for EWC and SGD+dropout) "
                  "give curves, not numbers, so no published figure is quoted.")


def ewc_permuted_mnist(quick: bool) -> dict[str, Any]:
    perms, epochs, subset, batch = (5, 2, 5000, 128) if quick else (10, 5, 5000, 128)
    settings = {"num_experiences": perms, "subset": subset, "test_subset": 1000, "epochs": epochs,
                "batch_size": batch, "lr": 1e-3, "arch": "shared-bottom", "hidden": [1000, 1000],
                "steps_per_permutation": math.ceil(subset / batch) * epochs, "seed": 0,
                "ewc": {"lam": 1000.0, "fisher_samples": 500}}
    scen = SCENARIOS.create("permuted-mnist", seed=0, num_experiences=perms, subset=subset, test_subset=1000)
    rows = []
    for strategy, opts in [("finetune", {}), ("ewc", settings["ewc"])]:
        start = time.perf_counter()
        r = run(scen, strategy, seed=0, epochs=epochs, batch_size=batch, lr=1e-3, strategy_options=opts,
                arch_options={"bottom": settings["hidden"], "tower": []})
        m = r.metrics
        final = m["accuracy_matrix"][-1]
        rows.append({"strategy": strategy, "average_accuracy": m["average_accuracy"],
                     "first_permutation": final[0], "last_permutation": final[-1],
                     "backward_transfer": m["backward_transfer"], "wall_seconds": time.perf_counter() - start,
                     "published": "unverified", "final_row": final})
        print(f"{strategy:9s} ACC {m['average_accuracy']:.3f} first {final[0]:.3f} last {final[-1]:.3f} "
              f"({rows[-1]['wall_seconds']:.0f} s)", flush=True)
    acc = {r["strategy"]: r["average_accuracy"] for r in rows}
    return {"experiment": "ewc-permuted-mnist", "settings": settings, "rows": rows,
            "ewc_minus_finetune": acc["ewc"] - acc["finetune"], "published_note": PUBLISHED_NOTE}


def render(payload: dict[str, Any]) -> str:
    e = payload["experiments"][0]
    s = e["settings"]
    keys = ["strategy", "average_accuracy", "first_permutation", "last_permutation", "backward_transfer",
            "wall_seconds", "published"]
    return (f"# Reproductions\n\nOne CPU thread (torch {payload['env']['torch']}). Regenerate with "
            f"`python benchmarks/reproductions.py{' --quick' if payload['quick'] else ''}`.\n\n"
            f"## EWC vs fine-tuning on permuted MNIST (Kirkpatrick et al. 2017)\n\n"
            f"{s['num_experiences']} permutations, MLP 784-{s['hidden'][0]}-{s['hidden'][1]}-10, Adam lr {s['lr']}, "
            f"batch {s['batch_size']}, {s['epochs']} epochs over {s['subset']} images per permutation "
            f"= {s['steps_per_permutation']} steps per permutation, EWC λ={s['ewc']['lam']:g} with "
            f"{s['ewc']['fisher_samples']} Fisher samples, seed {s['seed']}, {s['test_subset']} test images per "
            f"permutation. Accuracy after the last permutation.\n\n"
            + markdown_table([{k: r[k] for k in keys} for r in e["rows"]], keys)
            + f"\nEWC − fine-tuning: {e['ewc_minus_finetune']:+.3f}.\n\nPublished: {e['published_note']}\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    env = setup(1)
    payload = {"env": env, "quick": args.quick, "experiments": [ewc_permuted_mnist(args.quick)]}
    write_results("reproductions", payload, render(payload))


if __name__ == "__main__":
    main()
