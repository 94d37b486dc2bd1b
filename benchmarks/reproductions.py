"""Headline experiments of the seed methods' papers, at settings sized for one CPU thread.

1. EWC (Kirkpatrick et al., PNAS 2017) against plain fine-tuning on permuted MNIST: 10 fixed
   pixel permutations (domain-incremental, one 10-way head), a two-hidden-layer MLP with the
   scenario's default width (784-1000-1000-10, van de Ven & Tolias' permuted-MNIST network; the
   EWC paper's Fig. 3A uses 2 x 400, its Table S1), Adam lr 1e-3, batch 128, 5 epochs over 5000 training
   images per permutation (200 optimiser steps per permutation; the continual benchmark gives 34),
   λ = 1000, Fisher from 500 samples; SI (Zenke, Poole & Ganguli, ICML 2017) at the same settings with
   c = 1, ξ = 0.1. Average accuracy over all permutations after the last one.
2. MultiMNIST (Sener & Koltun, NeurIPS 2018): single-task, equal weights and MGDA-UB on the full
   suite (50k/10k/10k) with the authors' LeNet (official ``MultiLeNetR`` body, ``MultiLeNetO``
   heads; isl-org/MultiObjectiveOptimization multi_task/models/multi_lenet.py), Adam lr 5e-4,
   batch 256 (the repository's sample.json), 15 epochs instead of the script's 100 (CPU budget),
   model selection on validation loss. Deviation: the heads' dropout (mask shared across tasks in
   the official code) is left out, as polytask's task heads have none; the body's channel dropout is kept.
3. L2P (Wang et al., CVPR 2022) on a frozen pretrained encoder (ImageNet EfficientNet-Lite0, 64 px,
   features cached) against fine-tuning and replay (memory 500) on the same frozen features, split
   MNIST class-incremental (5 x 2 digits, 10,000 training / 2,000 test images), 5 epochs per experience.
4. L2P proper on text: frozen all-MiniLM-L6-v2 with the selected prompts prepended to its token
   embeddings (the encoder runs, and back-propagates to the prompts, on every step), class-incremental
   wordnet-topics (10 noun topics in 5 experiences, subset 1000: 1,215 training / 215 test definitions),
   5 epochs per experience, Adam lr 0.03 (the paper's) for every row; fine-tuning, replay (10 and 50
   per class) and joint train a linear head on the cached frozen MiniLM sentence vectors.

    python benchmarks/reproductions.py                  # all four: ~20 min on one thread (2 shared cores)
    python benchmarks/reproductions.py --only l2p-text  # one experiment; the others' stored results are kept
    python benchmarks/reproductions.py --quick          # small settings, a smoke run (reproductions_quick.*)

Published figures (``PUBLISHED``) are quoted from the papers' texts with table and column, read in
the stored full texts through the search tool; each experiment's section names its source.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from typing import Any

from torch import Tensor, nn

from _common import RESULTS, markdown_table, setup, write_results
from polytask.continual import run
from polytask.continual._prompting import Reshaped
from polytask.continual.runner import ContinualConfig, run_continual
from polytask.models.backbones import build_backbone
from polytask.tasks import InputSpec
from polytask.registry import ARCHITECTURES, SCENARIOS, SUITES
from polytask.trainer import Trainer, TrainConfig, seed_everything

VDV = ("van de Ven & Tolias, \"Generative replay with feedback connections as a general strategy for continual "
       "learning\" (arXiv 1809.10635, the ICLR 2019 submission text)")
# Published figures, quoted from the papers' texts (read in the stored full texts via the search tool's
# read_file, paging with offset): {experiment: {"source", "setting", "rows": {our row: (paper row, value(s))}, "note"}}.
PUBLISHED: dict[str, dict[str, Any]] = {
    "ewc-permuted-mnist": {
        "source": VDV + ", Table 4 (permuted MNIST), column \"Incremental domain learning\": average test accuracy "
                  "(%) over the 10 tasks after the last, mean (± SEM) of 20 seeds",
        "setting": "MLP 2 x 1000 ReLU on 32 x 32 zero-padded inputs (1024 permuted pixels), all 60k training "
                   "images, 5000 Adam iterations per task at lr 1e-4, batch 128, EWC λ / SI c by grid search",
        "rows": {"finetune": ("None - lower bound", [78.51, 0.24]), "ewc": ("EWC", [94.31, 0.11]),
                 "si": ("SI", [95.33, 0.11])},
        "extra": "same table: Online EWC 94.42 (± 0.13), Offline - upper bound 97.59 (± 0.01)",
        "note": ("Kirkpatrick et al. (PNAS 2017) give their permuted-MNIST result only as curves (Fig. 3A/B; "
                 "read in the stored PNAS text): \"EWC allows a large number of tasks to be learned in sequence, "
                 "with only modest growth in the error rates\"; their Table S1 lists Fig. 3A's setting as 2 hidden "
                 "layers of 400, lr 1e-3, 20 epochs per dataset, no dropout. No number to quote. The SI paper "
                 "(arXiv 1703.04200) was not found in the stored texts."),
    },
    "multi-mnist": {
        "source": ("Sener & Koltun, \"Multi-Task Learning as Multi-Objective Optimization\" (NeurIPS 2018, "
                   "arXiv 1810.04650), Table 3: left / right digit accuracy [%]"),
        "setting": "their MultiMNIST (60K examples), LeNet body, two fully connected layers per task",
        "rows": {"single-task": ("Single task", [97.23, 95.90]), "equal weights (ew)": ("Uniform scaling", [96.46, 94.99]),
                 "MGDA-UB (mgda, mode=rep)": ("Ours", [97.26, 95.90])},
        "extra": "same table: Kendall et al. 2018 96.47 / 95.29, GradNorm 96.27 / 94.84",
        "note": "",
    },
    "l2p-split-mnist": {
        "source": ("Wang et al., \"Learning to Prompt for Continual Learning\" (CVPR 2022, arXiv 2112.08654), "
                   "Table 1 (class-incremental), Split CIFAR-100, column Average Acc (%), mean ± std of 3 runs"),
        "setting": "pretrained ViT-B/16, 10 tasks of 10 classes, Adam lr 0.03, batch 128, 5 epochs per task, "
                   "M = 10, N = 5, L_p = 5, λ = 0.5",
        "rows": {"finetune": ("FT-seq-frozen (buffer 0)", [17.72, 0.34]), "replay": ("ER (buffer 50/class)", [82.53, 0.17]),
                 "l2p": ("L2P (buffer 0)", [83.83, 0.04]), "joint": ("Upper-bound", [90.85, 0.12])},
        "extra": ("same table: ER 10/class 67.87 ± 0.57; 5-datasets: FT-seq-frozen 39.49 ± 0.12, L2P 81.14 ± 0.93, "
                  "ER 10/class 84.26 ± 0.84, Upper-bound 93.93 ± 0.18. For split MNIST itself (an MLP trained from "
                  "scratch, not a frozen encoder) " + VDV + ", Table 3, column \"Incremental class learning\": "
                  "None - lower bound 19.90 (± 0.02), Offline - upper bound 97.93 (± 0.04)"),
        "note": "a different benchmark and backbone: the paper's figures give the expected ordering, not a target value.",
    },
}
PUBLISHED["l2p-wordnet-topics"] = {**PUBLISHED["l2p-split-mnist"], "extra": (
    "same table, 5-datasets: FT-seq-frozen 39.49 ± 0.12, L2P 81.14 ± 0.93, ER 5/class 80.32 ± 0.55, ER 10/class "
    "84.26 ± 0.84, Upper-bound 93.93 ± 0.18"), "rows": {
    "finetune": ("FT-seq-frozen (buffer 0)", [17.72, 0.34]), "replay (10/class)": ("ER (buffer 10/class)", [67.87, 0.57]),
    "replay (50/class)": ("ER (buffer 50/class)", [82.53, 0.17]), "l2p": ("L2P (buffer 0)", [83.83, 0.04]),
    "joint": ("Upper-bound", [90.85, 0.12])}}


MULTI_MNIST_EPOCHS = 15


def ewc_permuted_mnist(quick: bool) -> dict[str, Any]:
    perms, epochs, subset, batch = (5, 2, 5000, 128) if quick else (10, 5, 5000, 128)
    settings = {"num_experiences": perms, "subset": subset, "test_subset": 1000, "epochs": epochs,
                "batch_size": batch, "lr": 1e-3, "arch": "shared-bottom", "hidden": [1000, 1000],
                "steps_per_permutation": math.ceil(subset / batch) * epochs, "seed": 0,
                "ewc": {"lam": 1000.0, "fisher_samples": 500}, "si": {"c": 1.0, "xi": 0.1}}
    scen = SCENARIOS.create("permuted-mnist", seed=0, num_experiences=perms, subset=subset, test_subset=1000)
    rows = []
    for strategy, opts in [("finetune", {}), ("ewc", settings["ewc"]), ("si", settings["si"])]:
        start = time.perf_counter()
        r = run(scen, strategy, seed=0, epochs=epochs, batch_size=batch, lr=1e-3, strategy_options=opts,
                arch_options={"bottom": settings["hidden"], "tower": []})
        m = r.metrics
        final = m["accuracy_matrix"][-1]
        rows.append({"strategy": strategy, "average_accuracy": m["average_accuracy"],
                     "first_permutation": final[0], "last_permutation": final[-1],
                     "backward_transfer": m["backward_transfer"], "wall_seconds": time.perf_counter() - start,
                     "final_row": final})
        print(f"{strategy:9s} ACC {m['average_accuracy']:.3f} first {final[0]:.3f} last {final[-1]:.3f} "
              f"({rows[-1]['wall_seconds']:.0f} s)", flush=True)
    acc = {r["strategy"]: r["average_accuracy"] for r in rows}
    return {"experiment": "ewc-permuted-mnist", "settings": settings, "rows": rows,
            "ewc_minus_finetune": acc["ewc"] - acc["finetune"], "si_minus_finetune": acc["si"] - acc["finetune"]}


class MultiLeNetR(nn.Module):
    """Sener & Koltun's shared MultiMNIST body (official ``MultiLeNetR``): conv5(10)-pool-relu,
    conv5(20)-channel dropout-pool-relu, fc 320->50-relu."""

    out_dim = 50

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 10, 5), nn.MaxPool2d(2), nn.ReLU(), nn.Conv2d(10, 20, 5),
                                 nn.Dropout2d(0.5), nn.MaxPool2d(2), nn.ReLU(), nn.Flatten(),
                                 nn.Linear(320, 50), nn.ReLU())

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def _lenet_run(suite: Any, weighting: str, options: dict[str, Any], train: TrainConfig) -> dict[str, Any]:
    seed_everything(train.seed)
    model = ARCHITECTURES.create("shared-bottom", suite.tasks, suite.input_spec, backbone=MultiLeNetR(),
                                 bottom=[], tower=[50])  # heads: fc 50->50-relu, fc 50->10 (MultiLeNetO)
    trainer = Trainer(model, suite.tasks, weighting, train, weighting_options=options)
    start = time.perf_counter()
    history = trainer.fit(suite.train, suite.val)
    test = trainer.evaluate(suite.test)
    return {"test": {t.name: test[t.name]["accuracy"] for t in suite.tasks}, "epochs": len(history),
            "seconds": time.perf_counter() - start}


def multi_mnist(quick: bool) -> dict[str, Any]:
    epochs = 1 if quick else MULTI_MNIST_EPOCHS
    subset = 5000 if quick else None
    train = TrainConfig(epochs=epochs, batch_size=256, lr=5e-4, optimizer="adam", seed=0, progress=False)
    suite = SUITES.create("multi-mnist", seed=0, subset=subset)
    settings = {"subset": subset or "full (50k/10k/10k)", "epochs": epochs, "batch_size": 256, "lr": 5e-4,
                "optimizer": "adam", "seed": 0, "model_selection": "lowest validation loss (restore_best)",
                "network": "MultiLeNetR + MultiLeNetO heads, head dropout omitted"}
    rows = []
    for label, weighting, options in [("single-task", "ew", {}), ("equal weights (ew)", "ew", {}),
                                      ("MGDA-UB (mgda, mode=rep)", "mgda", {"mode": "rep"})]:
        if label == "single-task":
            runs = [_lenet_run(suite.restrict([t.name]), weighting, options, train) for t in suite.tasks]
            r = {"test": {k: v for x in runs for k, v in x["test"].items()}, "epochs": [x["epochs"] for x in runs],
                 "seconds": sum(x["seconds"] for x in runs)}
        else:
            r = _lenet_run(suite, weighting, options, train)
        rows.append({"method": label, "left": r["test"]["left"], "right": r["test"]["right"],
                     "epochs": r["epochs"], "wall_seconds": r["seconds"]})
        print(f"{label:26s} left {r['test']['left']:.4f} right {r['test']['right']:.4f} ({r['seconds']:.0f} s)", flush=True)
    return {"experiment": "multi-mnist", "settings": settings, "rows": rows}


def l2p_split_mnist(quick: bool) -> dict[str, Any]:
    """L2P on frozen EfficientNet-Lite0 features against fine-tuning and replay on the same frozen features."""
    subset, test_subset, epochs = (1000, 500, 1) if quick else (10000, 2000, 5)
    scen = SCENARIOS.create("split-mnist", seed=0, setting="class", subset=subset, test_subset=test_subset)
    shape = [1, 28, 28]

    def frozen_linear() -> nn.Module:  # the same frozen encoder, one trainable linear head
        encoder = Reshaped(build_backbone(InputSpec("image", shape=tuple(shape)), "efficientnet-lite0"), shape)
        return ARCHITECTURES.create("shared-bottom", scen.tasks, scen.input_spec, backbone=encoder, bottom=[], tower=[])

    train = {"epochs": epochs, "batch_size": 64, "lr": 1e-3, "progress": False, "seed": 0}
    settings = {"scenario": "split-mnist (class-incremental, 5 experiences of 2 digits)", "subset": subset,
                "test_subset": test_subset, "encoder": "efficientnet-lite0 (ImageNet, frozen, 64 px, cached features)",
                **{k: v for k, v in train.items() if k != "progress"},
                "l2p": {"pool_size": 10, "top_n": 5, "prompt_length": 5, "pull": 0.1}, "replay": {"memory": 500}}
    rows = []
    for strategy, opts, build in [("finetune", {}, frozen_linear), ("replay", {"memory": 500}, frozen_linear),
                                  ("l2p", {"encoder": "efficientnet-lite0", "image_shape": shape}, None),
                                  ("joint", {}, frozen_linear)]:  # upper bound: all experiences at once
        start = time.perf_counter()
        cfg = ContinualConfig(scenario="split-mnist", strategy=strategy, train=dict(train), strategy_options=opts)
        r = run_continual(cfg, scenario=scen, model=build)
        m = r.metrics
        rows.append({"strategy": strategy, "average_accuracy": m["average_accuracy"],
                     "backward_transfer": m["backward_transfer"], "forgetting": m["forgetting"],
                     "wall_seconds": time.perf_counter() - start, "final_row": m["accuracy_matrix"][-1]})
        print(f"{strategy:9s} ACC {m['average_accuracy']:.3f} ({rows[-1]['wall_seconds']:.0f} s)", flush=True)
    return {"experiment": "l2p-split-mnist", "settings": settings, "rows": rows}


def l2p_wordnet_topics(quick: bool) -> dict[str, Any]:
    """L2P proper on frozen MiniLM (prompts prepended to its token embeddings) against fine-tuning, replay and joint."""
    subset, epochs = (300, 1) if quick else (1000, 5)
    feats = SCENARIOS.create("wordnet-topics", seed=0, subset=subset)  # cached frozen MiniLM sentence features
    tokens = SCENARIOS.create("wordnet-topics", seed=0, subset=subset, features=None)  # the same texts, as tokens
    train = {"epochs": epochs, "batch_size": 32, "lr": 0.03, "progress": False, "seed": 0}  # the paper's constant Adam lr
    linear = {"bottom": [], "tower": []}  # one linear head on the frozen feature (the paper's FT-seq-frozen)
    settings = {"scenario": f"wordnet-topics (class-incremental, {len(feats)} experiences of 2 WordNet noun topics)",
                "subset": subset, "train_texts": sum(len(x.train) for x in feats.experiences),
                "test_texts": sum(len(x.test) for x in feats.experiences),
                "encoder": "all-MiniLM-L6-v2 (frozen)", **{k: v for k, v in train.items() if k != "progress"},
                "l2p": {"pool_size": 10, "top_n": 5, "prompt_length": 5, "pull": 0.1},
                "replay": {"memory": [100, 500]}}
    runs = [("finetune", "finetune", {}, feats), ("replay (10/class)", "replay", {"memory": 100}, feats),
            ("replay (50/class)", "replay", {"memory": 500}, feats),
            ("l2p", "l2p", {"encoder": "minilm"}, tokens), ("joint", "joint", {}, feats)]
    rows = []
    for label, strategy, opts, scen in runs:
        start = time.perf_counter()
        cfg = ContinualConfig(scenario="wordnet-topics", strategy=strategy, train=dict(train), strategy_options=opts,
                              arch_options=linear)
        m = run_continual(cfg, scenario=scen).metrics
        rows.append({"strategy": label, "average_accuracy": m["average_accuracy"],
                     "backward_transfer": m["backward_transfer"], "forgetting": m["forgetting"],
                     "wall_seconds": time.perf_counter() - start, "final_row": m["accuracy_matrix"][-1]})
        print(f"{label:18s} ACC {m['average_accuracy']:.3f} ({rows[-1]['wall_seconds']:.0f} s)", flush=True)
    return {"experiment": "l2p-wordnet-topics", "settings": settings, "rows": rows}


def _published(name: str, ours: dict[str, list[float]]) -> str:
    """Ours beside the paper's figures (in %), row by row, and the source they were read in."""
    p = PUBLISHED[name]
    rows = []
    for mine, (theirs, values) in p["rows"].items():
        if mine not in ours:
            continue
        mean = values if len(ours[mine]) > 1 else values[:1]
        err = f" ± {values[1]:g}" if len(ours[mine]) == 1 else ""
        rows.append({"ours": mine, "ours (%)": " / ".join(f"{v:.2f}" for v in ours[mine]), "paper row": theirs,
                     "published (%)": " / ".join(f"{v:.2f}" for v in mean) + err,
                     "ours − published (points)": " / ".join(f"{o - v:+.2f}" for o, v in zip(ours[mine], mean))})
    return (f"\nPublished: {p['source']}; their setting: {p['setting']}. Also in the {p['extra']}.\n\n"
            + markdown_table(rows) + (f"\n{p['note']}\n" if p["note"] else ""))


def _render_ewc(e: dict[str, Any]) -> str:
    s = e["settings"]
    keys = ["strategy", "average_accuracy", "first_permutation", "last_permutation", "backward_transfer",
            "wall_seconds"]
    si = e["settings"].get("si")
    return (f"## EWC{' and SI' if si else ''} vs fine-tuning on permuted MNIST (Kirkpatrick et al. 2017"
            f"{'; Zenke et al. 2017' if si else ''})\n\n"
            f"{s['num_experiences']} permutations, MLP 784-{s['hidden'][0]}-{s['hidden'][1]}-10, Adam lr {s['lr']}, "
            f"batch {s['batch_size']}, {s['epochs']} epochs over {s['subset']} images per permutation "
            f"= {s['steps_per_permutation']} steps per permutation, EWC λ={s['ewc']['lam']:g} with "
            f"{s['ewc']['fisher_samples']} Fisher samples, "
            f"{'SI c={:g}, ξ={:g}, '.format(si['c'], si['xi']) if si else ''}seed {s['seed']}, {s['test_subset']} test images per "
            f"permutation. Accuracy after the last permutation.\n\n"
            + markdown_table([{k: r[k] for k in keys} for r in e["rows"]], keys)
            + f"\nEWC − fine-tuning: {e['ewc_minus_finetune']:+.3f}"
            + (f"; SI − fine-tuning: {e['si_minus_finetune']:+.3f}" if si else "") + ".\n"
            + _published(e["experiment"], {r["strategy"]: [100 * r["average_accuracy"]] for r in e["rows"]}))


def _render_multi_mnist(e: dict[str, Any]) -> str:
    s = e["settings"]
    return (f"## MultiMNIST: single-task, equal weights, MGDA-UB (Sener & Koltun 2018)\n\n"
            f"Data: {s['subset']}. Network: {s['network']}. {s['optimizer'].capitalize()} lr {s['lr']}, batch "
            f"{s['batch_size']}, {s['epochs']} epochs (the official script: 100), {s['model_selection']}, seed "
            f"{s['seed']}. Test accuracy per digit. Single-task: one network per digit, same settings.\n\n"
            + markdown_table(e["rows"])
            + _published(e["experiment"], {r["method"]: [100 * r["left"], 100 * r["right"]] for r in e["rows"]}))


def _render_l2p(e: dict[str, Any]) -> str:
    s = e["settings"]
    keys = ["strategy", "average_accuracy", "backward_transfer", "forgetting", "wall_seconds"]
    return (f"## L2P on a frozen pretrained encoder vs fine-tuning and replay (Wang et al. 2022)\n\n"
            f"{s['scenario']}, {s['subset']} training and {s['test_subset']} test images; encoder {s['encoder']}. "
            f"All rows read the same frozen features; fine-tuning, replay and joint train one linear head on them, "
            f"L2P trains its prompt pool (M={s['l2p']['pool_size']}, N={s['l2p']['top_n']}, "
            f"L_p={s['l2p']['prompt_length']}, λ={s['l2p']['pull']}) and head. Replay: reservoir memory of "
            f"{s['replay']['memory']}. Adam lr {s['lr']}, batch {s['batch_size']}, {s['epochs']} epochs per "
            f"experience, seed {s['seed']}. ACC = mean accuracy over the 5 experiences after the last; joint (all "
            f"experiences at once, same head) is the upper bound. The first row's wall time includes encoding "
            f"the images when the on-disk feature cache is cold (about 65 s here; the later rows read the cache).\n\n"
            + markdown_table([{k: r[k] for k in keys} for r in e["rows"]], keys)
            + _published(e["experiment"], {r["strategy"]: [100 * r["average_accuracy"]] for r in e["rows"]}))


def _render_l2p_text(e: dict[str, Any]) -> str:
    s = e["settings"]
    keys = ["strategy", "average_accuracy", "backward_transfer", "forgetting", "wall_seconds"]
    return (f"## L2P on frozen MiniLM (text) vs fine-tuning and replay (Wang et al. 2022)\n\n"
            f"{s['scenario']}, {s['train_texts']} training and {s['test_texts']} test definitions (subset "
            f"{s['subset']}); encoder {s['encoder']}. L2P proper: the selected prompts (M={s['l2p']['pool_size']}, "
            f"N={s['l2p']['top_n']}, L_p={s['l2p']['prompt_length']}, λ={s['l2p']['pull']}) are prepended to MiniLM's "
            f"token embeddings, the frozen encoder runs on every step and the head reads the prompt positions; "
            f"query = MiniLM's mean-pooled sentence vector. Fine-tuning, replay (reservoir memory of 100 and 500 "
            f"definitions, i.e. 10 and 50 per class) and joint (upper bound) train one linear head on the cached frozen "
            f"MiniLM sentence vectors. Every row: Adam lr {s['lr']} (the paper's constant rate), batch {s['batch_size']}, "
            f"{s['epochs']} epochs per experience (the paper's: 5), seed {s['seed']}. ACC = mean accuracy over the 5 "
            f"experiences after the last.\n\n"
            + markdown_table([{k: r[k] for k in keys} for r in e["rows"]], keys)
            + _published(e["experiment"], {r["strategy"]: [100 * r["average_accuracy"]] for r in e["rows"]}))


RENDER = {"ewc-permuted-mnist": _render_ewc, "multi-mnist": _render_multi_mnist, "l2p-split-mnist": _render_l2p,
          "l2p-wordnet-topics": _render_l2p_text}


def _load(e: dict[str, Any]) -> str:
    load = e.get("load_average")
    return f"\n1-minute load average at start / end: {load[0]:.1f} / {load[1]:.1f} (2 shared cores).\n" if load else ""


def render(payload: dict[str, Any]) -> str:
    return (f"# Reproductions\n\nOne CPU thread (torch {payload['env']['torch']}). Regenerate with "
            f"`python benchmarks/reproductions.py{' --quick' if payload['quick'] else ''}` (all experiments) or "
            f"`--only ewc,multi-mnist,l2p,l2p-text` (those, keeping the others' stored results).\n\n"
            + "\n".join(RENDER[e["experiment"]](e) + _load(e) for e in payload["experiments"]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default=",".join(EXPERIMENTS), help="comma-separated: " + ", ".join(EXPERIMENTS))
    args = ap.parse_args()
    env = setup(1)
    stored = RESULTS / ("reproductions_quick.json" if args.quick else "reproductions.json")
    old = json.loads(stored.read_text()) if stored.exists() else {}
    kept = {e["experiment"]: e for e in old.get("experiments", [])}
    for name in args.only.split(","):
        load = os.getloadavg()[0]
        e = EXPERIMENTS[name](args.quick)
        e["load_average"] = [load, os.getloadavg()[0]]  # 1-minute load at start and end (a shared 2-core machine)
        kept[e["experiment"]] = e
    for e in kept.values():
        e["published"] = PUBLISHED[e["experiment"]]
    order = list(RENDER)
    payload = {"env": env, "quick": args.quick, "experiments": sorted(kept.values(), key=lambda e: order.index(e["experiment"]))}
    write_results("reproductions_quick" if args.quick else "reproductions", payload, render(payload))


EXPERIMENTS = {"ewc": ewc_permuted_mnist, "multi-mnist": multi_mnist, "l2p": l2p_split_mnist,
               "l2p-text": l2p_wordnet_topics}


if __name__ == "__main__":
    main()
