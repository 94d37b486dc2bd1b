"""Shared plumbing of the growing-network learners (``expandable-der``, ``foster``).

* :class:`Extractor`: the run's architecture with the last linear layer of every task head
  removed, so ``forward(x) -> {task: feature}``; "feature extractor" in both papers.
* :class:`GrowingNet`: a list of extractors whose features are concatenated per task and read
  by one linear classifier per task, ``y_t = W_t [φ_1(x)_t; ...; φ_k(x)_t] + b_t``. The first
  ``frozen`` extractors take no gradient and stay in eval mode. In a class-incremental run the
  logits of classes not seen yet are held at ``UNSEEN`` (both papers' classifiers have no unit
  for them). ``divisor`` (FOSTER's logit adjustment) divides the training-mode logits.
* :class:`GrowingStrategy`: what both strategies share: the net, the memory (trained on beside
  each experience's data, rebuilt after it, checkpointed), the seen-class units.
* :class:`HerdingMemory`: a fixed-size exemplar memory split evenly over the (experience,
  task, class) groups seen so far, each group's exemplars chosen by herding (Rebuffi et al.,
  CVPR 2017, iCaRL, Algorithm 4: greedily pick the sample that brings the running mean of the
  L2-normalised features closest to the class mean), so shrinking a group keeps its best ones.
  DER and FOSTER both use it (PyCIL's ``build_rehearsal_memory``).
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polytask.continual.base import Strategy
from polytask.errors import PolytaskError
from polytask.sampling import concat_data
from polytask.tasks import Inputs, MultiTaskData, Task

#: logit of a class no experience has shown yet (finite, so losses on future test data stay finite)
UNSEEN = -1e4


class Extractor(nn.Module):
    """The run's architecture minus the output layer of each task head: ``forward(x) -> {task: feature}``."""

    def __init__(self, net: nn.Module, strategy: str) -> None:
        super().__init__()
        heads = getattr(net, "heads", None)
        if not isinstance(heads, nn.ModuleDict):
            raise PolytaskError(f"{strategy} needs an architecture with one head per task in .heads (e.g. shared-bottom)")
        self.dims: dict[str, int] = {}
        for name, head in heads.items():
            last = head[-1] if isinstance(head, nn.Sequential) and len(head) else head
            if not isinstance(last, nn.Linear):
                raise PolytaskError(f"{strategy} needs task heads that end in a linear layer; {name!r} ends in "
                                    f"{type(last).__name__}")
            self.dims[name] = last.in_features
            if isinstance(head, nn.Sequential):
                head[-1] = nn.Identity()
            else:
                heads[name] = nn.Identity()
        self.net = net

    def forward(self, x: Inputs) -> dict[str, Tensor]:
        return self.net(x)


def freeze(module: nn.Module) -> nn.Module:
    module.requires_grad_(False)
    module.eval()
    return module


class GrowingNet(nn.Module):
    """Extractors φ_1..φ_k, concatenated features, one linear classifier per task (plus optional ``aux`` heads)."""

    def __init__(self, extractor: Extractor, tasks: Sequence[Task]) -> None:
        super().__init__()
        self.tasks = list(tasks)
        self.extractors = nn.ModuleList([extractor])
        self.frozen = 0
        self.heads = self.new_heads()
        self.aux: nn.ModuleDict | None = None
        self.units: dict[str, list[int]] = {}
        self.divisor: dict[str, Tensor] = {}
        self.last_features: list[dict[str, Tensor]] = []
        self.last_logits: dict[str, Tensor] = {}

    def dim(self, task: str, extractors: Sequence[Extractor] | None = None) -> int:
        return sum(e.dims[task] for e in (extractors if extractors is not None else self.extractors))

    def new_heads(self, extractors: Sequence[Extractor] | None = None) -> nn.ModuleDict:
        return nn.ModuleDict({t.name: nn.Linear(self.dim(t.name, extractors), t.out_dim) for t in self.tasks})

    def grow(self) -> None:
        """Freeze every extractor and append a trainable copy of the newest one (both papers' initialisation)."""
        new = copy.deepcopy(self.extractors[-1]).requires_grad_(True)
        for e in self.extractors:
            freeze(e)
        self.extractors.append(new)
        self.frozen = len(self.extractors) - 1

    def resize(self, count: int, frozen: int) -> None:
        """Give the net ``count`` extractors and matching heads (to load a checkpoint of that shape)."""
        while len(self.extractors) < count:
            self.extractors.append(copy.deepcopy(self.extractors[-1]))
        del self.extractors[count:]
        for i, e in enumerate(self.extractors):
            e.requires_grad_(i >= frozen)
        self.frozen = frozen
        self.heads = self.new_heads()
        self.aux = None

    def train(self, mode: bool = True) -> GrowingNet:
        super().train(mode)
        for e in self.extractors[:self.frozen]:
            e.eval()  # frozen: no dropout, no statistics updates
        return self

    def restrict(self, task: str, logits: Tensor) -> Tensor:
        """Hold the logits of classes not seen yet at ``UNSEEN`` (no-op when every class counts)."""
        cols = self.units.get(task)
        if not cols:
            return logits
        keep = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
        keep[cols] = True
        return logits.masked_fill(~keep, UNSEEN)

    def features(self, x: Inputs) -> list[dict[str, Tensor]]:
        return [e(x) for e in self.extractors]

    def forward(self, x: Inputs) -> dict[str, Tensor]:
        feats = self.features(x)
        out = {name: self.restrict(name, head(torch.cat([f[name] for f in feats], 1)))
               for name, head in self.heads.items()}
        self.last_features, self.last_logits = feats, out
        if self.training and self.divisor:
            return {k: v / self.divisor[k] if k in self.divisor else v for k, v in out.items()}
        return out


def check_multiclass(tasks: Sequence[Task], strategy: str) -> None:
    bad = [t.name for t in tasks if t.kind != "multiclass"]
    if bad:
        raise PolytaskError(f"{strategy} keeps class exemplars and class logits, so every task must be multiclass; "
                            f"{bad[0]!r} is not")


def herding(features: Tensor, m: int) -> Tensor:
    """Indices of ``m`` samples chosen by herding on L2-normalised ``features`` [n, d], in order of choice."""
    f = F.normalize(features.double(), dim=1)
    mu = f.mean(0)
    chosen: list[int] = []
    running = torch.zeros_like(mu)
    free = torch.ones(len(f), dtype=torch.bool)
    for k in range(1, min(m, len(f)) + 1):
        dist = ((mu - (running + f) / k) ** 2).sum(1).masked_fill(~free, float("inf"))
        i = int(dist.argmin())
        chosen.append(i)
        running += f[i]
        free[i] = False
    return torch.tensor(chosen, dtype=torch.long)


def _flat(x: Inputs, prefix: str) -> dict[str, Tensor]:
    return {f"{prefix}x/{k}": v for k, v in x.items()} if isinstance(x, dict) else {f"{prefix}x": x}


def _unflat(tensors: dict[str, Tensor], prefix: str) -> Inputs:
    if f"{prefix}x" in tensors:
        return tensors[f"{prefix}x"]
    start = f"{prefix}x/"
    return {k[len(start):]: v for k, v in tensors.items() if k.startswith(start)}


class HerdingMemory:
    """``size`` exemplars split evenly over (experience, task, class) groups, each ordered by herding."""

    def __init__(self, size: int) -> None:
        self.size = int(size)
        self.groups: list[tuple[int, str, int]] = []
        self.sets: list[MultiTaskData] = []

    def __len__(self) -> int:
        return sum(len(s) for s in self.sets)

    def per_group(self, groups: int) -> int:
        return max(1, self.size // max(groups, 1))

    def update(self, index: int, data: MultiTaskData, tasks: Sequence[str],
               feature: Callable[[Inputs, str], Tensor], batch_size: int = 2048) -> None:
        """Add experience ``index``'s classes (herding on ``feature(x, task)``) and shrink the older groups."""
        new: list[tuple[tuple[int, str, int], Tensor]] = []
        for t in tasks:
            labelled = data.mask[t].nonzero().reshape(-1)
            for c in sorted(int(v) for v in data.y[t][labelled].unique()):
                new.append(((index, t, c), labelled[data.y[t][labelled] == c]))
        m = self.per_group(len(self.groups) + len(new))
        self.sets = [s.subset(torch.arange(min(m, len(s)))) for s in self.sets]
        with torch.no_grad():
            for key, idx in new:
                part = data.subset(idx).select_tasks([key[1]])
                feats = torch.cat([feature(b.x, key[1]) for b in part.batches(batch_size)])
                self.groups.append(key)
                self.sets.append(part.subset(herding(feats, m)))

    def data(self, tasks: Sequence[str]) -> MultiTaskData | None:
        """The exemplars as one dataset labelled for those of ``tasks`` they hold (None while empty)."""
        held = [t for t in tasks if any(t in s.y for s in self.sets)]
        return concat_data(self.sets, held) if held else None

    def state_tensors(self, prefix: str) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for i, ((_, t, _), s) in enumerate(zip(self.groups, self.sets)):
            out.update(_flat(s.x, f"{prefix}{i}/"))
            out[f"{prefix}{i}/y"] = s.y[t]
        return out

    def state_meta(self) -> dict[str, Any]:
        return {"size": self.size, "groups": [list(g) for g in self.groups]}

    def load(self, tensors: dict[str, Tensor], meta: dict[str, Any], prefix: str) -> None:
        self.groups = [(int(e), str(t), int(c)) for e, t, c in meta["groups"]]
        self.sets = [MultiTaskData(_unflat(tensors, f"{prefix}{i}/"), {t: tensors[f"{prefix}{i}/y"]})
                     for i, (_, t, _) in enumerate(self.groups)]


def class_counts(data: MultiTaskData, task: Task) -> Tensor:
    """Training samples per output unit of ``task`` (its labelled rows only)."""
    y = data.y[task.name][data.mask[task.name]].long()
    return torch.bincount(y, minlength=task.out_dim).double()


def effective_number_weights(counts: Tensor, beta: float) -> Tensor:
    """Cui et al. (CVPR 2019) class weights w_c ∝ (1 − β) / (1 − β^{n_c}), normalised to mean 1 over the
    classes present; classes with no sample get weight 1."""
    present = counts > 0
    w = torch.ones_like(counts)
    raw = (1 - beta) / (1 - beta ** counts[present])
    w[present] = raw / raw.sum() * int(present.sum())
    return w.float()


class GrowingStrategy(Strategy):
    """A :class:`GrowingNet` trained on each experience's data plus a :class:`HerdingMemory`."""

    needs_boundaries = True
    name = "growing"

    def __init__(self, memory: int) -> None:
        super().__init__()
        if memory < 1:
            raise PolytaskError(f"{self.name} needs memory >= 1, got {memory}")
        self.memory = HerdingMemory(memory)
        self.model: GrowingNet | None = None

    def build_model(self, default: Callable[[], nn.Module]) -> nn.Module:
        assert self.scenario is not None
        check_multiclass(self.scenario.tasks, self.name)
        self.model = GrowingNet(Extractor(default(), self.name), self.scenario.tasks)
        return self.model

    @property
    def class_incremental(self) -> bool:
        assert self.scenario is not None
        return self.scenario.kind == "class-incremental"

    def seen_units(self, index: int) -> dict[str, list[int]]:
        """Output units of the classes experiences 0..index hold (class-incremental only; else every unit)."""
        assert self.scenario is not None
        if not self.class_incremental:
            return {}
        units: dict[str, set[int]] = {}
        for exp in self.scenario.experiences[:index + 1]:
            for name in exp.tasks:
                units.setdefault(name, set()).update(exp.classes)
        return {k: sorted(v) for k, v in units.items()}

    def train_tasks(self, index: int) -> list[Task]:
        """The tasks of experiences 0..index, in scenario order."""
        assert self.scenario is not None
        names = {n for i in range(index + 1) for n in self.scenario[i].tasks}
        return [t for t in self.scenario.tasks if t.name in names]

    def train_data(self, index: int) -> tuple[list[Task], MultiTaskData]:
        """The experience's data plus the exemplar memory."""
        assert self.scenario is not None
        tasks = self.train_tasks(index)
        names = [t.name for t in tasks]
        mem = self.memory.data(names)
        data = self.scenario[index].train
        return tasks, concat_data([data, mem] if mem is not None else [data], names)

    def feature(self, x: Inputs, task: str) -> Tensor:
        """The concatenated features of every extractor (what herding picks exemplars on)."""
        assert self.model is not None
        return torch.cat([f[task] for f in self.model.features(x)], 1)

    def rebuild_memory(self) -> None:
        """Herd the finished experience's exemplars into the memory (shrinking the older groups)."""
        assert self.model is not None and self.scenario is not None
        exp = self.scenario[self.current]
        self.model.eval()
        self.memory.update(self.current, exp.train, exp.tasks, self.feature)
        self.model.train()

    def state_tensors(self) -> dict[str, Tensor]:
        return self.memory.state_tensors("memory/")

    def state_meta(self) -> dict[str, Any]:
        assert self.model is not None
        return {**super().state_meta(), "memory": self.memory.state_meta(), "extractors": len(self.model.extractors),
                "frozen": self.model.frozen}

    def load_state(self, tensors: dict[str, Tensor], meta: dict[str, Any], model: nn.Module) -> None:
        super().load_state(tensors, meta, model)
        assert self.model is not None
        self.memory.load(tensors, meta["memory"], "memory/")
        self.model.resize(int(meta["extractors"]), int(meta["frozen"]))
