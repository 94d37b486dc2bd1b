"""One cell of a comparison: one method of one route (or a reference) at one seed -> its metrics.

Every cell returns the same record: per-task test accuracy, and what the user pays for the
method — training seconds and gradient steps, the data it needs and when, the parameters stored
after training, and the parameters and seconds needed to predict every task's test set.

Costs count what each route does from the shared pretrained start θ_0:

* ``individual`` (ceiling): T fine-tuning runs (linear probe, then body + head; the merge suite's
  LP-FT); T bodies stored and run.
* ``probe`` (floor): T linear probes on the frozen body; one body stored.
* joint: one run over all tasks' data at once; one model stored.
* continual: one run per task, in order, with only the current task's data (plus the strategy's
  buffer); one model stored.
* merge: the T fine-tuning runs of ``individual`` plus the merge itself (λ tuned on validation
  data where the method has a grid); one body stored.
* fusion (``merge:<fuser>``, e.g. ``merge:dlf``): the T fine-tuning runs; every fine-tuned body (and
  the base, for a rule that reads it) stored and run on every input, their outputs fused.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import nn

from polytask.comparison.suite import ComparisonSuite
from polytask.continual import ContinualConfig, Scenario, run_continual
from polytask.merging import evaluate_merger
from polytask.registry import ARCHITECTURES, FUSERS, MERGERS
from polytask.trainer import TrainConfig, Trainer, evaluate_model, seed_everything

REFERENCES = ("individual", "probe")
#: what a merger reads beyond the fine-tuned models (polytask.merging.Merger.needs)
MERGE_ACCESS = {"fisher": "train inputs for Fishers", "labeled": "few labelled shots", "unlabeled": "unlabelled test inputs",
                "routing": "few inputs + task ids"}
#: architecture options for the joint route on a pretrained body: linear heads as in the merge suites
JOINT_ARCH_OPTIONS: dict[str, dict[str, Any]] = {"shared-bottom": {"bottom": [], "tower": []}}
#: MGDA runs as MGDA-UB (Sener & Koltun 2018, Sec. 3.3): on the shared representation, so a step costs
#: one backward pass through the body instead of T
JOINT_WEIGHTING_OPTIONS: dict[str, dict[str, Any]] = {"mgda": {"mode": "rep"}}


def train_config(suite: ComparisonSuite, seed: int, **extra: Any) -> TrainConfig:
    """The fine-tuning settings of the suite's individual models: every route trains with the same budget."""
    return TrainConfig(**suite.finetune, seed=seed, progress=False, num_threads=None, **extra)


def count(params: Any) -> int:
    return int(sum(p.numel() for p in params))


def _steps(samples: dict[str, int], epochs: int, batch_size: int) -> int:
    return sum(epochs * math.ceil(n / batch_size) for n in samples.values())


def _accuracy(model: nn.Module, suite: ComparisonSuite, batch_size: int) -> tuple[dict[str, float], float]:
    start = time.perf_counter()
    res = evaluate_model(model, suite.suite.tasks, suite.suite.test, batch_size)
    return {t: res[t]["accuracy"] for t in suite.task_names}, time.perf_counter() - start


def linear_head_model(suite: ComparisonSuite) -> nn.Module:
    """A fresh copy of the body with one linear head per task (shared-bottom with no bottom or tower)."""
    return ARCHITECTURES.create("shared-bottom", suite.suite.tasks, suite.suite.input_spec, backbone=suite.body(),
                                **JOINT_ARCH_OPTIONS["shared-bottom"])


def with_probe_heads(model: nn.Module, suite: ComparisonSuite) -> nn.Module:
    """Start each linear head from the task's linear probe (LP-FT, as the individual models start)."""
    for t, probe in suite.probe_heads().items():
        model.heads[t][-1].load_state_dict(probe.state_dict())
    return model


def _linear_heads(arch: str) -> bool:
    return JOINT_ARCH_OPTIONS.get(arch, {}).get("tower") == []


def body_inference_seconds(suite: ComparisonSuite) -> float:
    """Seconds to predict every task's test set with one body and the task heads (the form of the
    merged model, the probes and each individual model: one body pass per sample)."""
    seed_everything(0)
    return _accuracy(linear_head_model(suite), suite, 256)[1]


def _body_sizes(suite: ComparisonSuite) -> tuple[int, int]:
    """(all parameters of the body, its fine-tuned/merged parameters)."""
    body = suite.merge.body
    return count(body.parameters()), count(p for n, p in body.named_parameters() if n in suite.trainable)


def _heads(suite: ComparisonSuite) -> int:
    return count(p for h in suite.merge.heads.values() for p in h.parameters())


def joint_cell(suite: ComparisonSuite, method: str, seed: int) -> dict[str, Any]:
    """``arch+weighting``: one model on all tasks' data at once (each sample labelled for its own task)."""
    arch, _, weighting = method.partition("+")
    seed_everything(seed)
    model = ARCHITECTURES.create(arch, suite.suite.tasks, suite.suite.input_spec, backbone=suite.body(),
                                 **JOINT_ARCH_OPTIONS.get(arch, {}))
    if _linear_heads(arch):
        with_probe_heads(model, suite)
    cfg = train_config(suite, seed)
    trainer = Trainer(model, suite.suite.tasks, weighting, cfg, weighting_options=JOINT_WEIGHTING_OPTIONS.get(weighting))
    start = time.perf_counter()
    trainer.fit(suite.suite.train, suite.suite.val)
    seconds = time.perf_counter() - start
    acc, infer = _accuracy(model, suite, 256)
    stored = count(model.parameters())
    return {"accuracy": acc, "train_seconds": seconds, "gradient_steps": trainer.step,
            "data_access": "all at once", "stored_parameters": stored,
            "inference_parameters": stored, "inference_seconds": infer}


def continual_cell(suite: ComparisonSuite, method: str, seed: int) -> dict[str, Any]:
    """A strategy over one experience per task (task-incremental), starting from θ_0."""
    cfg = train_config(suite, seed, restore_best=False)
    scenario = Scenario.from_suite(suite.suite)

    def model() -> nn.Module:
        return with_probe_heads(linear_head_model(suite), suite)

    result = run_continual(ContinualConfig(scenario=suite.name, strategy=method, train=cfg), scenario=scenario,
                           model=model)
    acc, infer = _accuracy(result.model, suite, 256)
    buffer = getattr(result.strategy, "buffer", None)
    access = "one task at a time" + (f" + {buffer.capacity} buffered" if buffer is not None else "")
    stored = count(result.model.parameters())
    return {"accuracy": acc, "train_seconds": result.metrics["train_seconds"],
            "gradient_steps": _steps(suite.samples(), cfg.epochs, cfg.batch_size), "data_access": access,
            "stored_parameters": stored, "inference_parameters": stored, "inference_seconds": infer,
            "forgetting": result.metrics["forgetting"], "backward_transfer": result.metrics["backward_transfer"]}


def _finetune_cost(suite: ComparisonSuite) -> tuple[float, int]:
    """Seconds and gradient steps of the suite's T individual LP-FT runs (recorded when it was built)."""
    meta = suite.merge.meta
    probe, train = meta["finetune"]["probe"], meta["finetune"]["train"]
    samples = suite.samples()
    steps = _steps(samples, probe["epochs"], probe["batch_size"]) + _steps(samples, train["epochs"], train["batch_size"])
    return float(sum(meta["task_seconds"].values())), steps


def merge_cell(suite: ComparisonSuite, method: str, seed: int) -> dict[str, Any]:
    """A merger over the cached fine-tuned bodies (each task keeps its own fine-tuned head), or a fuser
    that keeps them all and fuses their outputs."""
    run = evaluate_merger(suite.merge, method, seed)
    seconds, steps = _finetune_cost(suite)
    if method in FUSERS:
        return {"accuracy": {t: run["test"][t]["accuracy"] for t in suite.task_names}, "train_seconds": seconds,
                "gradient_steps": steps, "merge_seconds": 0.0, "data_access": "none",
                "stored_parameters": run["parameters_kept"], "inference_parameters": run["parameters_kept"],
                "inference_seconds": float(run["inference_seconds"])}
    body, _ = _body_sizes(suite)
    needs = MERGERS.get(method).needs
    access = ", ".join([MERGE_ACCESS[n] for n in sorted(needs)] + (["val split for λ"] if run.get("tuned") else [])) \
        or "none"
    return {"accuracy": {t: run["test"][t]["accuracy"] for t in suite.task_names},
            "train_seconds": seconds + float(run["seconds"]), "gradient_steps": steps,
            "merge_seconds": float(run["merge_seconds"]), "data_access": access,
            "stored_parameters": body + _heads(suite), "inference_parameters": body + _heads(suite),
            # Twin-Merging merges per input at test time: one body's time would understate its cost
            "inference_seconds": None if method == "twin-merging" else body_inference_seconds(suite)}


def reference_cell(suite: ComparisonSuite, which: str) -> dict[str, Any]:
    """``individual`` (one fine-tuned body per task) or ``probe`` (the frozen body with linear probes)."""
    body, tuned = _body_sizes(suite)
    heads = _heads(suite)
    meta = suite.merge.meta
    if which == "individual":
        seconds, steps = _finetune_cost(suite)
        stored = body + (len(suite.task_names) - 1) * tuned + heads
        return {"accuracy": suite.reference("individual"), "train_seconds": seconds, "gradient_steps": steps,
                "data_access": "one task each", "stored_parameters": stored,
                "inference_parameters": stored, "inference_seconds": body_inference_seconds(suite)}
    probe = meta["finetune"]["probe"]
    return {"accuracy": suite.reference("probe"), "train_seconds": None,
            "gradient_steps": _steps(suite.samples(), probe["epochs"], probe["batch_size"]),
            "data_access": "one task each", "stored_parameters": body + heads,
            "inference_parameters": body + heads, "inference_seconds": body_inference_seconds(suite)}


CELLS = {"joint": joint_cell, "continual": continual_cell, "merge": merge_cell}


def run_cell(suite: ComparisonSuite, route: str, method: str, seed: int) -> dict[str, Any]:
    """The record of one cell; torch is reseeded first, so a cell's numbers do not depend on the others."""
    seed_everything(seed)
    with torch.random.fork_rng():
        record = reference_cell(suite, method) if route == "reference" else CELLS[route](suite, method, seed)
    return {"route": route, "method": method, "seed": seed, **record}
