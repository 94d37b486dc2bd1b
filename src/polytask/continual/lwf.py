"""Learning without Forgetting (Li & Hoiem, TPAMI 2017 / ECCV 2016).

Before training on a new experience the current network is frozen as the "old" model. For
each new batch its outputs ŷ_o on the old tasks are the targets of a distillation term
(Eq. 2 of the paper, knowledge distillation with temperature T = 2):

    L = L_new(y_n, ŷ_n) + λ_o · L_old(y_o, ŷ_o),
    L_old = −Σ_i y'_o^{(i)} log ŷ'_o^{(i)},   y'_o = softmax(y_o / T),  ŷ'_o = softmax(ŷ_o / T).

Old tasks are the tasks of finished experiences. In a class-incremental scenario (one head
over all classes) the distillation covers only the output units of the classes seen so far
(the "active units" of van de Ven & Tolias 2019). Binary and multi-label heads distil the
tempered sigmoids (binary cross-entropy), regression heads the outputs themselves (MSE).

The old model is frozen for a whole experience, so its outputs on the experience's training
data are fixed: when each of its samples' outputs depends on that sample alone
(:func:`~polytask.continual.base.samplewise`), they are computed once per experience (as the
paper records ŷ_o before training) and travel with the data, every batch carrying its rows'
targets; otherwise the frozen model runs on every batch.

Checked against: aimagelab/mammoth models/lwf.py and ContinualAI/avalanche
avalanche/training/plugins/lwf.py. Same distillation: the tempered (T = 2) softmax of the old
network's outputs as soft targets for the current one's, on the output units of the classes seen
before, added to the new-task loss with weight alpha (Avalanche's default 1, ours; mammoth 0.5).
Avalanche, like us, runs the frozen copy on every batch; its KL divergence has the same gradient
as our cross-entropy.
Deviations: Avalanche takes the softmaxes over all output units and then keeps the old classes'
columns; mammoth and we normalise over the old classes' units only. Mammoth stores the old
outputs once per task and first warms up the new head alone (the paper's warm-up step); we skip
the warm-up.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from polytask.continual.base import Strategy, samplewise
from polytask.errors import PolytaskError
from polytask.registry import STRATEGIES
from polytask.tasks import Batch, MultiTaskData, Task
from polytask.trainer import Trainer

TARGETS = "lwf-old/"  # label key prefix of the stored targets (the old model's outputs per old task)


@STRATEGIES.register("lwf")
class LwF(Strategy):
    """Learning without Forgetting: distil the frozen previous model's outputs, T = 2 (Li & Hoiem 2017)."""

    needs_boundaries = True

    def __init__(self, *, alpha: float = 1.0, temperature: float = 2.0) -> None:
        super().__init__()
        if alpha < 0 or temperature <= 0:
            raise PolytaskError(f"lwf needs alpha >= 0 and temperature > 0, got {alpha}, {temperature}")
        self.alpha, self.temperature = float(alpha), float(temperature)
        self.old: nn.Module | None = None
        self.units: dict[str, list[int]] = {}
        self._distilled: tuple[int, list[tuple[Any, Tensor | None]]] = (-1, [])

    def targets(self, x: Any) -> dict[str, Tensor]:
        """The frozen previous model's outputs (the distillation targets)."""
        assert self.old is not None
        with torch.no_grad():
            return self.old(x)

    def distilled(self) -> list[tuple[Any, Tensor | None]]:
        """The old tasks with the columns of their active units (None: all), kept until an experience ends."""
        if self._distilled[0] != len(self.finished):
            self._distilled = (len(self.finished), [(t, torch.tensor(self.units[t.name]) if self.units.get(t.name)
                                                     else None) for t in self.seen_tasks()])
        return self._distilled[1]

    def train_data(self, index: int) -> tuple[list[Task], MultiTaskData]:
        """The experience's data, with the old model's outputs on it (active units only) as extra labels
        ``lwf-old/<task>`` when the old model is sample-wise: one forward per experience, not per batch."""
        tasks, data = super().train_data(index)
        if self.old is None or not samplewise(self.old):
            return tasks, data
        parts = [self._old_outputs(b.x) for b in data.batches(2048)]
        stored = {f"{TARGETS}{t.name}": torch.cat([p[t.name] for p in parts]) for t, _ in self.distilled()}
        return tasks, MultiTaskData(data.x, {**data.y, **stored}, dict(data.mask))

    def _old_outputs(self, x: Any) -> dict[str, Tensor]:
        """The targets of each old task on inputs ``x``: the frozen model's outputs on its active units."""
        old = self.targets(x)
        return {t.name: old[t.name] if cols is None else old[t.name].index_select(1, cols) for t, cols in self.distilled()}

    def extra_loss(self, trainer: Trainer, batch: Batch, outputs: dict[str, Tensor]) -> Tensor | None:
        if self.old is None:
            return None
        keys = [f"{TARGETS}{t.name}" for t, _ in self.distilled()]
        old = ({t.name: batch.y[k] for (t, _), k in zip(self.distilled(), keys)} if all(k in batch.y for k in keys)
               else self._old_outputs(batch.x))
        terms = []
        for t, cols in self.distilled():
            new_t = outputs[t.name] if cols is None else outputs[t.name].index_select(1, cols)
            terms.append(t.kind_impl.distillation(new_t, old[t.name], self.temperature))
        return self.alpha * sum(terms[1:], terms[0]) if terms else None

    def after_fit(self, trainer: Trainer) -> None:
        assert self.scenario is not None
        exp = self.scenario[self.current]
        if self.scenario.kind == "class-incremental" and exp.classes:
            for name in exp.tasks:
                self.units[name] = sorted(set(self.units.get(name, [])) | set(exp.classes))
        self.old = self._freeze(trainer.model)

    @staticmethod
    def _freeze(model: nn.Module) -> nn.Module:
        old = copy.deepcopy(model)
        old.eval()
        for p in old.parameters():
            p.requires_grad_(False)
        return old

    def state_tensors(self) -> dict[str, Tensor]:
        return {f"old/{k}": v for k, v in self.old.state_dict().items()} if self.old is not None else {}

    def state_meta(self) -> dict[str, Any]:
        return {**super().state_meta(), "units": self.units, "has_old": self.old is not None}

    def load_state(self, tensors: dict[str, Tensor], meta: dict[str, Any], model: nn.Module) -> None:
        super().load_state(tensors, meta, model)
        self.units = {k: list(v) for k, v in meta["units"].items()}
        if meta["has_old"]:
            self.old = self._freeze(model)
            self.old.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("old/")})
