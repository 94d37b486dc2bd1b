"""polytask.continual: every module here registers itself by name on import.

Public entry points: :func:`run` (one call), :func:`run_continual` with a
:class:`ContinualConfig`, and :class:`Scenario` / :class:`Experience` for your own data.
"""

from polytask._autoload import import_submodules
from polytask.continual._runner import ContinualConfig, ContinualResult, run, run_continual
from polytask.continual._scenario import Experience, Scenario

__all__ = ["ContinualConfig", "ContinualResult", "Experience", "Scenario", "run", "run_continual"]

import_submodules(__name__, __path__)
