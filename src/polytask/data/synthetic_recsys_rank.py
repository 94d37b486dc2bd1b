"""``synthetic-recsys-rank``: the synthetic recommender log of :mod:`polytask.data.synthetic_recsys` with
its behaviour tasks as ``ranking`` tasks, each user's impressions one group: labels (behaviour, user
id), scored by GAUC (the impression-weighted mean of per-user AUCs; Zhou et al., KDD 2018), NDCG@10
within each user, log loss and the global AUROC. Same generator, options and split; conversion stays
labelled on clicked impressions only.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from polytask.data.synthetic_recsys import synthetic_recsys
from polytask.registry import SUITES
from polytask.tasks import MultiTaskData, Task, TaskSuite

METRICS = ("gauc", "ndcg@10", "logloss", "auroc")


def _grouped(data: MultiTaskData) -> MultiTaskData:
    user = data.x["fields"][:, 0].float()  # type: ignore[index]
    return MultiTaskData(data.x, {k: torch.stack([y, user], 1) for k, y in data.y.items()}, dict(data.mask))


@SUITES.register("synthetic-recsys-rank")
def synthetic_recsys_rank(**options: Any) -> TaskSuite:
    """Synthetic recommender log as per-user ranking tasks (GAUC, NDCG@10, logloss); options as synthetic-recsys."""
    base = synthetic_recsys(**options)
    return replace(base, name="synthetic-recsys-rank", tasks=[Task(t.name, "ranking", metrics=METRICS) for t in base.tasks],
                   train=_grouped(base.train), val=_grouped(base.val), test=_grouped(base.test),
                   description=base.description.replace("binary tasks", "ranking tasks (grouped by user)"))
