"""Continual speed: polytask against Avalanche 0.6.0, side by side, on the same work.

Work: split-digits (scikit-learn 8x8 digits, 5 experiences of 2 classes, class-incremental, the
same fixed split on both sides), MLP 64-128-128-10, SGD lr 0.01 momentum 0.9 (fresh each
experience), 10 epochs, minibatch 32, one thread. Strategies with matching settings on both
sides: finetune, EWC (λ 1000, separate), online EWC (λ 1000, γ 1), SI (c 1, ξ 0.1), LwF (α 1,
T 2), replay (500), A-GEM (250 per experience, reference batch 256), DER++ (500, α 0.3, β 0.5).
Timed: each experience's training call, end-of-experience work included (Fisher, buffers),
evaluation excluded. Final accuracy: the mean test accuracy over the 5 experiences after the
last, computed by the same function for both sides.

Each (seed, strategy) runs once per side in its own process, seeds interleaved and the side
order alternating, so both sides see the same machine load. Three sides:

* ``polytask``: the project's venv (torch 2.13.0+cpu);
* ``polytask-avl``: polytask in the Avalanche venv, on that venv's torch build;
* ``avalanche``: Avalanche 0.6.0 in its own venv.

The ratio is Avalanche ÷ polytask on the same torch build (``polytask-avl``); the project-venv
ratio is shown beside it.

Avalanche needs torchvision, whose PyPI wheels link the CUDA build of torch (with the CPU build
``import torchvision`` fails: ``operator torchvision::nms does not exist``), so its venv gets torch
2.13.0 from PyPI (the CUDA build, run on CPU here) and the matching torchvision 0.28.0:

    python benchmarks/continual_speed.py --make-venv     # once: /tmp/avl-venv (~4 GB, a few minutes)
    python benchmarks/continual_speed.py                 # 3 seeds x 8 strategies x 3 sides (~15 min)
    python benchmarks/continual_speed.py --seeds 1 --strategies ewc,si
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
VENV = Path("/tmp/avl-venv")
VENV_PACKAGES = ["torch==2.13.0", "torchvision==0.28.0", "avalanche-lib==0.6.0", "scikit-learn",
                 "safetensors", "typer", "rich", "pandas", "pyyaml", "torchmetrics", "matplotlib"]
STRATEGIES = ["finetune", "ewc", "online-ewc", "si", "lwf", "replay", "agem", "der++"]
SIDES = ["polytask", "polytask-avl", "avalanche"]
POLYTASK_OPTIONS: dict[str, dict[str, Any]] = {
    "ewc": {"lam": 1000.0}, "online-ewc": {"lam": 1000.0, "gamma": 1.0}, "si": {"c": 1.0, "xi": 0.1},
    "lwf": {"alpha": 1.0, "temperature": 2.0}, "replay": {"memory": 500},
    "agem": {"memory_per_experience": 250, "memory_batch": 256}, "der++": {"memory": 500, "alpha": 0.3, "beta": 0.5},
}
EPOCHS, BATCH, LR = 10, 32, 0.01


# ------------------------------------------------------------------ workers
def _data() -> list[dict[str, Any]]:
    from polytask.registry import SCENARIOS

    scen = SCENARIOS.create("split-digits")
    return [{"x": e.train.x, "y": e.train.y["class"], "xt": e.test.x, "yt": e.test.y["class"]} for e in scen]


def _final_accuracy(model: Any, data: list[dict[str, Any]], logits: Any) -> float:
    import torch

    model.eval()
    with torch.no_grad():
        accs = [float((logits(model, d["xt"]).argmax(-1) == d["yt"]).float().mean()) for d in data]
    return sum(accs) / len(accs)


def _polytask(strategy: str, seed: int) -> dict[str, Any]:
    from polytask.continual.runner import ContinualConfig, run_continual

    cfg = ContinualConfig(scenario="split-digits", strategy=strategy, strategy_options=POLYTASK_OPTIONS.get(strategy, {}),
                          arch_options={"bottom": [128, 128], "tower": []},
                          train={"epochs": EPOCHS, "batch_size": BATCH, "lr": LR, "optimizer": "sgd", "seed": seed,
                                 "num_threads": 1, "progress": False})
    result = run_continual(cfg)
    acc = _final_accuracy(result.model, _data(), lambda m, x: m(x)["class"])
    return {"seconds": result.metrics["experience_seconds"], "accuracy": acc}


def _avalanche(strategy: str, seed: int) -> dict[str, Any]:
    import torch
    from torch import nn
    from avalanche.benchmarks.scenarios.deprecated.generators import tensors_benchmark
    from avalanche.training import AGEM, DER, EWC, LwF, Naive, Replay, SynapticIntelligence
    from avalanche.training.plugins import EvaluationPlugin

    data = _data()
    bench = tensors_benchmark(train_tensors=[(d["x"], d["y"]) for d in data],
                              test_tensors=[(d["xt"], d["yt"]) for d in data], task_labels=[0] * len(data))
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
    common = {"model": model, "optimizer": torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9),
              "criterion": nn.CrossEntropyLoss(), "train_mb_size": BATCH, "train_epochs": EPOCHS,
              "evaluator": EvaluationPlugin(loggers=[]), "device": "cpu"}
    make = {
        "finetune": lambda: Naive(**common),
        "ewc": lambda: EWC(ewc_lambda=1000.0, mode="separate", **common),
        "online-ewc": lambda: EWC(ewc_lambda=1000.0, mode="online", decay_factor=1.0, **common),
        "si": lambda: SynapticIntelligence(si_lambda=1.0, eps=0.1, **common),
        "lwf": lambda: LwF(alpha=1.0, temperature=2.0, **common),
        "replay": lambda: Replay(mem_size=500, **common),
        "agem": lambda: AGEM(patterns_per_exp=250, sample_size=256, **common),
        "der++": lambda: DER(mem_size=500, alpha=0.3, beta=0.5, batch_size_mem=BATCH, **common),
    }
    learner = make[strategy]()
    seconds = []
    for exp in bench.train_stream:
        start = time.perf_counter()
        learner.train(exp, num_workers=0)
        seconds.append(round(time.perf_counter() - start, 4))
    return {"seconds": seconds, "accuracy": _final_accuracy(model, data, lambda m, x: m(x))}


def worker(side: str, strategy: str, seed: int) -> None:
    import torch

    torch.set_num_threads(1)
    run = _avalanche if side == "avalanche" else _polytask
    run("finetune", seed + 1000)  # warm-up: first-call costs (kernels, lazy imports) stay out of the timings
    out = run(strategy, seed)
    print(json.dumps({"side": side, "strategy": strategy, "seed": seed, "torch": torch.__version__, **out}))


# ------------------------------------------------------------- orchestrator
def make_venv() -> None:
    """Create /tmp/avl-venv: torch 2.13.0 and torchvision 0.28.0 from PyPI, avalanche-lib 0.6.0."""
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    # an empty find-links folder: the machine's local torch+cpu wheel would win over PyPI's 2.13.0 otherwise
    env = {**os.environ, "PIP_FIND_LINKS": tempfile.mkdtemp()}
    subprocess.run([str(VENV / "bin" / "pip"), "install", *VENV_PACKAGES], check=True, env=env)


def _python(side: str) -> str:
    return sys.executable if side == "polytask" else str(VENV / "bin" / "python")


def run_one(side: str, strategy: str, seed: int) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([_python(side), __file__, "--worker", side, "--strategy", strategy, "--seed", str(seed)],
                          capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{side} {strategy} seed {seed} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarize(runs: list[dict[str, Any]], strategies: list[str]) -> list[dict[str, Any]]:
    rows = []
    for s in strategies:
        row: dict[str, Any] = {"strategy": s}
        for side in SIDES:
            mine = [r for r in runs if r["strategy"] == s and r["side"] == side]
            if not mine:
                continue
            curve = [statistics.mean(r["seconds"][i] for r in mine) for i in range(len(mine[0]["seconds"]))]
            accs = [r["accuracy"] for r in mine]
            row[side] = {"s_per_exp": statistics.mean(curve), "curve": curve, "last_over_first": curve[-1] / curve[0],
                         "accuracy": statistics.mean(accs), "accuracy_sd": statistics.stdev(accs) if len(accs) > 1 else 0.0}
        if "avalanche" in row:
            for side in ("polytask-avl", "polytask"):
                if side in row:
                    row[f"ratio_{side}"] = row["avalanche"]["s_per_exp"] / row[side]["s_per_exp"]
        rows.append(row)
    return rows


def render(payload: dict[str, Any]) -> str:
    env = payload["environment"]
    lines = ["# Continual speed: polytask vs Avalanche 0.6.0", "",
             "`python benchmarks/continual_speed.py` — split-digits (5 experiences of 2 classes, class-incremental), "
             "MLP 64-128-128-10, SGD lr 0.01 momentum 0.9, 10 epochs, minibatch 32, one thread, "
             f"{env['seeds']} seeds interleaved, side order alternating. Seconds per experience = mean over the 5 "
             "experiences and the seeds of the training call (end-of-experience work included, evaluation excluded).",
             "",
             f"Builds: polytask = project venv (torch {env.get('torch_polytask', '?')}); polytask-avl and Avalanche = "
             f"the Avalanche venv (torch {env.get('torch_avalanche', '?')}, run on CPU). Ratio = Avalanche ÷ polytask "
             "on the same build (polytask-avl); the project-venv ratio beside it.", "",
             "| strategy | polytask s/exp | polytask-avl s/exp | Avalanche s/exp | Avalanche ÷ polytask-avl | "
             "Avalanche ÷ polytask | accuracy polytask | accuracy Avalanche |",
             "|---|---|---|---|---|---|---|---|"]
    for r in payload["rows"]:
        p, q, a = r.get("polytask", {}), r.get("polytask-avl", {}), r.get("avalanche", {})
        cell = lambda d: f"{d['s_per_exp']:.3f}" if d else "–"  # noqa: E731
        acc = lambda d: f"{d['accuracy']:.3f} ± {d['accuracy_sd']:.3f}" if d else "–"  # noqa: E731
        ratio = lambda k: f"{r[k]:.2f}×" if k in r else "–"  # noqa: E731
        lines.append(f"| {r['strategy']} | {cell(p)} | {cell(q)} | {cell(a)} | {ratio('ratio_polytask-avl')} | "
                     f"{ratio('ratio_polytask')} | {acc(p or q)} | {acc(a)} |")
    lines += ["", "Seconds per experience, experience 1 → 5 (flat = cost independent of the number of experiences; "
              "last ÷ first in brackets):", "",
              "| strategy | polytask | polytask-avl | Avalanche |", "|---|---|---|---|"]
    for r in payload["rows"]:
        curve = lambda d: (" ".join(f"{v:.3f}" for v in d["curve"]) + f" ({d['last_over_first']:.2f})") if d else "–"  # noqa: E731
        lines.append(f"| {r['strategy']} | {curve(r.get('polytask'))} | {curve(r.get('polytask-avl'))} | "
                     f"{curve(r.get('avalanche'))} |")
    if payload.get("notes"):
        lines += ["", *payload["notes"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", choices=SIDES)
    ap.add_argument("--strategy")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--make-venv", action="store_true")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    ap.add_argument("--sides", default=",".join(SIDES))
    ap.add_argument("--render", action="store_true", help="re-render the Markdown from the JSON")
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, args.strategy, args.seed)
    if args.make_venv:
        return make_venv()
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from _common import RESULTS, write_results

    if args.render:
        payload = json.loads((RESULTS / "continual_speed.json").read_text())
        return write_results("continual_speed", payload, render(payload))
    if not (VENV / "bin" / "python").exists():
        raise SystemExit(f"no Avalanche venv at {VENV}; run: python benchmarks/continual_speed.py --make-venv")
    strategies, sides = args.strategies.split(","), args.sides.split(",")
    runs: list[dict[str, Any]] = []
    for seed in range(args.seeds):
        for k, strategy in enumerate(strategies):
            order = sides if (seed + k) % 2 == 0 else sides[::-1]
            for side in order:
                r = run_one(side, strategy, seed)
                runs.append(r)
                print(f"seed {seed} {strategy:10s} {side:13s} {sum(r['seconds']) / len(r['seconds']):.3f} s/exp "
                      f"acc {r['accuracy']:.3f}", flush=True)
    torch_of = {r["side"]: r["torch"] for r in runs}
    payload = {"environment": {"threads": 1, "seeds": args.seeds, "cpus": os.cpu_count(),
                               "torch_polytask": torch_of.get("polytask"), "torch_avalanche": torch_of.get("avalanche"),
                               "avalanche": "0.6.0", "epochs": EPOCHS, "batch_size": BATCH, "lr": LR},
               "rows": summarize(runs, strategies), "runs": runs}
    write_results("continual_speed", payload, render(payload))
    print(render(payload))


if __name__ == "__main__":
    main()
