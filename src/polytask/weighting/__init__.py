"""polytask.weighting: one file per loss/gradient balancing rule, each registered by name on import.

Public: :class:`Weighting` (base class) and :class:`GradContext` (per-task gradients of the shared part).
"""

from polytask._autoload import import_submodules
from polytask.weighting.base import GradContext, Weighting

__all__ = ["GradContext", "Weighting"]

import_submodules(__name__, __path__)
