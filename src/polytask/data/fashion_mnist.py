"""Fashion-MNIST (Xiao, Rasul & Vollgraf, arXiv:1708.07747, 2017), from Debian ``dataset-fashion-mnist``.

Zalando article images, 28x28 grayscale in [0, 1]. The official 10k test set is kept; the 60k
training images are split 50k/10k into train/val with ``seed``. Tasks on the same image:
``category`` (10 classes: T-shirt/top, trouser, pullover, dress, coat, sandal, shirt, sneaker,
bag, ankle boot) and ``group``, a super-category defined here: top (T-shirt, pullover, coat,
shirt), one-piece or legwear (trouser, dress), footwear (sandal, sneaker, ankle boot), bag.
Pass ``tasks=["category"]`` for the single-task suite.
"""

from __future__ import annotations

import numpy as np
import torch

from polytask.data._sources import assemble, fashion_mnist_splits, seeded_splits, shrink
from polytask.registry import SUITES
from polytask.tasks import InputSpec, Task, TaskSuite

CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
GROUP = torch.tensor([0, 1, 0, 1, 0, 2, 0, 2, 3, 2])  # top, one-piece/legwear, footwear, bag


@SUITES.register("fashion-mnist")
def fashion_mnist(*, seed: int = 0, subset: int | None = None, tasks: list[str] | None = None,
                  features: str | None = None) -> TaskSuite:
    """Fashion-MNIST (Debian dataset-fashion-mnist), 50k/10k/10k: tasks category (10) and group (4)."""
    (xtr, ytr), (xte, yte) = fashion_mnist_splits("suite 'fashion-mnist'")
    x = torch.from_numpy(np.concatenate([xtr, xte])).float().div_(255).unsqueeze(1)
    category = torch.from_numpy(np.concatenate([ytr, yte]))
    train, val, _ = seeded_splits(len(ytr), 10000 / len(ytr), 0.0, seed)
    idx = shrink([train, val, torch.arange(len(ytr), len(ytr) + len(yte))], subset, seed)
    return assemble("fashion-mnist", [Task("category", "multiclass", num_classes=10),
                                      Task("group", "multiclass", num_classes=4)],
                    InputSpec("image", shape=(1, 28, 28)), x, {"category": category, "group": GROUP[category]},
                    idx, __doc__, task_names=tasks, features=features)
