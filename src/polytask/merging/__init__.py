"""polytask.merging: every module here registers itself by name on import.

Public helpers: :class:`Merger` (base class) and :class:`MergeData` (what a merger gets besides the
checkpoints), :func:`merge_files` (streaming merge of files), :class:`TaskVector` (task-vector
algebra), :func:`open_checkpoint`, :func:`diagonal_fisher`; merge suites (:func:`load_merge_suite`,
:class:`MergeSuite`), :func:`evaluate_merger` (one merger on a suite) and the benchmark
(:class:`BenchConfig`, :func:`run_bench`).
"""

from polytask._autoload import import_submodules
from polytask.merging.base import MergeData, Merger, merge_files
from polytask.merging.taskvector import TaskVector, open_checkpoint

import_submodules(__name__, __path__)

from polytask.merging.bench import BenchConfig, run_bench  # noqa: E402  (after the auto-import, which loads them)
from polytask.merging.evaluate import evaluate_merger  # noqa: E402
from polytask.merging.fisher import diagonal_fisher  # noqa: E402
from polytask.merging.suites import MergeSuite, load_merge_suite  # noqa: E402

__all__ = ["BenchConfig", "MergeData", "MergeSuite", "Merger", "TaskVector", "diagonal_fisher", "evaluate_merger",
           "load_merge_suite", "merge_files", "open_checkpoint", "run_bench"]
