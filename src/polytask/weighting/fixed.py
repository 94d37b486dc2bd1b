"""Fixed task weights, the usual objective of a main task trained with auxiliary tasks:

    L = Σ_t w_t L_t     (w fixed for the whole run; with ``main``: w_main = 1, w_aux = aux_weight)

This is the fixed-weight auxiliary-task loss that auxiliary-learning papers start from and compare
against (e.g. the baseline of Du et al. 2018, "Adapting Auxiliary Losses Using Gradient
Similarity", whose adaptive rule is ``gradsim``). With ``RunConfig(main=...)`` (``polytask train
--main TASK``) the main task's metric alone drives model selection and Δm; this weighting then
takes that task as its ``main`` unless told otherwise.

Checked against: nothing to check beyond the equation (no reference code is involved; LibMTL's
EW is the special case w = 1).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import Tensor

from polytask.errors import PolytaskError
from polytask.registry import WEIGHTINGS
from polytask.weighting.base import Weighting


def fixed_weights(task_names: Sequence[str], weights: Mapping[str, float] | Sequence[float] | None = None,
                  main: str | None = None, aux_weight: float = 1.0) -> Tensor:
    """The [T] weight vector: ``weights`` by task name (or in task order), else 1 for ``main`` and
    ``aux_weight`` for every other task, else all ones."""
    names = list(task_names)
    if weights is not None and main is not None:
        raise PolytaskError("weighting 'fixed' takes weights= or main= (with aux_weight=), not both")
    if isinstance(weights, Mapping):
        unknown = sorted(set(weights) - set(names))
        missing = [n for n in names if n not in weights]
        if unknown or missing:
            what = f"names no task {unknown[0]!r}" if unknown else f"has no weight for task {missing[0]!r}"
            raise PolytaskError(f"weighting 'fixed' weights= {what}; give one weight per task: {', '.join(names)}")
        values = [float(weights[n]) for n in names]
    elif weights is not None:
        values = [float(w) for w in weights]
        if len(values) != len(names):
            raise PolytaskError(f"weighting 'fixed' got {len(values)} weights for {len(names)} tasks "
                                f"({', '.join(names)}); give one per task")
    elif main is not None:
        if main not in names:
            raise PolytaskError(f"weighting 'fixed' main task {main!r} is not a task of this run; "
                                f"pass main= one of: {', '.join(names)}")
        values = [1.0 if n == main else float(aux_weight) for n in names]
    else:
        values = [1.0] * len(names)
    if any(not v >= 0 for v in values) or not any(v > 0 for v in values):
        raise PolytaskError(f"weighting 'fixed' needs non-negative weights, at least one positive; got {values}")
    return torch.tensor(values)


@WEIGHTINGS.register("fixed")
class FixedWeighting(Weighting):
    """Fixed per-task weights, e.g. a main task and down-weighted auxiliary tasks."""

    def __init__(self, task_names: Sequence[str], *, weights: Mapping[str, float] | Sequence[float] | None = None,
                 main: str | None = None, aux_weight: float = 1.0) -> None:
        super().__init__(task_names)
        self.register_buffer("weights", fixed_weights(self.task_names, weights, main, aux_weight))

    def objective(self, losses: Tensor) -> tuple[Tensor, Tensor]:
        w = self.weights.to(losses)
        return (w * losses).sum(), w.detach()
