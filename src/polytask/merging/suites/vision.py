"""``vision-merge``: ImageNet EfficientNet-Lite0 at 64x64 pixels, its last blocks fine-tuned on five image tasks.

Tasks: ``mnist``, ``fashion-mnist``, sklearn ``digits``, ``multi-mnist-left`` and
``multi-mnist-right`` (subsets). Stem (frozen, cached): the convolution stem and blocks
0..``first_block``-1. Merged: the later blocks and the 1x1 head convolution with their BatchNorm
scales and shifts.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polytask.errors import PolytaskError
from polytask.merging.suites.base import Prepared, Split, SuiteSpec, splits_of
from polytask.merging.suites.digits import digits_images
from polytask.models.bodies import efficientnet, vision_body
from polytask.registry import MERGE_SUITES, SUITES


def _vision_splits(task: str, subset: int, seed: int, stem: Callable[[Tensor], Tensor]) -> dict[str, Split]:
    if task == "digits":
        x, y, idx = digits_images()
        return {s: (stem(x[i]), y[i]) for s, i in zip(("train", "val", "test"), idx)}
    if task.startswith("multi-mnist-"):
        side = task.rsplit("-", 1)[1]
        return splits_of(SUITES.create("multi-mnist", subset=subset, seed=seed, tasks=[side]), side, stem)
    label = "digit" if task == "mnist" else "category"
    return splits_of(SUITES.create(task, subset=subset, seed=seed, tasks=[label]), label, stem)


@MERGE_SUITES.register("vision-merge")
class VisionMerge(SuiteSpec):
    """ImageNet EfficientNet-Lite0 fine-tuned on 5 image tasks (last blocks)"""

    name = "vision-merge"
    tasks = ("mnist", "fashion-mnist", "digits", "multi-mnist-left", "multi-mnist-right")
    kind = "dense"
    size_class = "vision"
    eval_batch = 256
    val_limit = 200

    @classmethod
    def prepare(cls, *, tasks: list[str] | None = None, subset: int = 2000, image_size: int = 64, first_block: int = 11,
                probe_epochs: int = 10, epochs: int = 2, lr: float = 1e-4, seed: int = 0) -> Prepared:
        """EfficientNet-Lite0: cache the frozen stem's outputs, fine-tune blocks ``first_block``.. per task."""
        names = cls.check_tasks(tasks)
        if not 1 <= first_block <= 15:
            raise PolytaskError(f"first_block must be between 1 and 15, not {first_block}")
        enc = efficientnet(image_size)

        @torch.no_grad()
        def stem(x: Tensor) -> Tensor:
            outs = []
            for i in range(0, len(x), 256):
                xb = x[i:i + 256].float().expand(-1, 3, -1, -1)
                xb = F.interpolate(xb, size=(image_size, image_size), mode="bilinear", align_corners=False)
                outs.append(enc.stem((xb - enc.mean) / enc.std, first_block))
            return torch.cat(outs)

        data = {t: _vision_splits(t, subset, seed, stem) for t in names}
        classes = {t: int(data[t]["train"][1].max()) + 1 for t in names}
        return Prepared(lambda: vision_body(image_size, first_block), data, classes,
                        train={"epochs": epochs, "batch_size": 32, "lr": lr},
                        probe={"epochs": probe_epochs, "batch_size": 128, "lr": 1e-2},
                        info={"image_size": image_size, "first_block": first_block, "subset": subset})

    @classmethod
    def pretrained_body(cls, options: dict[str, Any]) -> nn.Module:
        return vision_body(options["image_size"], options["first_block"])
