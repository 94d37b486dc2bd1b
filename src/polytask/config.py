"""RunConfig: a plain dataclass describing one joint-route run, saved as config.yaml."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from polytask.errors import PolytaskError
from polytask.registry import check_fields
from polytask.trainer import TrainConfig


@dataclass
class RunConfig:
    """Suite, architecture, weighting and backbone by name with their options, plus training."""

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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any, source: str = "the config") -> RunConfig:
        if not isinstance(d, dict):
            raise PolytaskError(f"{source} must be a mapping of fields (suite:, arch:, ...), not {type(d).__name__}")
        check_fields(cls, d, source)
        if "suite" not in d:
            raise PolytaskError(f"{source} is missing the field 'suite'; add e.g. 'suite: digits-multi'")
        d = dict(d)
        for key in ("suite_options", "arch_options", "weighting_options", "backbone_options"):
            if d.get(key) is None:
                d[key] = {}
            elif not isinstance(d[key], dict):
                raise PolytaskError(f"{source}: {key} must be a mapping, e.g. {key}: {{name: value}}")
        train = d.pop("train", None) or {}
        if not isinstance(train, dict):
            raise PolytaskError(f"{source}: train must be a mapping, e.g. train: {{epochs: 5}}")
        try:
            return cls(**d, train=TrainConfig.from_dict(train))
        except TypeError as exc:
            raise PolytaskError(f"{source} is invalid: {exc}") from exc

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> RunConfig:
        return cls.from_dict(read_yaml(path), source=f"config file {str(path)!r}")


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML mapping, with one-line errors for a missing file, bad syntax or a non-mapping."""
    p = Path(path)
    if not p.is_file():
        raise PolytaskError(f"config file {str(p)!r} does not exist; pass the path of a YAML run config")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise PolytaskError(f"config file {str(p)!r} is not valid YAML{where}; fix the syntax") from exc
    if not isinstance(data, dict):
        raise PolytaskError(f"config file {str(p)!r} must be a mapping of fields (suite:, arch:, ...)")
    return data
