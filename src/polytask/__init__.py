"""polytask: one model, many tasks — joint multi-task learning, continual learning and
model merging behind one vocabulary (Task, TaskSuite, Backbone, Architecture, Weighting,
Strategy, Merger, Trainer)."""

from typing import Any

from polytask.joint import RunConfig, RunResult, evaluate_run, load_run, run, train
from polytask.errors import PolytaskError
from polytask.registry import ARCHITECTURES, BACKBONES, FUSERS, MERGERS, SCENARIOS, STRATEGIES, SUITES, WEIGHTINGS
from polytask.tasks import InputSpec, MultiTaskData, Task, TaskSuite
from polytask.trainer import Hook, TrainConfig, Trainer
from polytask.weighting import Weighting

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """``polytask.compare`` and ``polytask.CompareConfig`` load the cross-route layer on first use."""
    if name in ("compare", "CompareConfig"):
        from polytask import comparison

        return getattr(comparison, name)
    raise AttributeError(f"module 'polytask' has no attribute {name!r}")


__all__ = [
    "ARCHITECTURES", "BACKBONES", "CompareConfig", "compare", "FUSERS", "MERGERS", "SCENARIOS", "STRATEGIES", "SUITES", "WEIGHTINGS",
    "Hook", "InputSpec", "MultiTaskData", "PolytaskError", "RunConfig", "RunResult", "Task", "TaskSuite",
    "TrainConfig", "Trainer", "Weighting", "evaluate_run", "load_run", "run", "train",
]
