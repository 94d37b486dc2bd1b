"""What every route's config shares: YAML reading with one-line errors and ``to_dict``/``from_yaml``.

Each route has one config dataclass (``joint.RunConfig``, ``continual.ContinualConfig``,
``merging.BenchConfig``) whose ``train`` is a :class:`~polytask.trainer.TrainConfig` holding the
run's one ``seed``; each is saved as the run's ``config.yaml`` and read back by ``from_yaml``.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

import yaml

from polytask.errors import PolytaskError

C = TypeVar("C", bound="RouteConfig")


class RouteConfig:
    """Mixin for a route's config dataclass: ``from_dict`` (defined by the route) plus these two."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[C], d: Any, source: str = "the config") -> C:  # pragma: no cover - per route
        raise NotImplementedError

    @classmethod
    def from_yaml(cls: type[C], path: str | os.PathLike[str]) -> C:
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


def option_maps(d: dict[str, Any], keys: tuple[str, ...], source: str) -> dict[str, Any]:
    """``d`` with each of ``keys`` a mapping (None -> {}); a non-mapping is a one-line error."""
    d = dict(d)
    for key in keys:
        if d.get(key) is None:
            d[key] = {}
        elif not isinstance(d[key], dict):
            raise PolytaskError(f"{source}: {key} must be a mapping, e.g. {key}: {{name: value}}")
    return d
