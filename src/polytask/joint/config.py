"""RunConfig: a plain dataclass describing one joint-route run, saved as config.yaml."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from polytask.config import RouteConfig
from polytask.trainer import TrainConfig


@dataclass
class RunConfig(RouteConfig):
    """Suite, architecture, weighting and backbone by name with their options, plus training (and its seed)."""

    suite: str
    arch: str = "shared-bottom"
    weighting: str = "ew"
    backbone: str = "auto"
    suite_options: dict[str, Any] = field(default_factory=dict)
    arch_options: dict[str, Any] = field(default_factory=dict)
    weighting_options: dict[str, Any] = field(default_factory=dict)
    backbone_options: dict[str, Any] = field(default_factory=dict)
    baseline: str = "auto"
    main: str | None = None  # a main task: its metric alone drives model selection and Δm
    train: TrainConfig = field(default_factory=TrainConfig)

    required = ("suite", "digits-multi")
    option_fields = ("suite_options", "arch_options", "weighting_options", "backbone_options")

    @classmethod
    def train_config(cls, d: dict[str, Any]) -> TrainConfig:
        return TrainConfig.from_dict(d)
