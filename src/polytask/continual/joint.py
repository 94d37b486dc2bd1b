"""Joint training: the upper bound.

Cumulative variant (the "Joint" / "offline" rows of van de Ven & Tolias 2019 and GEM's
"multi-task" upper bound computed at every step): at experience i the model continues from
its weights and trains on the union of experiences 0..i, so every row of the accuracy matrix
is the accuracy of a model that has seen all data so far at once; the last row is the usual
all-at-once upper bound. The loss is Σ_t L_t over the union's tasks (equal weights).
"""

from __future__ import annotations

from polytask.continual.base import Strategy
from polytask.registry import STRATEGIES
from polytask.tasks import MultiTaskData, Task


@STRATEGIES.register("joint")
class Joint(Strategy):
    """Train on the union of all experiences seen so far (the upper bound)."""

    needs_boundaries = True

    def train_data(self, index: int) -> tuple[list[Task], MultiTaskData]:
        assert self.scenario is not None
        return self.scenario.union(range(index + 1))
