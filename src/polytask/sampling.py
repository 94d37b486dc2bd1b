"""How the joint Trainer draws its batches, and suites with one dataset per task.

A suite with per-task data (one dataset per task, e.g. five image datasets) is held as one
:class:`~polytask.tasks.MultiTaskData` in which every sample carries the label of its own task
only (the other tasks' masks are False); the inputs of all tasks share one shape. Every route
reads it: the joint Trainer trains on it with one of the samplers below, the continual route
makes one experience per task, the merge route fine-tunes one copy per task.

Samplers (``TrainConfig.sampling``):

* ``proportional``: shuffle the union of the samples; a task's share of each batch follows its
  share of the data (the only choice for one input stream with several labels, and the default);
* ``per-task``: each step draws ``batch_size`` samples of every task (LibMTL's ``multi_input``
  mode); an epoch lasts until the largest task has been seen once, smaller tasks are reshuffled
  and drawn again;
* ``round-robin``: each step is one task's batch, the tasks taking turns; an epoch sees every
  sample once. A weighting then sees one task's loss per step (the others are 0), so the
  gradient-balancing methods want ``per-task``.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor

from polytask.errors import PolytaskError
from polytask.tasks import Batch, Inputs, MultiTaskData

SAMPLERS = ("proportional", "per-task", "round-robin")


def check_sampling(sampling: str) -> None:
    if sampling not in SAMPLERS:
        raise PolytaskError(f"unknown sampling {sampling!r}; choose one of: {', '.join(SAMPLERS)}")


def concat_data(parts: Sequence[MultiTaskData], tasks: Sequence[str]) -> MultiTaskData:
    """Concatenate datasets; a task missing from a part gets zero labels masked out there.

    Inputs must share their per-sample shape; token inputs of different lengths ([N, 2, L] packed
    ids and masks, or dicts of [N, L]) are right-padded with zeros (padding id 0, attention mask 0).
    """
    xs = _pad_to_common([p.x for p in parts])
    x: Inputs = {k: torch.cat([xx[k] for xx in xs]) for k in xs[0]} if isinstance(xs[0], dict) else torch.cat(xs)
    y: dict[str, Tensor] = {}
    mask: dict[str, Tensor] = {}
    for t in tasks:
        ref = next(p.y[t] for p in parts if t in p.y)
        ys, ms = [], []
        for p in parts:
            if t in p.y:
                ys.append(p.y[t])
                ms.append(p.mask[t])
            else:
                ys.append(torch.zeros((len(p), *ref.shape[1:]), dtype=ref.dtype))
                ms.append(torch.zeros(len(p), dtype=torch.bool))
        y[t], mask[t] = torch.cat(ys), torch.cat(ms)
    return MultiTaskData(x, y, mask)


def concat_task_data(datasets: Mapping[str, MultiTaskData]) -> MultiTaskData:
    """One dataset per task -> one MultiTaskData in which each sample is labelled for its own task only."""
    if not datasets:
        raise PolytaskError("give at least one task's dataset")
    missing = [t for t, d in datasets.items() if t not in d.y]
    if missing:
        raise PolytaskError(f"the dataset given for task {missing[0]!r} has no labels for it")
    return concat_data([d.select_tasks([t]) for t, d in datasets.items()], list(datasets))


def _pad_to_common(parts: list[Inputs]) -> list[Inputs]:
    """Right-pad the last dimension of token inputs so every task's inputs have one shape."""
    def shape(p: Inputs) -> Any:
        return {k: tuple(v.shape[1:]) for k, v in p.items()} if isinstance(p, dict) else tuple(p.shape[1:])

    if len({str(shape(p)) for p in parts}) == 1:
        return parts
    tensors = [list(p.values()) if isinstance(p, dict) else [p] for p in parts]
    if any(t.is_floating_point() or t.dim() < 2 for ts in tensors for t in ts) or \
            len({tuple(t.shape[1:-1]) for ts in tensors for t in ts}) != 1:
        raise PolytaskError("the tasks' inputs have different shapes "
                            f"({', '.join(str(shape(p)) for p in parts)}); give every task inputs of one shape")
    length = max(t.shape[-1] for ts in tensors for t in ts)

    def pad(t: Tensor) -> Tensor:
        return torch.nn.functional.pad(t, (0, length - t.shape[-1]))

    return [{k: pad(v) for k, v in p.items()} if isinstance(p, dict) else pad(p) for p in parts]


def task_pools(data: MultiTaskData, tasks: list[str]) -> list[Tensor]:
    """Indices of the samples that carry each task's label."""
    pools = [data.mask[t].nonzero().flatten() for t in tasks]
    empty = [t for t, p in zip(tasks, pools) if len(p) == 0]
    if empty:
        raise PolytaskError(f"no training sample carries a label for task {empty[0]!r}")
    return pools


def steps_per_epoch(data: MultiTaskData, tasks: list[str], batch_size: int, sampling: str) -> int:
    if sampling == "proportional":
        return math.ceil(len(data) / batch_size)
    sizes = [len(p) for p in task_pools(data, tasks)]
    if sampling == "per-task":
        return math.ceil(max(sizes) / batch_size)
    return sum(math.ceil(n / batch_size) for n in sizes)


def batches(data: MultiTaskData, tasks: list[str], batch_size: int, sampling: str, shuffle: bool,
            generator: torch.Generator) -> Iterator[Batch]:
    """The batches of one epoch under ``sampling`` (see the module docstring)."""
    if sampling == "proportional":
        yield from data.batches(batch_size, shuffle=shuffle, generator=generator)
        return
    whole = Batch(data.x, data.y, data.mask, frozenset())
    pools = task_pools(data, tasks)

    def order(pool: Tensor) -> Tensor:
        return pool[torch.randperm(len(pool), generator=generator)] if shuffle else pool

    if sampling == "per-task":
        steps = steps_per_epoch(data, tasks, batch_size, sampling)
        streams = [_cycle(order, pool, steps * batch_size) for pool in pools]
        for s in range(steps):
            yield whole.subset(torch.cat([st[s * batch_size:(s + 1) * batch_size] for st in streams]))
        return
    queues = [order(pool).split(batch_size) for pool in pools]
    for step in range(max(len(q) for q in queues)):
        for q in queues:
            if step < len(q):
                yield whole.subset(q[step])


def _cycle(order: Callable[[Tensor], Tensor], pool: Tensor, n: int) -> Tensor:
    """``n`` indices from ``pool``: whole reshuffled passes, concatenated."""
    passes = [order(pool) for _ in range(math.ceil(n / len(pool)))]
    return torch.cat(passes)[:n]

