"""The joint route: one network trained on all tasks at once (architecture x weighting).

Public entry points: :func:`train` (one call), :func:`run` with a :class:`RunConfig`,
:func:`load_run` and :func:`evaluate_run` for a finished run directory.
"""

from polytask.joint.config import RunConfig
from polytask.joint.runner import RunResult, evaluate_run, load_run, run, single_task_baselines, train

__all__ = ["RunConfig", "RunResult", "evaluate_run", "load_run", "run", "single_task_baselines", "train"]
