"""``digits-merge``: an MLP pretrained by rotation prediction on sklearn's 8x8 digits, six digit tasks.

Pretext (Gidaris et al., ICLR 2018): predict which of 0/90/180/270 degrees an image was rotated by.
Tasks: ``digit`` (10), ``parity`` (2), ``mod3`` (3), ``large`` (digit >= 5), ``mirror`` (digit of
the left-right flipped image) and ``invert`` (digit of the image 1 - x). No stem; every MLP weight
and bias is merged.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from polytask.merging.suites.base import Prepared, SuiteSpec
from polytask.models.bodies import DigitsBody, FineTuneNet
from polytask.registry import MERGE_SUITES
from polytask.tasks import MultiTaskData, Task


def digits_images() -> tuple[Tensor, Tensor, list[Tensor]]:
    """sklearn digits as [N, 1, 8, 8] images in [0, 1], labels, and seeded train/val/test indices."""
    from sklearn.datasets import load_digits

    from polytask.data._sources import seeded_splits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    return x, y, list(seeded_splits(len(y), 0.2, 0.2, 0))


def _digits_task(task: str, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    return {
        "digit": (x, y), "parity": (x, y % 2), "mod3": (x, y % 3), "large": (x, (y >= 5).long()),
        "mirror": (x.flip(-1), y), "invert": (1.0 - x, y),
    }[task]


@MERGE_SUITES.register("digits-merge")
class DigitsMerge(SuiteSpec):
    """MLP pretrained by rotation prediction on sklearn digits; 6 digit tasks"""

    name = "digits-merge"
    tasks = ("digit", "parity", "mod3", "large", "mirror", "invert")
    kind = "dense"
    size_class = "small"
    eval_batch = 512
    val_limit = None

    @classmethod
    def prepare(cls, *, tasks: list[str] | None = None, hidden: int = 128, pretrain_epochs: int = 5,
                probe_epochs: int = 20, epochs: int = 20, lr: float = 1e-3, seed: int = 0) -> Prepared:
        """Pretrain the MLP by rotation prediction, then hand over the six digit tasks."""
        from polytask.trainer import TrainConfig, Trainer, seed_everything

        names = cls.check_tasks(tasks)
        x, y, (tr, va, te) = digits_images()
        rot = lambda imgs: torch.cat([imgs.rot90(k, (2, 3)) for k in range(4)])  # noqa: E731
        rot_y = lambda n: torch.arange(4).repeat_interleave(n)  # noqa: E731
        seed_everything(seed)
        body = DigitsBody(hidden)
        pretext = FineTuneNet(body, nn.Linear(hidden, 4), "rotation")
        cfg = TrainConfig(epochs=pretrain_epochs, batch_size=64, lr=lr, seed=seed, progress=False, num_threads=None)
        Trainer(pretext, [Task("rotation", "multiclass", num_classes=4)], "ew", cfg).fit(
            MultiTaskData(rot(x[tr]), {"rotation": rot_y(len(tr))}), MultiTaskData(rot(x[va]), {"rotation": rot_y(len(va))}))
        base = {k: v.detach().clone() for k, v in body.state_dict().items()}

        def fresh() -> nn.Module:
            b = DigitsBody(hidden)
            b.load_state_dict(base)
            return b

        data = {}
        for t in names:
            data[t] = {s: _digits_task(t, x[idx], y[idx]) for s, idx in (("train", tr), ("val", va), ("test", te))}
        classes = {t: int(data[t]["train"][1].max()) + 1 for t in names}
        return Prepared(fresh, data, classes,
                        train={"epochs": epochs, "batch_size": 64, "lr": lr},
                        probe={"epochs": probe_epochs, "batch_size": 64, "lr": 1e-2},
                        info={"pretext": "rotation prediction", "hidden": hidden})

    @classmethod
    def pretrained_body(cls, options: dict[str, Any]) -> nn.Module:
        return DigitsBody(options["hidden"])
