"""Evaluate a merger on a merge suite: merged body + each task's own head, normalised accuracy.

Normalised accuracy (Ilharco et al., ICLR 2023, Sec. 4; TIES and AdaMerging report the same) is
acc_t(merged) / acc_t(fine-tuned on t alone), averaged over the tasks.

The harness knows no merger by name; it reads what the merger class declares:

* ``lambda_grid``: the scaling λ (option ``lam``) is chosen on the validation split from this grid
  unless given, as the papers do (the suite's ``val_limit`` first validation samples of every task;
  best average normalised accuracy).
* ``needs``: the data it gets, built by :func:`polytask.merging._data.merge_data` (Fishers,
  unlabeled test inputs, few-shot samples, router inputs) in the amounts of ``data_sizes``.
* ``suite_defaults``: option defaults for the suite's size class (fewer steps, larger step sizes on
  the big models so a run fits the CPU budget); any option can be overridden.

A merger returns a state dict, or a model that routes each input (Twin-Merging: ``route`` and
``params_for``); on text such a model runs one input at a time (the HF model cannot be vmapped).
A fuser (:mod:`polytask.merging.fusion`, registry ``FUSERS``) is scored the same way by
:func:`evaluate_fuser`: it keeps every expert, so its run also records the models and parameters kept.
"""

from __future__ import annotations

import inspect
import time
from typing import Any

import torch
from torch.func import functional_call

from polytask.errors import PolytaskError
from polytask.merging._data import merge_data
from polytask.merging.fusion import fuse_suite, kept_parameters
from polytask.merging.suites import MergeSuite
from polytask.registry import FUSERS, MERGERS, check_options


def check_methods(methods: list[str]) -> None:
    valid = MERGERS.names() + FUSERS.names()
    bad = [m for m in methods if m not in valid]
    if bad:
        raise PolytaskError(f"unknown merging method {bad[0]!r}; choose among: {', '.join(valid)}")


def run_merger(suite: MergeSuite, method: str, seed: int = 0,
               options: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
    """Run ``method`` on the suite; returns (merged state dict or routing model, options used)."""
    check_methods([method])
    cls = MERGERS.get(method)
    opts = dict(cls.suite_defaults.get(suite.spec.size_class, {}))
    opts.update(options or {})
    if "seed" in inspect.signature(cls).parameters and "seed" not in (options or {}):
        opts["seed"] = seed
    check_options(cls, opts, f"merger {method!r}")
    data = merge_data(suite, cls, seed)
    return MERGERS.create(method, **opts).merge(suite.base_path, suite.model_paths, data), opts


@torch.no_grad()
def accuracy(suite: MergeSuite, merged: Any, task: str, split: str = "test", limit: int | None = None) -> float:
    """Accuracy of the merged body (a state dict or a routing model) with ``task``'s own head."""
    if isinstance(merged, dict):
        return suite.accuracy(merged, task, split, suite.spec.eval_batch, limit)
    x, y = suite.data[task][split]
    if limit is not None:
        x, y = x[:limit], y[:limit]
    head = suite.heads[task]
    correct = 0
    chunk = 32
    for i in range(0, len(y), chunk):
        xb = x[i:i + chunk]
        if suite.kind == "text":  # per input: θ_s + Σ_t w_t(x) v_t, one forward each
            w = merged.route(xb)
            feats = torch.cat([functional_call(suite.body, merged.params_for(w[j]), (xb[j:j + 1],)) for j in range(len(xb))])
        else:
            feats = merged(xb)
        correct += int((head(feats).argmax(-1) == y[i:i + chunk]).sum())
    return correct / len(y)


def tune_lambda(suite: MergeSuite, method: str, seed: int, options: dict[str, Any]) -> tuple[float, dict[float, float]]:
    """Pick λ from the merger's ``lambda_grid`` on the validation split (average normalised accuracy)."""
    limit = suite.spec.val_limit
    ft_val = {t: suite.meta["finetuned_val_accuracy"][t] for t in suite.tasks}
    scores = {}
    for lam in MERGERS.get(method).lambda_grid:
        merged, _ = run_merger(suite, method, seed, {**options, "lam": lam})
        scores[lam] = sum(accuracy(suite, merged, t, "val", limit) / max(ft_val[t], 1e-9) for t in suite.tasks) / len(suite.tasks)
    best = max(scores, key=lambda k: (scores[k], -abs(k - 0.5)))
    return best, scores


def evaluate_merger(suite: MergeSuite, method: str, seed: int = 0, options: dict[str, Any] | None = None,
                    tune: bool = True) -> dict[str, Any]:
    """Merge with ``method`` and return the run's metrics (the layout of ``metrics.json``); a fuser's name
    runs :func:`evaluate_fuser`."""
    options = dict(options or {})
    check_methods([method])
    if method in FUSERS:
        return evaluate_fuser(suite, method, seed, options)
    start = time.perf_counter()
    tuned = None
    if tune and MERGERS.get(method).lambda_grid and "lam" not in options:
        lam, scores = tune_lambda(suite, method, seed, options)
        options["lam"] = lam
        tuned = {"lam": lam, "val_scores": {str(k): round(v, 4) for k, v in scores.items()}}
    t0 = time.perf_counter()
    merged, used = run_merger(suite, method, seed, options)
    merge_seconds = time.perf_counter() - t0
    test = {t: {"accuracy": accuracy(suite, merged, t)} for t in suite.tasks}
    return run_metrics(suite, method, seed, test, used, tuned=tuned, merge_seconds=merge_seconds,
                       seconds=time.perf_counter() - start)


@torch.no_grad()
def evaluate_fuser(suite: MergeSuite, method: str, seed: int = 0, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Fuse the outputs of the base and every fine-tuned model with ``method`` (deterministic: ``seed`` is only
    recorded); besides the accuracies, the models and parameters kept, the seconds to predict every test
    set, and each expert's mean weight per task."""
    start = time.perf_counter()
    fused = fuse_suite(suite, method, **(options or {}))
    fuser = next(iter(fused.values())).fuser
    t0 = time.perf_counter()
    test, weights = {}, {}
    for t in suite.tasks:
        x, y = suite.data[t]["test"]
        correct, total = 0, torch.zeros(len(suite.tasks))
        for i in range(0, len(y), suite.spec.eval_batch):
            base, experts = fused[t].logits(x[i:i + suite.spec.eval_batch])
            w = fuser.weights(base, experts)
            correct += int((fuser.combine(base, experts, w).argmax(-1) == y[i:i + suite.spec.eval_batch]).sum())
            total += w.sum(0)
        test[t] = {"accuracy": correct / len(y)}
        weights[t] = {e: round(float(v) / len(y), 4) for e, v in zip(suite.tasks, total)}
    inference = time.perf_counter() - t0
    models, parameters = kept_parameters(suite, fuser)
    return run_metrics(suite, method, seed, test, dict(options or {}), family="fusion", models_kept=models,
                       parameters_kept=parameters, expert_weights=weights, inference_seconds=inference,
                       seconds=time.perf_counter() - start)


def run_metrics(suite: MergeSuite, method: str, seed: int, test: dict[str, dict[str, float]], options: dict[str, Any],
                **extra: Any) -> dict[str, Any]:
    ft = suite.meta["finetuned_accuracy"]
    norm = {t: test[t]["accuracy"] / max(ft[t], 1e-9) for t in suite.tasks}
    return {
        "route": "merge", "suite": suite.name, "method": method, "seed": seed,
        "options": {k: v for k, v in options.items() if _jsonable(v)},
        "test": test, "normalized_accuracy": norm,
        "average_accuracy": sum(r["accuracy"] for r in test.values()) / len(test),
        "average_normalized_accuracy": sum(norm.values()) / len(norm),
        "finetuned": {t: {"accuracy": ft[t]} for t in suite.tasks},
        "base": {t: {"accuracy": suite.meta["base_accuracy"][t]} for t in suite.tasks},
        **{k: (round(v, 3) if isinstance(v, float) else v) for k, v in extra.items()},
    }


def _jsonable(v: Any) -> bool:
    return isinstance(v, (int, float, str, bool, type(None), list, tuple, dict))
