"""polytask.continual: the continual route; one file per strategy, each registered by name on import.

Public entry points: :func:`run` (one call), :func:`run_continual` with a :class:`ContinualConfig`,
:class:`Scenario` / :class:`Experience` for your own data, and :class:`Strategy` (base class).
"""

from polytask._autoload import import_submodules
from polytask.continual.base import BufferStrategy, Strategy
from polytask.continual.runner import ContinualConfig, ContinualResult, run, run_continual
from polytask.continual.scenario import Experience, Scenario

__all__ = ["BufferStrategy", "ContinualConfig", "ContinualResult", "Experience", "Scenario", "Strategy", "run",
           "run_continual"]

import_submodules(__name__, __path__)
