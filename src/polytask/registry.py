"""Registries: every method is found by name (``create("mmoe")``), timm/peft style."""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import warnings
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Generic, TypeVar

from polytask.errors import PolytaskError, PolytaskWarning

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    obj: T
    description: str


class Registry(Generic[T]):
    """A name -> class/factory table for one family (suite, arch, weighting, ...)."""

    def __init__(self, family: str, package: str | None = None) -> None:
        self.family = family
        self.package = package  # imported on first use: its modules register the family's entries
        self._entries: dict[str, Entry[T]] = {}
        self._old_names: dict[str, str] = {}  # deprecated name -> current name

    def _load(self) -> None:
        if self.package is not None:
            package, self.package = self.package, None
            importlib.import_module(package)

    def register(self, name: str, description: str | None = None, *, old_names: tuple[str, ...] = ()) -> Callable[[T], T]:
        """Decorator: register ``obj`` under ``name``; the description defaults to the docstring's first line.

        ``old_names`` still find ``obj`` but warn (:class:`DeprecatedName`); :meth:`names` lists only ``name``.
        """

        def decorator(obj: T) -> T:
            if name in self._entries or name in self._old_names:
                raise ValueError(f"{self.family} {name!r} is registered twice")
            self._old_names.update(dict.fromkeys(old_names, name))
            text = description or " ".join((inspect.getdoc(obj) or "").strip().split("\n\n")[0].split())
            self._entries[name] = Entry(name, obj, text)
            return obj

        return decorator

    def get(self, name: str) -> T:
        self._load()
        if name in self._old_names:
            new = self._old_names[name]
            warnings.warn(f"{self.family} {name!r} is deprecated and will be removed; use {new!r}", DeprecatedName,
                          stacklevel=2)
            name = new
        if name not in self._entries:
            close = difflib.get_close_matches(name, self._entries, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise PolytaskError(
                f"unknown {self.family} {name!r}{hint}; choose one of: {', '.join(self.names())}"
            )
        return self._entries[name].obj

    def create(self, name: str, *args: Any, **options: Any) -> Any:
        """Instantiate ``name`` with ``options``, rejecting options it does not take."""
        factory = self.get(name)
        what = f"{self.family} {name!r}"
        check_options(factory, options, what)
        try:
            return factory(*args, **options)
        except (ValueError, RuntimeError, ZeroDivisionError, IndexError) as exc:
            # A value the method did not validate itself (e.g. a size of 0 reaching torch): still one line.
            given = ", ".join(f"{k}={v!r}" for k, v in options.items()) or "its default options"
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise PolytaskError(f"{what} cannot be built with {given} ({first}); check the option values") from exc

    def names(self) -> list[str]:
        self._load()
        return sorted(self._entries)

    def entries(self) -> list[Entry[T]]:
        return [self._entries[n] for n in self.names()]

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._entries or name in self._old_names


class DeprecatedName(PolytaskWarning, FutureWarning):
    """A method was asked for by a name it no longer has (shown by default; the CLI prints one line)."""


def check_options(factory: Callable[..., Any], options: dict[str, Any], what: str) -> None:
    """Raise a one-line error naming any keyword ``factory`` does not accept."""
    params = inspect.signature(factory).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    accepted = [n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY or
                (p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD and p.default is not inspect.Parameter.empty)]
    unknown = [k for k in options if k not in accepted]
    if unknown:
        raise PolytaskError(
            f"{what} has no option {unknown[0]!r}; its options are: {', '.join(accepted) or '(none)'}"
        )
    for key, value in options.items():
        expected = _scalar_type(params[key].annotation)
        if expected is not None and not _is_instance(value, expected):
            raise PolytaskError(f"{what} option {key!r} must be {expected.__name__} (got {value!r}); "
                                f"pass e.g. {key}={params[key].default!r}")


def check_fields(cls: type, data: dict[str, Any], what: str) -> None:
    """Raise a one-line error naming the first key of ``data`` that is not a field of dataclass ``cls``,
    or the first whose value has the wrong scalar type (``epochs: 2.5``, ``suite: 3``)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise PolytaskError(f"{what}: unknown field {unknown[0]!r}; valid fields: {', '.join(sorted(fields))}")
    for key, value in data.items():
        check_type(what, key, value, fields[key].type)


def check_type(what: str, key: str, value: Any, annotation: Any) -> None:
    """One-line error if ``value`` is not of the plain scalar type ``annotation`` names (others pass)."""
    expected = _scalar_type(annotation)
    if expected is None:
        return
    optional = "None" in str(annotation)
    if (value is None and not optional) or not _is_instance(value, expected):
        raise PolytaskError(f"{what}: {key} must be {_article(expected)} (got {value!r})")


def _article(t: type) -> str:
    return {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}[t.__name__]


_SCALARS = {"int": int, "float": float, "bool": bool, "str": str}


def _scalar_type(annotation: Any) -> type | None:
    """The plain scalar type of an annotation like ``float`` or ``'int | None'`` (else None)."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
    parts = [p.strip() for p in text.split("|") if p.strip() != "None"]
    return _SCALARS.get(parts[0]) if len(parts) == 1 else None


def _is_instance(value: Any, expected: type) -> bool:
    if value is None:
        return True
    if expected is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    return isinstance(value, expected)


# Each registry imports its family's package the first time it is asked for a name, so every
# registry is full after ``import polytask`` without importing every method up front.
SUITES: Registry[Any] = Registry("suite", "polytask.data")
BACKBONES: Registry[Any] = Registry("backbone", "polytask.models.backbones")
ARCHITECTURES: Registry[Any] = Registry("architecture", "polytask.models.arch")
WEIGHTINGS: Registry[Any] = Registry("weighting", "polytask.weighting")
STRATEGIES: Registry[Any] = Registry("strategy", "polytask.continual")
SCENARIOS: Registry[Any] = Registry("scenario", "polytask.continual")
MERGERS: Registry[Any] = Registry("merger", "polytask.merging")
MERGE_SUITES: Registry[Any] = Registry("merge suite", "polytask.merging.suites")
FUSERS: Registry[Any] = Registry("fuser", "polytask.merging.fusion")  # fusion at the output (keeps every expert)

FAMILIES: dict[str, Registry[Any]] = {
    "suite": SUITES,
    "backbone": BACKBONES,
    "arch": ARCHITECTURES,
    "weighting": WEIGHTINGS,
    "strategy": STRATEGIES,
    "scenario": SCENARIOS,
    "merger": MERGERS,
    "merge-suite": MERGE_SUITES,
    "fuser": FUSERS,
}
