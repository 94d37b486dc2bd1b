"""MultiMNIST (Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018).

Each image overlays two MNIST digits: the *left* digit at the top-left of a 36x36 canvas
(rows/cols 0-27), the *right* digit (a uniformly drawn image of the same split) at the
bottom-right (rows/cols 6-33), the overlap taking the pixel-wise maximum; the canvas is then
resized to 28x28 by nearest-neighbour sampling (PIL's ``NEAREST``, which their
``scipy.misc.imresize(..., interp='nearest')`` called). Tasks: ``left`` and ``right`` digit.
Deviations from their loader: digits come from MNIST's standard 50k/10k/10k split (theirs: 60k
train/10k test, one image per left digit, as here), the right partners are drawn with a fixed
numpy generator (seed 0) so the data set is the same everywhere, imresize's min-max byte rescale
is skipped, and pixels stay in [0, 1] (backbones normalise for themselves). Generated once and
cached as ``.npz`` under ``$POLYTASK_CACHE``.
"""

from __future__ import annotations

import numpy as np
import torch

from polytask.data._sources import assemble, cached_arrays, mnist_splits, shrink
from polytask.registry import SUITES
from polytask.sources import fingerprint, package_file
from polytask.tasks import InputSpec, Task, TaskSuite

_NEAREST = np.floor((np.arange(28) + 0.5) * 36 / 28).astype(np.int64)  # PIL nearest, 36 -> 28


def overlay(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Sener & Koltun's canvas for uint8 digit batches [N, 28, 28] -> [N, 28, 28] uint8."""
    canvas = np.zeros((len(left), 36, 36), dtype=np.uint8)
    canvas[:, 0:28, 0:28] = left
    canvas[:, 6:34, 6:34] = right
    canvas[:, 6:28, 6:28] = np.maximum(left[:, 6:28, 6:28], right[:, 0:22, 0:22])
    return canvas[:, _NEAREST][:, :, _NEAREST]


def _generate() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    out: dict[str, np.ndarray] = {}
    for name, (x, y) in zip(("train", "val", "test"), mnist_splits("suite 'multi-mnist'")):
        digits = np.rint(x.reshape(-1, 28, 28) * 256).clip(0, 255).astype(np.uint8)
        partner = rng.integers(0, len(digits), size=len(digits))
        out[f"{name}_x"] = overlay(digits, digits[partner])
        out[f"{name}_left"], out[f"{name}_right"] = y, y[partner]
    return out


@SUITES.register("multi-mnist")
def multi_mnist(*, seed: int = 0, subset: int | None = None, tasks: list[str] | None = None,
                features: str | None = None) -> TaskSuite:
    """MultiMNIST (Sener & Koltun 2018): two overlapping digits, tasks left and right digit; 50k/10k/10k."""
    source = package_file("mnist", "data/mnist.pkl.gz", "mnist", "suite 'multi-mnist'")
    arrays = cached_arrays("multi-mnist", fingerprint("multi-mnist-v1", source), _generate)
    names = ("train", "val", "test")
    x = torch.from_numpy(np.concatenate([arrays[f"{n}_x"] for n in names])).float().div_(255).unsqueeze(1)
    labels = {side: torch.from_numpy(np.concatenate([arrays[f"{n}_{side}"] for n in names])) for side in ("left", "right")}
    sizes = np.cumsum([0] + [len(arrays[f"{n}_x"]) for n in names])
    splits = shrink([torch.arange(sizes[i], sizes[i + 1]) for i in range(3)], subset, seed)
    return assemble("multi-mnist", [Task("left", "multiclass", num_classes=10), Task("right", "multiclass", num_classes=10)],
                    InputSpec("image", shape=(1, 28, 28)), x, labels, splits, __doc__,
                    task_names=tasks, features=features)
