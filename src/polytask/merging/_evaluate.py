"""Evaluate mergers on a merge suite: merged body + each task's own head, normalised accuracy.

Normalised accuracy (Ilharco et al., ICLR 2023, Sec. 4; TIES and AdaMerging report the same) is
acc_t(merged) / acc_t(fine-tuned on t alone), averaged over the tasks.

What each method gets, beyond the base and fine-tuned tensors:

* ``task-arithmetic``, ``ties``, ``dare``, ``breadcrumbs``: the scaling λ is chosen on the
  validation split from a small grid unless given, as the papers do (first ``val_limit`` validation
  samples of every task; best average normalised accuracy).
* ``fisher``: a diagonal Fisher per fine-tuned model from 32 of its training inputs (exact expectation
  over classes via :func:`polytask.merging.diagonal_fisher`; for the text suites, whose Hugging Face
  model cannot be vmapped, one label sampled from p(y|x) per input, the Monte Carlo estimate).
* ``adamerging``: unlabeled test inputs of every task (the paper's test-time setting).
* ``atlas``: a few labelled training samples of every task (few-shot).
* ``twin-merging``: a few training inputs of every task with their task id to train the router
  (route on the raw input for the image suites; on the pretrained body's sentence embedding for
  text). On text the per-input merge runs one input at a time (the HF model cannot be vmapped).

Suite-specific defaults for the learned methods (fewer steps, larger step sizes on the big models
so a run fits the CPU budget) are in :data:`LEARNED_DEFAULTS`; any option can be overridden.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from polytask.errors import PolytaskError
from polytask.merging._suites import MergeSuite
from polytask.registry import MERGERS, check_options

LAMBDA_GRID: dict[str, tuple[float, ...]] = {
    "task-arithmetic": (0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0),
    "dare": (0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0),
    "breadcrumbs": (0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0),
    "ties": (0.4, 0.6, 0.8, 1.0, 1.3, 1.6),
}
LEARNED_DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {
    "dense": {"adamerging": {}, "atlas": {}, "twin-merging": {}},
    "vision": {"adamerging": {"steps": 150, "lr": 3e-3}, "atlas": {"steps": 60}, "twin-merging": {}},
    "text": {"adamerging": {"steps": 30, "lr": 1e-2}, "atlas": {"steps": 20, "lr": 3e-2}, "twin-merging": {"steps": 200}},
}
#: (batches, batch size) of the data handed to the learned mergers, per suite size
DATA_SIZES = {"dense": {"adamerging": (None, 32), "atlas": (4, 16), "twin-merging": (4, 16), "fisher": (8, 4)},
              "vision": {"adamerging": (None, 16), "atlas": (4, 16), "twin-merging": (4, 16), "fisher": (8, 4)},
              "text": {"adamerging": (4, 8), "atlas": (4, 8), "twin-merging": (4, 16), "fisher": (32, 1)}}
VAL_LIMIT = {"dense": None, "vision": 200, "text": 64}
EVAL_BATCH = {"dense": 512, "vision": 256, "text": 32}


def size_class(suite: MergeSuite) -> str:
    return "text" if suite.kind == "text" else ("vision" if suite.name.startswith("vision") else "dense")


def method_names() -> list[str]:
    import polytask.merging  # noqa: F401  (registers the mergers)

    return MERGERS.names()


def check_methods(methods: list[str]) -> None:
    valid = method_names()
    bad = [m for m in methods if m not in valid]
    if bad:
        raise PolytaskError(f"unknown merging method {bad[0]!r}; choose among: {', '.join(valid)}")


def _batches(x: Tensor, size: int, count: int | None, y: Tensor | None = None) -> list[Any]:
    n = len(x) if count is None else min(len(x), size * count)
    out = []
    for i in range(0, n, size):
        out.append((x[i:i + size], y[i:i + size]) if y is not None else x[i:i + size])
    return out


def _shuffled(x: Tensor, y: Tensor, seed: int) -> tuple[Tensor, Tensor]:
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    return x[perm], y[perm]


def sampled_fisher(suite: MergeSuite, params: dict[str, Tensor], task: str, x: Tensor, seed: int) -> dict[str, Tensor]:
    """Diagonal Fisher with one label y ~ p(y|x) drawn per input: mean of (∇ log p(y|x))²."""
    p = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    fisher = {k: torch.zeros_like(v) for k, v in p.items()}
    g = torch.Generator().manual_seed(seed)
    for i in range(len(x)):
        logp = torch.log_softmax(suite.logits(p, x[i:i + 1], task), -1)[0]
        y = int(torch.multinomial(logp.detach().exp(), 1, generator=g))
        grads = torch.autograd.grad(logp[y], list(p.values()))
        for k, gr in zip(p, grads):
            fisher[k] += gr.pow(2)
    return {k: v / len(x) for k, v in fisher.items()}


def exact_fisher(suite: MergeSuite, params: dict[str, Tensor], task: str, batches: list[Tensor]) -> dict[str, Tensor]:
    """:func:`polytask.merging.diagonal_fisher` of the fine-tuned body + head, restricted to the merged tensors."""
    from polytask.merging import diagonal_fisher

    body = suite.body
    saved = {k: v.detach().clone() for k, v in body.state_dict().items() if k in params}
    body.load_state_dict(params, strict=False)
    net = nn.Sequential(body, suite.heads[task])
    try:
        with torch.enable_grad():
            f = diagonal_fisher(net, batches)
    finally:
        body.load_state_dict(saved, strict=False)
    return {k[2:]: v for k, v in f.items() if k.startswith("0.") and k[2:] in params}


def make_merger(method: str, options: dict[str, Any]) -> Any:
    return MERGERS.create(method, **options)


def merge(suite: MergeSuite, method: str, seed: int = 0, options: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
    """Run ``method`` on the suite; returns (merged state dict or TwinMergedModel, options used)."""
    check_methods([method])
    size = size_class(suite)
    cls = MERGERS.get(method)
    opts = dict(LEARNED_DEFAULTS[size].get(method, {}))
    opts.update(options or {})
    if "seed" in _accepted(cls) and "seed" not in (options or {}):
        opts["seed"] = seed
    check_options(cls, opts, f"merger {method!r}")
    base, models = suite.base_path, suite.model_paths
    sizes = DATA_SIZES[size]
    if method == "fisher":
        count, bs = sizes["fisher"]
        fishers = []
        for t in suite.tasks:
            x, y = _shuffled(*suite.data[t]["train"], seed)
            ft = suite.load_model(t)
            if suite.kind == "text":
                fishers.append(sampled_fisher(suite, ft, t, x[:count * bs], seed))
            else:
                fishers.append(exact_fisher(suite, ft, t, _batches(x, bs, count)))
        opts["fishers"] = fishers
    if cls.data_free:
        merger = make_merger(method, opts)
        return merger.merge(base, models), {k: v for k, v in opts.items() if k != "fishers"}
    merger = make_merger(method, opts)
    count, bs = sizes[method]
    if method == "adamerging":
        data = [_batches(suite.data[t]["test"][0], bs, count) for t in suite.tasks]
        return merger.merge(base, models, model=suite.body, data=data, forward=suite.forward_fn()), opts
    if method == "atlas":
        shots = [_shuffled(*suite.data[t]["train"], seed) for t in suite.tasks]
        data = [_batches(x, bs, count, y) for x, y in shots]
        return merger.merge(base, models, model=suite.body, data=data, forward=suite.forward_fn()), opts
    data = [_batches(_shuffled(*suite.data[t]["train"], seed)[0], bs, count) for t in suite.tasks]
    features = None
    if suite.kind == "text":
        body = suite.body

        def features(x: Tensor) -> Tensor:
            with torch.no_grad():
                return body(x)
    return merger.merge(base, models, model=suite.body, data=data, features=features), opts


def _accepted(cls: Any) -> set[str]:
    import inspect

    return set(inspect.signature(cls).parameters)


@torch.no_grad()
def accuracy(suite: MergeSuite, merged: Any, task: str, split: str = "test", limit: int | None = None) -> float:
    """Accuracy of the merged body (a state dict or a TwinMergedModel) with ``task``'s own head."""
    if isinstance(merged, dict):
        return suite.accuracy(merged, task, split, EVAL_BATCH[size_class(suite)], limit)
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
    """Pick λ on the validation split (average normalised accuracy over the tasks)."""
    limit = VAL_LIMIT[size_class(suite)]
    ft_val = {t: suite.meta["finetuned_val_accuracy"][t] for t in suite.tasks}
    scores = {}
    for lam in LAMBDA_GRID[method]:
        merged, _ = merge(suite, method, seed, {**options, "lam": lam})
        scores[lam] = sum(accuracy(suite, merged, t, "val", limit) / max(ft_val[t], 1e-9) for t in suite.tasks) / len(suite.tasks)
    best = max(scores, key=lambda k: (scores[k], -abs(k - 0.5)))
    return best, scores


def evaluate_method(suite: MergeSuite, method: str, seed: int = 0, options: dict[str, Any] | None = None,
                    tune: bool = True) -> dict[str, Any]:
    """Merge with ``method`` and return the run's metrics (the layout of ``metrics.json``)."""
    options = dict(options or {})
    start = time.perf_counter()
    tuned = None
    if tune and method in LAMBDA_GRID and "lam" not in options:
        lam, scores = tune_lambda(suite, method, seed, options)
        options["lam"] = lam
        tuned = {"lam": lam, "val_scores": {str(k): round(v, 4) for k, v in scores.items()}}
    t0 = time.perf_counter()
    merged, used = merge(suite, method, seed, options)
    merge_seconds = time.perf_counter() - t0
    test = {t: {"accuracy": accuracy(suite, merged, t)} for t in suite.tasks}
    return run_metrics(suite, method, seed, test, used, tuned=tuned, merge_seconds=merge_seconds,
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
