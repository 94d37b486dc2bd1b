"""FOSTER: Feature Boosting and Compression for class-incremental learning (Wang, Zhou, Ye &
Zhan, ECCV 2022, "FOSTER: Feature Boosting and Compression for Class-Incremental Learning").

Each step t > 0 has two stages, both on the new data plus a rehearsal memory.

**Feature boosting.** The old model (extractor φ_old, classifier W_old) is frozen and a new
extractor φ_new (a copy of φ_old) is added, as in gradient boosting: the new module fits what
the old one gets wrong. With S(x) = W [φ_old(x); φ_new(x)] + b over the classes seen so far,

    L_boost = CE(S(x) / w, y)  +  CE(W_fe φ_new(x), y)  +  λ_okd · KD_T(S(x)_{old}, S_old(x)),

* w_c ∝ (1 − β₁) / (1 − β₁^{n_c}) (effective number of samples, Cui et al. 2019; n_c the class's
  training samples, w normalised to mean 1): the logit adjustment for the old/new imbalance;
* W_fe: a classifier on the new features alone (all seen classes);
* KD_T(p, q) = −Σ softmax(q/T) log softmax(p/T) over the old classes' units, T = 2.

W starts from [W_old, random] (the old rows and columns copied in), φ_old and W_old stay fixed.

**Feature compression.** The two-extractor teacher is distilled into a one-extractor student
(initialised from φ_old and W_old) with the balanced distillation loss

    L_BKD = −Σ_c ŝ_c log softmax(S_student(x)/T)_c,   ŝ = softmax(S_teacher(x)/T) ⊙ w' / Σ(…),

w' the effective-number weights with β₂. The student replaces the teacher, so the model keeps
one extractor whatever the number of steps. Step 0 trains one extractor with plain CE.

Checked against the authors' code (G-U-N/ECCV22-FOSTER ``models/foster.py``, ``utils/inc_net.py:
FOSTERNet``) and PyCIL (G-U-N/PyCIL ``models/foster.py``, ``exps/foster.json``): β₁ = 0.96,
β₂ = 0.97, λ_okd = 1, T = 2, ``oofc: ft`` (no zeroing of the new rows), no weight aligning, KD
without a T² factor, class counts over the step's training set (memory + new data).

Deviations: (1) the accuracy measured after a step is the compressed student's (the model
FOSTER carries on); the authors' ``eval_task`` scores the boosted teacher and only logs the
student's; likewise the exemplar memory is herded on the student's features; (2) Adam at the
run's learning rate for both stages (the authors: SGD lr 0.1 with cosine decay, 170 boosting
and 130 compression epochs); compression runs ``compression_epochs`` epochs (default: the
run's epochs); (3) a fixed total memory (``memory``, default 500) rather than 20 per class;
(4) the extractor is the run's architecture minus its output layer (``_growing.Extractor``).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polytask.continual._growing import GrowingNet, GrowingStrategy, class_counts, effective_number_weights, freeze
from polytask.errors import PolytaskError
from polytask.registry import STRATEGIES
from polytask.tasks import Batch, MultiTaskData, Task
from polytask.trainer import Trainer


def kd_loss(student: Tensor, teacher: Tensor, temperature: float, weights: Tensor | None = None) -> Tensor:
    """−Σ ŝ log softmax(student/T), ŝ = softmax(teacher/T) (⊙ ``weights``, renormalised: FOSTER's BKD), batch mean."""
    soft = torch.softmax(teacher / temperature, dim=1)
    if weights is not None:
        soft = soft * weights
        soft = soft / soft.sum(1, keepdim=True)
    return -(soft * torch.log_softmax(student / temperature, dim=1)).sum() / len(student)


def compress(student: GrowingNet, teacher: nn.Module, data: MultiTaskData, tasks: list[Task],
             weights: dict[str, Tensor], *, temperature: float, epochs: int, lr: float, batch_size: int,
             generator: torch.Generator) -> list[float]:
    """Distil ``teacher`` into ``student`` with balanced KD on ``data``; returns the mean loss of each epoch."""
    teacher.eval()
    student.train()
    opt = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=lr)
    history = []
    with torch.enable_grad():
        for _ in range(epochs):
            total, steps = 0.0, 0
            for batch in data.batches(batch_size, shuffle=True, generator=generator):
                with torch.no_grad():
                    target = teacher(batch.x)
                out = student(batch.x)
                loss = torch.zeros(())
                for t in tasks:
                    m = batch.mask[t.name]
                    if bool(m.any()):
                        loss = loss + kd_loss(out[t.name][m], target[t.name][m], temperature, weights[t.name])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total, steps = total + float(loss.detach()), steps + 1
            history.append(total / max(steps, 1))
    for p in student.parameters():
        p.grad = None
    return history


def agreement(a: nn.Module, b: nn.Module, data: MultiTaskData, tasks: list[Task]) -> float:
    """Fraction of labelled samples on which ``a`` and ``b`` predict the same class."""
    a.eval()
    b.eval()
    same = count = 0
    with torch.no_grad():
        for batch in data.batches(2048):
            oa, ob = a(batch.x), b(batch.x)
            for t in tasks:
                m = batch.mask[t.name]
                same += int((oa[t.name][m].argmax(1) == ob[t.name][m].argmax(1)).sum())
                count += int(m.sum())
    return same / max(count, 1)


@STRATEGIES.register("foster")
class FOSTER(GrowingStrategy):
    """FOSTER: boost with a second extractor on the old model's residuals, then compress back to one by
    balanced distillation (Wang et al. 2022)."""

    name = "foster"

    def __init__(self, *, memory: int = 500, beta1: float = 0.96, beta2: float = 0.97, lambda_okd: float = 1.0,
                 temperature: float = 2.0, compression_epochs: int | None = None) -> None:
        super().__init__(memory)
        if not (0 < beta1 < 1 and 0 < beta2 < 1) or lambda_okd < 0 or temperature <= 0:
            raise PolytaskError("foster needs 0 < beta1, beta2 < 1, lambda_okd >= 0 and temperature > 0")
        if compression_epochs is not None and compression_epochs < 1:
            raise PolytaskError(f"foster compression_epochs must be at least 1, got {compression_epochs}")
        self.beta1, self.beta2, self.lambda_okd = float(beta1), float(beta2), float(lambda_okd)
        self.temperature, self.compression_epochs = float(temperature), compression_epochs
        self.old_heads: nn.ModuleDict | None = None
        self.old_units: dict[str, list[int]] = {}
        self.compressions: list[dict[str, Any]] = []

    def begin(self, index: int, tasks: list[Task]) -> None:
        """Boosting set-up: freeze φ_old and W_old, add φ_new, W = [W_old, new columns], W_fe, the weights w(β₁)."""
        super().begin(index, tasks)
        model = self.model
        assert model is not None
        self.old_units = self.seen_units(index - 1) if index > 0 else {}
        model.units = self.seen_units(index)
        if index == 0:
            return
        self.old_heads = freeze(copy.deepcopy(model.heads))  # type: ignore[assignment]
        model.grow()
        heads = model.new_heads()
        with torch.no_grad():
            for name, head in heads.items():
                old = self.old_heads[name]
                head.weight[:, :old.in_features] = old.weight
                head.bias.copy_(old.bias)
        model.heads = heads
        model.aux = nn.ModuleDict({t.name: nn.Linear(model.extractors[-1].dims[t.name], t.out_dim)
                                   for t in self.all_tasks})
        _, data = self.train_data(index)
        model.divisor = {t.name: effective_number_weights(class_counts(data, t), self.beta1) for t in self.train_tasks(index)}

    def extra_loss(self, trainer: Trainer, batch: Batch, outputs: dict[str, Tensor]) -> Tensor | None:
        """CE of W_fe on the new features plus λ_okd · KD of the old classes' logits towards the frozen old model."""
        model = self.model
        if model is None or model.aux is None or self.old_heads is None:
            return None
        old_feats, new_feats = model.last_features[0], model.last_features[-1]
        total = torch.zeros(())
        for t in self.train_tasks(self.current):
            m = batch.mask[t.name]
            if not bool(m.any()):
                continue
            y = batch.y[t.name][m].long()
            fe = model.restrict(t.name, model.aux[t.name](new_feats[t.name][m]))
            total = total + F.cross_entropy(fe, y)
            with torch.no_grad():
                old = self.old_heads[t.name](old_feats[t.name][m])
            cols = self.old_units.get(t.name) or list(range(old.shape[1]))
            total = total + self.lambda_okd * kd_loss(model.last_logits[t.name][m][:, cols], old[:, cols],
                                                      self.temperature)
        return total

    def after_fit(self, trainer: Trainer) -> None:
        """Compress the boosted two-extractor model into one extractor, then rebuild the memory by herding."""
        model = self.model
        assert model is not None and self.scenario is not None
        model.aux, model.divisor = None, {}
        if self.current > 0:
            assert self.old_heads is not None
            tasks, data = self.train_data(self.current)
            student = GrowingNet(copy.deepcopy(model.extractors[0]).requires_grad_(True), self.all_tasks)
            student.units = dict(model.units)
            with torch.no_grad():
                for name, head in student.heads.items():
                    head.load_state_dict(self.old_heads[name].state_dict())
            weights = {t.name: effective_number_weights(class_counts(data, t), self.beta2) for t in tasks}
            g = torch.Generator().manual_seed(self.seed * 7919 + self.current)
            history = compress(student, model, data, tasks, weights, temperature=self.temperature,
                               epochs=self.compression_epochs or trainer.config.epochs, lr=trainer.config.lr,
                               batch_size=trainer.config.batch_size, generator=g)
            self.compressions.append({"experience": self.current, "losses": history,
                                      "agreement": agreement(student, model, data, tasks)})
            model.extractors, model.heads, model.frozen = student.extractors, student.heads, 0
            self.old_heads = None
        self.rebuild_memory()

    def state_meta(self) -> dict[str, Any]:
        return {**super().state_meta(), "compressions": self.compressions}

    def load_state(self, tensors: dict[str, Tensor], meta: dict[str, Any], model: nn.Module) -> None:
        super().load_state(tensors, meta, model)
        self.compressions = list(meta["compressions"])
