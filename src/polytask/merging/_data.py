"""The :class:`~polytask.merging.MergeData` a benchmark hands a merger: from a merge suite, per the merger's ``needs``.

* ``fisher``: a diagonal Fisher per fine-tuned model from the first training inputs of its task
  (shuffled by the seed), restricted to the merged tensors: the exact expectation over classes via
  :func:`polytask.merging.diagonal_fisher`, or, on the text suites, whose Hugging Face model cannot
  be vmapped, one label sampled from p(y|x) per input (the Monte Carlo estimate).
* ``unlabeled``: unlabeled test inputs of every task (AdaMerging's test-time setting).
* ``labeled``: a few labelled training samples of every task (few-shot).
* ``routing``: a few training inputs of every task, the task id being the label; the router reads
  the raw input on the image suites and the pretrained body's sentence embedding on text.

How many batches of which size: the merger's ``data_sizes`` for the suite's size class. Every
batch list also comes with the body, the ``forward`` running it with a task's head, and the router
features.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from polytask.merging.base import MergeData, Merger
from polytask.merging.fisher import diagonal_fisher
from polytask.merging.suites import MergeSuite


def merge_data(suite: MergeSuite, merger: type[Merger], seed: int) -> MergeData | None:
    """What ``merger`` needs from ``suite`` (None for a data-free rule); draws are seeded by ``seed``."""
    needs = merger.needs
    if not needs:
        return None
    count, size = merger.data_sizes[suite.spec.size_class]
    data = MergeData(model=suite.body, forward=suite.forward_fn(), features=_features(suite))
    if "unlabeled" in needs:
        data.batches = [_batches(suite.data[t]["test"][0], size, count) for t in suite.tasks]
    elif "labeled" in needs:
        shots = [_shuffled(*suite.data[t]["train"], seed) for t in suite.tasks]
        data.batches = [_batches(x, size, count, y) for x, y in shots]
    elif "routing" in needs:
        data.batches = [_batches(_shuffled(*suite.data[t]["train"], seed)[0], size, count) for t in suite.tasks]
    if "fisher" in needs:
        data.fishers = [_fisher(suite, t, count, size, seed) for t in suite.tasks]
    return data


def _features(suite: MergeSuite) -> Callable[[Tensor], Tensor] | None:
    """Router input: the pretrained body's embedding on text, the raw input (None) otherwise."""
    if suite.kind != "text":
        return None
    body = suite.body

    def features(x: Tensor) -> Tensor:
        with torch.no_grad():
            return body(x)

    return features


def _batches(x: Tensor, size: int, count: int | None, y: Tensor | None = None) -> list[Any]:
    n = len(x) if count is None else min(len(x), size * count)
    out = []
    for i in range(0, n, size):
        out.append((x[i:i + size], y[i:i + size]) if y is not None else x[i:i + size])
    return out


def _shuffled(x: Tensor, y: Tensor, seed: int) -> tuple[Tensor, Tensor]:
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    return x[perm], y[perm]


def _fisher(suite: MergeSuite, task: str, count: int | None, size: int, seed: int) -> dict[str, Tensor]:
    """The diagonal Fisher of ``task``'s fine-tuned body + head on ``count`` batches of ``size`` training inputs."""
    x, _ = _shuffled(*suite.data[task]["train"], seed)
    params = suite.load_model(task)
    if suite.kind == "text":
        return sampled_fisher(suite, params, task, x[:count * size], seed)
    return exact_fisher(suite, params, task, _batches(x, size, count))


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
    """:func:`~polytask.merging.diagonal_fisher` of the fine-tuned body + head, restricted to the merged tensors."""
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
