"""What every route's config shares: YAML reading with one-line errors and ``to_dict``/``from_yaml``.

Each route has one config dataclass (``joint.RunConfig``, ``continual.ContinualConfig``,
``merging.BenchConfig``) whose ``train`` is a :class:`~polytask.trainer.TrainConfig` holding the
run's one ``seed``; each is saved as the run's ``config.yaml`` and read back by ``from_yaml``.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import yaml

from polytask.errors import PolytaskError
from polytask.registry import check_fields

C = TypeVar("C", bound="RouteConfig")


class RouteConfig:
    """Mixin for a route's config dataclass: ``to_dict``, ``from_dict`` (with one-line errors) and ``from_yaml``.

    A subclass names its required field (and an example value), its option-mapping fields, and, if
    it has a ``train`` field, how a mapping becomes its TrainConfig (:meth:`train_config`).
    """

    required: ClassVar[tuple[str, str] | None] = None
    option_fields: ClassVar[tuple[str, ...]] = ()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def train_config(cls, d: dict[str, Any]) -> Any:  # pragma: no cover - only for configs with a train field
        raise NotImplementedError

    @classmethod
    def from_dict(cls: type[C], d: Any, source: str = "the config") -> C:
        if not isinstance(d, dict):
            raise PolytaskError(f"{source} must be a mapping of fields, not {type(d).__name__}")
        check_fields(cls, d, source)
        if cls.required is not None and cls.required[0] not in d:
            name, example = cls.required
            raise PolytaskError(f"{source} is missing the field {name!r}; add e.g. '{name}: {example}'")
        d = option_maps(d, cls.option_fields, source)
        if "train" in {f.name for f in fields(cls)}:  # type: ignore[arg-type]
            train = d.pop("train", None) or {}
            if not isinstance(train, dict):
                raise PolytaskError(f"{source}: train must be a mapping, e.g. train: {{epochs: 5}}")
            d["train"] = cls.train_config(train)
        try:
            return cls(**d)
        except TypeError as exc:
            raise PolytaskError(f"{source} is invalid: {exc}") from exc

    @classmethod
    def from_yaml(cls: type[C], path: str | os.PathLike[str]) -> C:
        return cls.from_dict(read_yaml(path), source=f"config file {str(path)!r}")


class YamlLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` (no ``!!python`` tags) that also reads ``1e-3`` as a number, as YAML 1.2 does."""


YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                |\.[0-9_]+(?:[eE][-+][0-9]+)?
                |[-+]?\.(?:inf|Inf|INF)
                |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def load_yaml(text: str) -> Any:
    """Parse YAML text safely (see :class:`YamlLoader`)."""
    return yaml.load(text, Loader=YamlLoader)  # noqa: S506 - a SafeLoader subclass


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML mapping, with one-line errors for a missing file, bad syntax or a non-mapping."""
    p = Path(path)
    if not p.is_file():
        raise PolytaskError(f"config file {str(p)!r} does not exist; pass the path of a YAML run config")
    try:
        data = load_yaml(p.read_text())
    except yaml.constructor.ConstructorError as exc:
        raise PolytaskError(f"config file {str(p)!r} uses a YAML tag polytask does not load ({exc.problem}); "
                            "write plain values (numbers, strings, lists, mappings)") from exc
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
