"""Evaluation helpers: masked losses, per-task metric tables and the multi-task gain Δm."""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import Tensor

from polytask.errors import PolytaskError
from polytask.tasks import Batch, Task

Results = dict[str, dict[str, float]]


def masked_task_losses(tasks: Sequence[Task], outputs: Mapping[str, Tensor], batch: Batch) -> Tensor:
    """[T] vector of per-task mean losses over the samples that carry that task's label."""
    losses = []
    for task in tasks:
        per_sample = task.loss(outputs[task.name], batch.y[task.name])
        if task.name in batch.full:
            losses.append(per_sample.mean())
            continue
        m = batch.mask[task.name]  # boolean: the product promotes it, the count stays exact
        losses.append((per_sample * m).sum() / m.sum().clamp(min=1))
    return torch.stack(losses)


def delta_m(results: Results, baselines: Results, tasks: Sequence[Task]) -> float:
    """Multi-task gain over single-task baselines, in percent (Maninis et al. 2019; LibMTL):

        Δm = 100/T · Σ_t 1/N_t Σ_n (-1)^{l_{t,n}} (M_{t,n} - B_{t,n}) / B_{t,n}

    with l_{t,n} = 1 where lower is better for metric n of task t.
    """
    total = 0.0
    for task in tasks:
        if task.name not in baselines:
            raise PolytaskError(f"the baselines have no task {task.name!r}; recompute them for this suite")
        gains = []
        for metric in task.metrics:
            b, m = baselines[task.name][metric], results[task.name][metric]
            if b == 0:
                continue
            sign = 1.0 if Task.higher_is_better(metric) else -1.0
            gains.append(sign * (m - b) / abs(b))
        total += sum(gains) / max(len(gains), 1)
    return 100.0 * total / len(tasks)
