"""Four tasks on scikit-learn's bundled 8x8 handwritten digits (1,797 images, no download).

Tasks on the same image: ``digit`` (10 classes), ``parity`` (odd digit), ``large``
(digit >= 5) and ``ink`` (regression: share of lit pixels, standardised).
The 60/20/20 train/val/test split is fixed (seed 0) so runs compare across seeds.
"""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits

from polytask.registry import SUITES
from polytask.tasks import InputSpec, MultiTaskData, Task, TaskSuite, split_data


@SUITES.register("digits-multi")
def digits_multi(*, seed: int = 0) -> TaskSuite:
    """scikit-learn digits with four tasks: digit, parity, large (>=5) and ink regression."""
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    d = torch.tensor(digits.target, dtype=torch.long)
    ink = (x > 0.25).float().mean((1, 2, 3))
    labels = {"digit": d, "parity": (d % 2).float(), "large": (d >= 5).float(),
              "ink": (ink - ink.mean()) / ink.std()}
    train, val, test = split_data(MultiTaskData(x, labels), 0.2, 0.2, seed)
    tasks = [Task("digit", "multiclass", num_classes=10), Task("parity", "binary", metrics=("accuracy", "auroc")),
             Task("large", "binary", metrics=("accuracy", "auroc")), Task("ink", "regression")]
    return TaskSuite("digits-multi", tasks, InputSpec("image", shape=(1, 8, 8)), train, val, test,
                     description="scikit-learn 8x8 digits: digit, parity, large, ink")
