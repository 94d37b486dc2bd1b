"""Architectures: how shared and task-specific parts are wired; one file each."""

from polytask._autoload import import_submodules

import_submodules(__name__, __path__)
