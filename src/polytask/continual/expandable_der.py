"""DER: Dynamically Expandable Representation (Yan, Xie & He, CVPR 2021, "DER: Dynamically
Expandable Representation for Class Incremental Learning"). In the continual-learning
literature "DER" means this method; polytask's ``der++`` (formerly ``der``) is Dark Experience
Replay, a different one.

At step t the super-feature extractor Φ_t is the frozen Φ_{t−1} expanded by a new extractor F_t,

    u = Φ_t(x) = [Φ_{t−1}(x), F_t(x)],    p_{H_t}(y|x) = softmax(H_t(u)),

trained on the new data plus a rehearsal memory with the paper's loss, less its sparsity term,

    L = L_{H_t} + λ_a L_{H_t^a},

L_{H_t} the cross-entropy of the classifier H_t over all classes seen so far, and L_{H_t^a} the
cross-entropy of an auxiliary classifier H_t^a on F_t(x) alone over |C_t| + 1 classes: the
new classes plus one class that stands for every old one (its label 0). Old extractors keep
their weights bit for bit (no gradient, eval mode). After each step t > 0 the "classifier
learning" stage re-trains H_t from scratch on class-balanced data with a tempered softmax,
CE(H_t(u)/δ, y), δ = 5 (the authors' ``decouple`` stage, enabled in their CIFAR-100 B0 config), and
the exemplar memory is rebuilt by herding.

Here an extractor is the run's architecture minus the last linear layer of each task head
(``_growing.Extractor``); H_t is one linear layer per task on the concatenated features.

Checked against the authors' code (Rhyssiyan/DER-ClassIL.pytorch: ``inclearn/models/incmodel.py``,
``inclearn/convnet/network.py``, ``utils.finetune_last_layer``, config
``exps/der_womask/cifar100/b0/10steps``) and PyCIL (G-U-N/PyCIL ``models/der.py``,
``utils/inc_net.py: DERNet``): the new extractor starts as a copy of the previous one; H_t is
freshly initialised (``reuse_oldfc: False``); aux targets are 0 for old classes and
1 + (position among the new classes) for new ones; the aux loss is added from step 1 on.

Deviations: (1) the channel-level masks and the sparsity loss L_S that prune each F_t are not
implemented: the authors' released code is the ``der_womask`` variant without them, and so is
PyCIL's; (2) the classifier-learning stage trains on the rebuilt exemplar memory (balanced by
construction: an equal share per class) rather than class-balanced resampling of all the
step's data, with Adam at the run's learning rate (batch 128, 30 epochs, δ = 5 as the authors)
instead of SGD lr 0.1;
(3) the memory is a fixed total (``memory``, default 500 like the other rehearsal strategies
here; the paper uses 2000 on CIFAR-100); (4) outside class-incremental runs (no new classes)
the auxiliary loss is left out and the rest runs as is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polytask.continual._growing import GrowingNet, GrowingStrategy
from polytask.errors import PolytaskError
from polytask.registry import STRATEGIES
from polytask.tasks import Batch, MultiTaskData, Task
from polytask.trainer import Trainer


def aux_targets(y: Tensor, new_classes: Tensor) -> Tensor:
    """DER's |C_t|+1-way labels: 0 for an old class, 1 + the position of y among ``new_classes`` otherwise."""
    hit = y[:, None] == new_classes[None, :]
    return torch.where(hit.any(1), hit.float().argmax(1) + 1, torch.zeros_like(y))


def train_classifier(model: GrowingNet, data: MultiTaskData, tasks: list[Task], *, epochs: int, lr: float,
                     batch_size: int, temperature: float, generator: torch.Generator) -> None:
    """DER's classifier learning: re-initialise the heads and fit them on ``data`` with CE(logits / δ, y).

    The extractors are frozen here, so their features are computed once.
    """
    model.eval()
    with torch.no_grad():
        feats = {t.name: torch.cat([torch.cat([f[t.name] for f in model.features(b.x)], 1)
                                    for b in data.batches(2048)]) for t in tasks}
    for head in model.heads.values():
        head.reset_parameters()
    opt = torch.optim.Adam(model.heads.parameters(), lr=lr)
    n = len(data)
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(n, generator=generator)
            for start in range(0, n, batch_size):
                idx = order[start:start + batch_size]
                loss = torch.zeros(())
                for t in tasks:
                    m = data.mask[t.name][idx]
                    if bool(m.any()):
                        logits = model.restrict(t.name, model.heads[t.name](feats[t.name][idx][m]))
                        loss = loss + F.cross_entropy(logits / temperature, data.y[t.name][idx][m].long())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    for p in model.heads.parameters():
        p.grad = None


@STRATEGIES.register("expandable-der")
class ExpandableDER(GrowingStrategy):
    """DER: freeze the old extractors, add one per experience, classify the concatenated features,
    auxiliary |C_new|+1 loss, balanced classifier re-training (Yan et al. 2021)."""

    name = "expandable-der"

    def __init__(self, *, memory: int = 500, aux_weight: float = 1.0, balanced_epochs: int = 30,
                 balanced_temperature: float = 5.0, balanced_lr: float | None = None,
                 balanced_batch_size: int = 128) -> None:
        super().__init__(memory)
        if aux_weight < 0 or balanced_epochs < 0 or balanced_temperature <= 0 or balanced_batch_size < 1:
            raise PolytaskError("expandable-der needs aux_weight >= 0, balanced_epochs >= 0, "
                                "balanced_temperature > 0 and balanced_batch_size >= 1")
        self.aux_weight, self.balanced_epochs = float(aux_weight), int(balanced_epochs)
        self.temperature, self.balanced_lr = float(balanced_temperature), balanced_lr
        self.balanced_batch_size = int(balanced_batch_size)
        self.new_classes = torch.zeros(0, dtype=torch.long)

    def begin(self, index: int, tasks: list[Task]) -> None:
        """From experience 1 on: freeze, add an extractor, a fresh classifier H_t and the auxiliary H_t^a."""
        super().begin(index, tasks)
        model = self.model
        assert model is not None and self.scenario is not None
        model.units = self.seen_units(index)
        if index == 0 or len(model.extractors) > index:
            return
        model.grow()
        model.heads = model.new_heads()
        classes = self.scenario[index].classes
        if self.class_incremental and classes and self.aux_weight > 0:
            model.aux = nn.ModuleDict({t.name: nn.Linear(model.extractors[-1].dims[t.name], len(classes) + 1)
                                       for t in tasks})
            self.new_classes = torch.tensor(classes, dtype=torch.long)

    def extra_loss(self, trainer: Trainer, batch: Batch, outputs: dict[str, Tensor]) -> Tensor | None:
        """λ_a · CE of the auxiliary classifier on the newest extractor's features."""
        model = self.model
        if model is None or model.aux is None:
            return None
        feats = model.last_features[-1]
        total = torch.zeros(())
        for name, head in model.aux.items():
            m = batch.mask[name]
            if bool(m.any()):
                total = total + F.cross_entropy(head(feats[name][m]), aux_targets(batch.y[name][m].long(), self.new_classes))
        return self.aux_weight * total

    def after_fit(self, trainer: Trainer) -> None:
        """Drop the auxiliary classifier, rebuild the memory by herding, then re-train the classifier on it."""
        model = self.model
        assert model is not None
        model.aux = None
        self.rebuild_memory()
        if self.current > 0 and self.balanced_epochs > 0:
            tasks = self.train_tasks(self.current)
            data = self.memory.data([t.name for t in tasks])
            assert data is not None
            g = torch.Generator().manual_seed(self.seed * 7919 + self.current)
            train_classifier(model, data, tasks, epochs=self.balanced_epochs,
                             lr=self.balanced_lr or trainer.config.lr, batch_size=self.balanced_batch_size,
                             temperature=self.temperature, generator=g)
            model.train()
