"""Palmer Archipelago penguins (Gorman, Williams & Fraser, PLoS ONE 2014; Horst, Hill & Gorman's
``palmerpenguins``), from PyPI ``palmerpenguins``.

342 adult penguins with their four body measurements (bill length and depth, flipper length,
body mass; standardised with training statistics; the 2 rows with no measurements are
dropped). Three tasks on the same rows: ``species`` (Adelie, Chinstrap, Gentoo), ``sex``
(binary; missing for 9 birds, masked) and ``island`` (Biscoe, Dream, Torgersen). The split is a
seeded 60/20/20.
"""

from __future__ import annotations

import numpy as np
import torch

from polytask.data._sources import assemble, penguins as read_penguins, seeded_splits
from polytask.registry import SUITES
from polytask.tasks import InputSpec, Task, TaskSuite

FEATURES = ("bill_length_mm", "bill_depth_mm", "flipper_length_mm", "body_mass_g")
SPECIES = ("Adelie", "Chinstrap", "Gentoo")
ISLANDS = ("Biscoe", "Dream", "Torgersen")


@SUITES.register("penguins")
def penguins(*, seed: int = 0, tasks: list[str] | None = None) -> TaskSuite:
    """Palmer penguins (palmerpenguins), 342 birds: tasks species (3), sex (binary, 9 missing) and island (3)."""
    df = read_penguins("suite 'penguins'")
    df = df[df[list(FEATURES)].notna().all(axis=1)].reset_index(drop=True)
    idx = seeded_splits(len(df), 0.2, 0.2, seed)
    x = df[list(FEATURES)].to_numpy(np.float64)
    train = idx[0].numpy()
    x = (x - x[train].mean(0)) / x[train].std(0)
    labels = {"species": torch.tensor(df["species"].map({s: i for i, s in enumerate(SPECIES)}).to_numpy(np.int64)),
              "sex": torch.tensor((df["sex"] == "male").to_numpy(np.float32)),
              "island": torch.tensor(df["island"].map({s: i for i, s in enumerate(ISLANDS)}).to_numpy(np.int64))}
    tasks_ = [Task("species", "multiclass", num_classes=3), Task("sex", "binary", metrics=("accuracy", "auroc")),
              Task("island", "multiclass", num_classes=3)]
    return assemble("penguins", tasks_, InputSpec("dense", dim=len(FEATURES)), torch.tensor(x, dtype=torch.float32),
                    labels, idx, __doc__, masks={"sex": torch.tensor(df["sex"].notna().to_numpy())}, task_names=tasks)
