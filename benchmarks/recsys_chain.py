"""Click -> conversion on synthetic-recsys: MMoE vs ESMM vs AITM, CVR AUC on all impressions.

synthetic-recsys draws a conversion label for every impression and then keeps it on clicks
only (the sample-selection bias of Ma et al. 2018). A CVR model is used on *all* impressions,
so the AUC that matters is pCVR against the conversion each impression would have had; this
script records the generator's conversion draws before masking (a spy on ``torch.bernoulli``
while the suite is built; checked against the suite's labels on clicks) and reports, on the
test split:

* ``cvr_auc_all``: pCVR over all impressions against those latent conversion labels;
* ``cvr_auc_clicked``: pCVR on clicked impressions against the observed labels;
* ``ctcvr_auc``: pCTCVR over all impressions against click & conversion;
* ``ctr_auc``.

pCVR is MMoE's conversion head (trained on clicks), ESMM's CVR tower, and AITM's ŷ_conv / ŷ_click
(clipped to [0, 1]); pCTCVR is pCTR · pCVR for MMoE and the conversion output for ESMM/AITM.
Every model trains on the two tasks click and conversion with the ordinary Trainer.

    python benchmarks/recsys_chain.py [--seeds 3] [--epochs 8] [--samples 20000]
"""

from __future__ import annotations

import argparse
import statistics
import time
from unittest import mock

import torch
from sklearn.metrics import roc_auc_score

from _common import markdown_table, setup, write_results
from polytask import ARCHITECTURES, SUITES, TrainConfig, Trainer
from polytask.data.synthetic_recsys import TASKS
from polytask.tasks import MultiTaskData, TaskSuite, split_data

MODELS = {"mmoe": {}, "esmm": {}, "aitm": {}}
METRICS = ("cvr_auc_all", "cvr_auc_clicked", "ctcvr_auc", "ctr_auc")


def suite_with_latent_conversion(seed: int, samples: int) -> tuple[TaskSuite, torch.Tensor]:
    """The click/conversion suite and the test split's conversion draws before the click mask."""
    draws: list[torch.Tensor] = []
    bernoulli = torch.bernoulli

    def spy(*args, **kwargs):
        out = bernoulli(*args, **kwargs)
        draws.append(out.clone())
        return out

    with mock.patch("torch.bernoulli", spy):
        suite = SUITES.create("synthetic-recsys", seed=seed, num_samples=samples)
    assert len(draws) == len(TASKS), "synthetic-recsys changed how it draws labels"
    index = MultiTaskData(torch.arange(samples), {"i": torch.zeros(samples)})
    test_rows = split_data(index, 0.15, 0.15, seed)[2].x  # the suite's own split
    latent = draws[TASKS.index("conversion")][test_rows]
    test = suite.test
    assert torch.equal(latent * test.y["click"], test.y["conversion"]), "latent draws do not match the labels"
    return suite.restrict(["click", "conversion"]), latent


@torch.no_grad()
def probabilities(model: torch.nn.Module, arch: str, x) -> dict[str, torch.Tensor]:
    model.eval()
    out = {k: v.sigmoid().flatten() for k, v in model(x).items()}
    if arch == "mmoe":
        return {"ctr": out["click"], "cvr": out["conversion"], "ctcvr": out["click"] * out["conversion"]}
    if arch == "esmm":
        return {"ctr": out["click"], "cvr": model.conditional_probabilities(x)["conversion"].flatten(),
                "ctcvr": out["conversion"]}
    return {"ctr": out["click"], "cvr": (out["conversion"] / out["click"].clamp(min=1e-8)).clamp(max=1.0),
            "ctcvr": out["conversion"]}


def evaluate(model: torch.nn.Module, arch: str, suite: TaskSuite, latent: torch.Tensor) -> dict[str, float]:
    p = probabilities(model, arch, suite.test.x)
    click, conv = suite.test.y["click"], suite.test.y["conversion"]
    clicked = click.bool()
    return {"cvr_auc_all": roc_auc_score(latent, p["cvr"]),
            "cvr_auc_clicked": roc_auc_score(conv[clicked], p["cvr"][clicked]),
            "ctcvr_auc": roc_auc_score(click * conv, p["ctcvr"]),
            "ctr_auc": roc_auc_score(click, p["ctr"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--samples", type=int, default=20000)
    args = parser.parse_args()
    env = setup(threads=1)
    runs, rows = [], []
    start = time.perf_counter()
    data = {seed: suite_with_latent_conversion(seed, args.samples) for seed in range(args.seeds)}
    for arch, options in MODELS.items():
        for seed, (suite, latent) in data.items():
            torch.manual_seed(seed)
            model = ARCHITECTURES.create(arch, suite.tasks, suite.input_spec, **options)
            cfg = TrainConfig(epochs=args.epochs, batch_size=256, lr=1e-3, seed=seed, progress=False)
            t0 = time.perf_counter()
            Trainer(model, suite.tasks, "ew", cfg).fit(suite.train, suite.val)
            runs.append({"arch": arch, "seed": seed, **evaluate(model, arch, suite, latent),
                         "params": sum(q.numel() for q in model.parameters()),
                         "train_seconds": round(time.perf_counter() - t0, 1)})
            print(runs[-1], flush=True)
        mine = [r for r in runs if r["arch"] == arch]
        row = {"arch": arch, "params": mine[0]["params"]}
        for m in METRICS:
            vals = [r[m] for r in mine]
            row[f"{m}_mean"] = statistics.mean(vals)
            row[f"{m}_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        rows.append(row)
    paired = []
    for arch in MODELS:
        if arch == "mmoe":
            continue
        for m in ("cvr_auc_all", "ctcvr_auc"):
            mine, base = ([r for r in runs if r["arch"] == a] for a in (arch, "mmoe"))
            diffs = [r[m] - b[m] for r, b in zip(mine, base)]
            paired.append({"arch": arch, "metric": m, "mean_minus_mmoe": statistics.mean(diffs),
                           "seeds_above_mmoe": f"{sum(d > 0 for d in diffs)}/{len(diffs)}"})
    elapsed = round(time.perf_counter() - start, 1)
    settings = {"seeds": args.seeds, "epochs": args.epochs, "samples": args.samples, "batch_size": 256, "lr": 1e-3,
                "weighting": "ew", "tasks": ["click", "conversion"], "restore_best": "val loss"}
    md = (f"# Click -> conversion on synthetic-recsys: MMoE vs ESMM vs AITM\n\n"
          f"`python benchmarks/recsys_chain.py --seeds {args.seeds} --epochs {args.epochs} --samples {args.samples}`"
          f" ({elapsed} s, {env['threads']} thread). Test split; mean and std over {args.seeds} seeds (each seed "
          "new data and new weights). Default architecture options; tasks click and conversion only.\n\n"
          "* `cvr_auc_all`: pCVR on every impression against the conversion label the generator drew before "
          "masking it to clicks (the quantity sample-selection bias hurts);\n"
          "* `cvr_auc_clicked`: pCVR on clicked impressions against the observed conversions;\n"
          "* `ctcvr_auc`: pCTCVR on every impression against click & conversion; `ctr_auc`.\n\n"
          "pCVR: MMoE's conversion head, ESMM's CVR tower, AITM's ŷ_conv/ŷ_click clipped to 1. "
          "pCTCVR: pCTR·pCVR for MMoE, the conversion output for ESMM and AITM.\n\n"
          + markdown_table(rows) + "\n## Paired by seed (same data, against MMoE)\n\n" + markdown_table(paired)
          + "\n## Runs\n\n" + markdown_table(runs))
    write_results("recsys_chain", {"env": env, "settings": settings, "rows": rows, "paired": paired, "runs": runs,
                                  "seconds": elapsed}, md)
    print(md)


if __name__ == "__main__":
    main()
