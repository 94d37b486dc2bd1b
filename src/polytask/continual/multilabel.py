"""Multi-label class-incremental scenarios (MLCIL) and their per-step scores.

The protocol of MULTI-LANE's code (github.com/tdemin16/multi-lane, engine.py) and of the MLCIL
benchmarks it follows: the C labels arrive in groups C_0, C_1, ...; a sample may carry several.

* training set of step t: the training samples with at least one label in C_t, labelled for C_t
  only (every other label is absent, i.e. negative: y'_c = y_c · [c ∈ C_t]);
* test set of step t: the test samples with at least one label among the seen classes
  C_≤t = C_0 ∪ ... ∪ C_t, labelled for C_≤t only.

Scores (:func:`polytask.continual.metrics.multilabel_scores`): after step i, mAP, CF1 and OF1 over
C_≤i on the test set of step i (the paper's per-step numbers); the accuracy matrix holds
R[i, j] = mAP over C_j on the test set of step j after training step i, so ACC and forgetting
are those of each class group's mAP.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from polytask.continual.metrics import multilabel_scores
from polytask.continual.scenario import Experience, Scenario
from polytask.errors import PolytaskError
from polytask.registry import SCENARIOS, SUITES
from polytask.sampling import concat_data
from polytask.tasks import Inputs, InputSpec, MultiTaskData, Task, _index


def multilabel_experiences(x_train: Inputs, y_train: Tensor, x_test: Inputs, y_test: Tensor, task: str,
                           groups: Sequence[Sequence[int]]) -> list[Experience]:
    """The MLCIL experiences of multi-hot labels ``y`` [N, C] split into class ``groups``."""
    num = y_train.shape[1]
    flat = [int(c) for g in groups for c in g]
    if not groups or any(not g for g in groups) or len(set(flat)) != len(flat) or not all(0 <= c < num for c in flat):
        raise PolytaskError(f"class groups {[list(g) for g in groups]} must be non-empty, disjoint and "
                            f"within 0..{num - 1}")
    exps, seen = [], torch.zeros(num, dtype=torch.bool)
    for t, group in enumerate(groups):
        now = torch.zeros(num, dtype=torch.bool)
        now[list(group)] = True
        seen |= now
        parts = []
        for x, y, keep in ((x_train, y_train, now), (x_test, y_test, seen.clone())):
            rows = (y[:, keep] > 0).any(1).nonzero().reshape(-1)
            if len(rows) == 0:
                raise PolytaskError(f"step {t} (classes {list(group)}) has no samples in one split; "
                                    "merge it with another")
            parts.append(MultiTaskData(_index(x, rows), {task: y[rows].float() * keep.float()}))
        exps.append(Experience(parts[0], parts[1], [task], tuple(int(c) for c in group), t,
                               f"classes {'/'.join(map(str, group))}"))
    return exps


def is_multilabel_ci(scenario: Scenario) -> bool:
    """A class-incremental scenario over one multi-label task whose experiences name their classes."""
    return (scenario.kind == "class-incremental" and len(scenario.tasks) == 1
            and scenario.tasks[0].kind == "multilabel" and all(e.classes for e in scenario))


@torch.no_grad()
def predict(model: nn.Module, task: str, data: MultiTaskData, batch_size: int = 2048) -> Tensor:
    """The model's ``task`` logits over ``data``, in eval mode."""
    was = model.training
    model.eval()
    out = torch.cat([model(batch.x)[task] for batch in data.batches(batch_size)])
    model.train(was)
    return out


def _scores(model: nn.Module, scenario: Scenario, j: int, classes: Sequence[int], batch_size: int) -> dict[str, float]:
    task = scenario.tasks[0].name
    test = scenario[j].test
    cols = sorted(classes)
    return multilabel_scores(predict(model, task, test, batch_size)[:, cols], test.y[task][:, cols])


def group_map(model: nn.Module, scenario: Scenario, j: int, batch_size: int = 2048) -> float:
    """R[·, j]: mAP over class group C_j on step j's test set."""
    return _scores(model, scenario, j, scenario[j].classes, batch_size)["mAP"]


def step_scores(model: nn.Module, scenario: Scenario, i: int, batch_size: int = 2048) -> dict[str, float]:
    """mAP, CF1, OF1 over the classes seen up to step i, on step i's test set."""
    seen = [c for e in scenario.experiences[:i + 1] for c in e.classes]
    return _scores(model, scenario, i, seen, batch_size)


def summarize_steps(steps: Sequence[dict[str, float]]) -> dict[str, Any]:
    """Per-step lists, the last step's values and the average over steps (the papers' "average mAP")."""
    keys = ("mAP", "CF1", "OF1")
    out: dict[str, Any] = {k: [s[k] for s in steps] for k in keys}
    out.update({f"final_{k}": steps[-1][k] for k in keys} if steps else {})
    out["average_mAP"] = float(sum(out["mAP"]) / len(steps)) if steps else 0.0
    out["threshold"] = 0.8
    return out


#: genre steps of the movies scenario: 3, 2, 2 genres (a step of one genre would train on positives only)
MOVIE_STEPS = (("Action", "Animation", "Comedy"), ("Drama", "Documentary"), ("Romance", "Short"))


def _groups(names: Sequence[str], steps: Sequence[Sequence[str]] | None, per: int | None) -> list[list[int]]:
    """Class groups by name (``steps``), or consecutive groups of ``per`` classes."""
    if per is not None:
        if per < 1:
            raise PolytaskError(f"classes_per_experience must be at least 1, got {per}")
        return [list(range(i, min(i + per, len(names)))) for i in range(0, len(names), per)]
    unknown = [g for step in steps or () for g in step if g not in names]
    if unknown or not steps:
        raise PolytaskError(f"steps must list genre names from {', '.join(names)}; got {unknown or steps}")
    return [[list(names).index(g) for g in step] for step in steps]


@SCENARIOS.register("movies-multilabel-ci")
def movies_multilabel_ci(*, seed: int = 0, subset: int | None = 6000,
                         steps: Sequence[Sequence[str]] = MOVIE_STEPS, classes_per_experience: int | None = None,
                         features: str | None = "minilm", metadata: bool = True, seq_len: int = 24) -> Scenario:
    """IMDB film genres (7 labels) class-incremental in 3 steps, on frozen MiniLM title features and metadata."""
    from polytask.data._sources import assemble, movies as read_movies, seeded_splits, shrink, tokenize
    from polytask.data.movies import GENRES

    if features is None and not metadata:
        raise PolytaskError("movies-multilabel-ci needs inputs: pass features='minilm' (title features), "
                            "metadata=true (the movies suite's 10 columns) or both")
    task = Task("genre", "multilabel", num_classes=len(GENRES))
    meta = SUITES.create("movies", seed=seed, subset=subset, tasks=["genre"])  # its split is reused below
    train, test = concat_data([meta.train, meta.val], ["genre"]), meta.test
    if features is not None:
        df = read_movies("scenario 'movies-multilabel-ci'")
        idx = shrink(seeded_splits(len(df), 0.15, 0.15, seed), subset, seed)  # the movies suite's split
        used = torch.cat(idx).sort().values
        where = torch.full((len(df),), -1, dtype=torch.long)
        where[used] = torch.arange(len(used))
        titles = [str(df["title"].iloc[i]) for i in used.tolist()]
        x = tokenize(titles, seq_len, f"movies-titles-{seed}-{subset}", "scenario 'movies-multilabel-ci'")
        labels = torch.tensor(df[list(GENRES)].to_numpy()[used.numpy()], dtype=torch.float32)
        text = assemble("movies-titles", [task], InputSpec("tokens", seq_len=seq_len), x, {"genre": labels},
                        [where[i] for i in idx], "IMDB film titles", features=features)
        xs, xq = concat_data([text.train, text.val], ["genre"]).x, text.test.x
        if metadata:
            xs, xq = torch.cat([xs, train.x], 1), torch.cat([xq, test.x], 1)  # type: ignore[list-item]
        train, test = MultiTaskData(xs, train.y), MultiTaskData(xq, test.y)
    spec = InputSpec("features" if features else "dense", dim=int(train.x.shape[1]))  # type: ignore[union-attr]
    groups = _groups(GENRES, steps, classes_per_experience)
    exps = multilabel_experiences(train.x, train.y["genre"], test.x, test.y["genre"], "genre", groups)
    for exp in exps:
        exp.name = "/".join(GENRES[c] for c in exp.classes)
    inputs = " + ".join(([f"frozen {features} title features"] if features else []) +
                        (["10 metadata columns"] if metadata else []))
    return Scenario("movies-multilabel-ci", "class-incremental", [task], spec, exps,
                    description=f"IMDB film genres, multi-label class-incremental in {len(exps)} steps "
                                f"({'; '.join(e.name for e in exps)}), {len(train)} training films; inputs: {inputs}",
                    defaults={"arch_options": {"bottom": [256], "tower": []},
                              "train": {"epochs": 5, "batch_size": 64, "lr": 1e-3}})
