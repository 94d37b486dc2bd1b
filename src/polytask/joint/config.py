"""RunConfig: a plain dataclass describing one joint-route run, saved as config.yaml."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from polytask.config import RouteConfig, option_maps
from polytask.errors import PolytaskError
from polytask.registry import check_fields
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
    train: TrainConfig = field(default_factory=TrainConfig)

    @classmethod
    def from_dict(cls, d: Any, source: str = "the config") -> RunConfig:
        if not isinstance(d, dict):
            raise PolytaskError(f"{source} must be a mapping of fields (suite:, arch:, ...), not {type(d).__name__}")
        check_fields(cls, d, source)
        if "suite" not in d:
            raise PolytaskError(f"{source} is missing the field 'suite'; add e.g. 'suite: digits-multi'")
        d = option_maps(d, ("suite_options", "arch_options", "weighting_options", "backbone_options"), source)
        train = d.pop("train", None) or {}
        if not isinstance(train, dict):
            raise PolytaskError(f"{source}: train must be a mapping, e.g. train: {{epochs: 5}}")
        try:
            return cls(**d, train=TrainConfig.from_dict(train))
        except TypeError as exc:
            raise PolytaskError(f"{source} is invalid: {exc}") from exc
