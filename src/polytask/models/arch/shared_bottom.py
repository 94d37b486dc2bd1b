"""Hard parameter sharing (Caruana, 1997): one shared bottom, one tower per task.

    h = f_shared(backbone(x)),   y_t = tower_t(h)

Checked against: median-research-group/LibMTL LibMTL/architecture/HPS.py (commit 4336804): one
shared encoder, one decoder per task, shared part = the encoder. Same structure.
Deviations: none (our shared part is the backbone plus the ``bottom`` MLP).
"""

from __future__ import annotations

from typing import Any, Sequence

from torch import Tensor

from polytask.models.arch.base import Architecture
from polytask.models.backbones import Backbone, mlp
from polytask.registry import ARCHITECTURES
from polytask.tasks import Inputs, InputSpec, Task


@ARCHITECTURES.register("shared-bottom")
class SharedBottom(Architecture):
    """Hard parameter sharing: a shared bottom MLP and one tower per task (Caruana 1997)."""

    def __init__(self, tasks: Sequence[Task], input_spec: InputSpec, *, backbone: Backbone = "auto",
                 backbone_options: dict[str, Any] | None = None, bottom: Sequence[int] = (64,),
                 tower: Sequence[int] = (32,)) -> None:
        super().__init__(tasks, input_spec, backbone, backbone_options)
        self.bottom = mlp(self.backbone.out_dim, bottom)
        self.make_heads(bottom[-1] if bottom else self.backbone.out_dim, tower)

    def forward(self, x: Inputs) -> dict[str, Tensor]:
        h = self.boundary(self.bottom(self.backbone(x)))
        return {t: head(h) for t, head in self.heads.items()}
