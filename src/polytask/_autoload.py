"""Import every module of a family package so its methods register themselves."""

from __future__ import annotations

import importlib
import pkgutil


def import_submodules(package: str, path: list[str]) -> None:
    for info in pkgutil.iter_modules(path):
        if not info.name.startswith("_"):
            importlib.import_module(f"{package}.{info.name}")
