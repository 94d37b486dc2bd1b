"""Scenario and Experience: the continual route's data side.

A :class:`Scenario` is a sequence of experiences over one input space. Each experience
holds train/test :class:`~polytask.tasks.MultiTaskData` labelled for the tasks it covers
(``experience.tasks``), the classes it holds and its task id. The scenario's ``kind``
follows van de Ven & Tolias (2019, "Three scenarios for continual learning"):

- ``class-incremental``: one task (one head) over all classes; no task id at test time;
- ``task-incremental``: one task (one head) per experience; the task id picks the head;
- ``domain-incremental``: the same task(s) in every experience, the input distribution moves.

``task_free`` marks a stream whose boundaries are hidden from the learner: the runner trains
on the concatenated experiences in order, in one pass, and uses the boundaries only to
evaluate (the rows of the accuracy matrix).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Literal, Sequence

import numpy as np
import torch
from torch import Tensor

from polytask.errors import PolytaskError
from polytask.sampling import concat_data
from polytask.tasks import Inputs, InputSpec, MultiTaskData, Task, TaskSuite, _index, _infer_spec, _tensor

Kind = Literal["class-incremental", "task-incremental", "domain-incremental"]
KINDS: tuple[str, ...] = ("class-incremental", "task-incremental", "domain-incremental")
SETTINGS = {"class": "class-incremental", "task": "task-incremental", "domain": "domain-incremental"}


@dataclass
class Experience:
    """One step of the stream: its data, the tasks it labels, the classes it holds, its task id."""

    train: MultiTaskData
    test: MultiTaskData
    tasks: list[str]
    classes: tuple[int, ...] = ()
    task_id: int = 0
    name: str = ""


@dataclass
class Scenario:
    """A sequence of experiences plus the tasks and input spec a model is built for."""

    name: str
    kind: Kind
    tasks: list[Task]
    input_spec: InputSpec
    experiences: list[Experience]
    task_free: bool = False
    description: str = ""
    defaults: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise PolytaskError(f"scenario kind {self.kind!r} is unknown; use one of: {', '.join(KINDS)}")
        if not self.experiences:
            raise PolytaskError(f"scenario {self.name!r} has no experiences; give at least one")
        names = {t.name for t in self.tasks}
        for i, exp in enumerate(self.experiences):
            missing = [t for t in exp.tasks if t not in names]
            if missing:
                raise PolytaskError(f"experience {i} of scenario {self.name!r} labels task {missing[0]!r}, "
                                    f"which is not among the scenario's tasks {sorted(names)}")
            for split in (exp.train, exp.test):
                absent = [t for t in exp.tasks if t not in split.y]
                if absent:
                    raise PolytaskError(f"experience {i} of scenario {self.name!r} has no labels for task {absent[0]!r}")

    def __len__(self) -> int:
        return len(self.experiences)

    def __iter__(self) -> Iterator[Experience]:
        return iter(self.experiences)

    def __getitem__(self, i: int) -> Experience:
        return self.experiences[i]

    def task(self, name: str) -> Task:
        return next(t for t in self.tasks if t.name == name)

    def experience_tasks(self, i: int) -> list[Task]:
        return [self.task(n) for n in self.experiences[i].tasks]

    def union(self, indices: Sequence[int], split: str = "train") -> tuple[list[Task], MultiTaskData]:
        """The tasks and the concatenated ``split`` data of experiences ``indices``."""
        names = list(dict.fromkeys(n for i in indices for n in self.experiences[i].tasks))
        data = concat_data([getattr(self.experiences[i], split) for i in indices], names)
        return [self.task(n) for n in names], data

    def stream(self) -> tuple[MultiTaskData, list[int]]:
        """The task-free stream: all training data in experience order, and the sample offsets
        where each experience ends (used only for evaluation)."""
        _, data = self.union(range(len(self)))
        ends = list(np.cumsum([len(e.train) for e in self.experiences]))
        return data, [int(e) for e in ends]

    # ------------------------------------------------------------ builders
    @classmethod
    def from_tensors(cls, x: Inputs | np.ndarray, y: Tensor | np.ndarray, *,
                     experiences: Sequence[Sequence[int]] | None = None, classes_per_experience: int = 2,
                     setting: str = "class", x_test: Inputs | np.ndarray | None = None,
                     y_test: Tensor | np.ndarray | None = None, test_fraction: float = 0.2, seed: int = 0,
                     name: str = "custom", input_spec: InputSpec | None = None,
                     task_free: bool = False) -> Scenario:
        """Split a labelled dataset by class into experiences.

        ``experiences`` lists the classes of each experience (default: consecutive groups of
        ``classes_per_experience`` sorted classes). ``setting`` is ``class`` (one head over all
        classes), ``task`` (one head per experience, labels renumbered within it) or ``domain``
        (one shared head; the label is the class's position within its experience, as in
        van de Ven & Tolias' Domain-IL split MNIST). Without ``x_test``/``y_test`` a stratified
        ``test_fraction`` of the samples is held out with ``seed``.
        """
        if setting not in SETTINGS:
            raise PolytaskError(f"setting {setting!r} is unknown; use one of: {', '.join(SETTINGS)}")
        xt, yt = _as_inputs(x), _tensor(y).long().reshape(-1)
        if x_test is None:
            train_idx, test_idx = _stratified_split(yt, test_fraction, seed)
            xs, ys = _index(xt, train_idx), yt[train_idx]
            xq, yq = _index(xt, test_idx), yt[test_idx]
        else:
            if y_test is None:
                raise PolytaskError("x_test was given without y_test; pass both or neither")
            xs, ys, xq, yq = xt, yt, _as_inputs(x_test), _tensor(y_test).long().reshape(-1)
        classes = sorted(int(c) for c in torch.unique(ys))
        if experiences is None:
            if classes_per_experience < 1:
                raise PolytaskError(f"classes_per_experience must be at least 1, got {classes_per_experience}")
            experiences = [classes[i:i + classes_per_experience] for i in range(0, len(classes), classes_per_experience)]
        groups = [tuple(int(c) for c in g) for g in experiences]
        unknown = sorted({c for g in groups for c in g} - set(classes))
        if unknown:
            raise PolytaskError(f"experience classes {unknown} do not occur in the labels (classes: {classes})")
        num_classes = max(classes) + 1
        kind = SETTINGS[setting]
        if setting == "class":
            tasks = [Task("class", "multiclass", num_classes=max(num_classes, 2))]
        elif setting == "task":
            tasks = [Task(f"task{i}", "multiclass", num_classes=max(len(g), 2)) for i, g in enumerate(groups)]
        else:
            tasks = [Task("class", "multiclass", num_classes=max(max(len(g) for g in groups), 2))]
        exps = []
        for i, group in enumerate(groups):
            tname = f"task{i}" if setting == "task" else "class"
            parts = []
            for xx, yy in ((xs, ys), (xq, yq)):
                keep = torch.isin(yy, torch.tensor(group))
                idx = keep.nonzero().reshape(-1)
                if len(idx) == 0:
                    raise PolytaskError(f"experience {i} (classes {list(group)}) has no samples in one split")
                label = yy[idx]
                if setting != "class":
                    label = torch.tensor([group.index(int(c)) for c in label], dtype=torch.long)
                parts.append(MultiTaskData(_index(xx, idx), {tname: label}))
            exps.append(Experience(parts[0], parts[1], [tname], group, i, f"classes {'/'.join(map(str, group))}"))
        spec = input_spec or _infer_spec(xt if not isinstance(xt, dict) else xs)
        return cls(name, kind, tasks, spec, exps, task_free=task_free,
                   description=f"{len(groups)} experiences of classes {groups} ({kind})")

    @classmethod
    def from_suite(cls, suite: TaskSuite) -> Scenario:
        """Task-incremental: one experience per task of ``suite``, holding the samples labelled for it
        (each task keeps its own head; the task id picks it at test time)."""
        exps = []
        for i, task in enumerate(suite.tasks):
            parts = [split.subset(split.mask[task.name].nonzero().flatten()).select_tasks([task.name])
                     for split in (suite.train, suite.test)]
            exps.append(Experience(parts[0], parts[1], [task.name], (), i, task.name))
        return cls(suite.name, "task-incremental", list(suite.tasks), suite.input_spec, exps,
                   description=f"one experience per task of suite {suite.name!r} (task-incremental)")

    @classmethod
    def from_datasets(cls, experiences: Sequence[tuple[MultiTaskData, MultiTaskData]], tasks: Sequence[Task],
                      input_spec: InputSpec, *, kind: str = "domain-incremental", name: str = "custom",
                      task_free: bool = False) -> Scenario:
        """One experience per (train, test) pair; each labels the tasks its data carries labels for."""
        exps = []
        for i, (train, test) in enumerate(experiences):
            names = [t.name for t in tasks if t.name in train.y]
            if not names:
                raise PolytaskError(f"experience {i} carries labels for none of the tasks {[t.name for t in tasks]}")
            exps.append(Experience(train, test, names, (), i, f"experience {i}"))
        return cls(name, kind, list(tasks), input_spec, exps, task_free=task_free)  # type: ignore[arg-type]


def _as_inputs(x: Inputs | np.ndarray) -> Inputs:
    xt: Inputs = {k: _tensor(v) for k, v in x.items()} if isinstance(x, dict) else _tensor(x)
    if not isinstance(xt, dict) and xt.is_floating_point():
        xt = xt.float()
    return xt


def _stratified_split(y: Tensor, test_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    if not 0 < test_fraction < 1:
        raise PolytaskError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    g = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in torch.unique(y):
        idx = (y == c).nonzero().reshape(-1)
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_test = max(1, int(round(len(idx) * test_fraction)))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values
