"""polytask.merging: every module here registers itself by name on import.

Public helpers: :class:`Merger` (base class), :func:`merge_files` (streaming merge of files),
:class:`TaskVector` (task-vector algebra), :func:`open_checkpoint`, :func:`diagonal_fisher`.
"""

from polytask._autoload import import_submodules
from polytask.merging.base import Merger, merge_files
from polytask.merging.taskvector import TaskVector, open_checkpoint

import_submodules(__name__, __path__)

from polytask.merging.fisher import diagonal_fisher  # noqa: E402  (after the auto-import, which loads it)

__all__ = ["Merger", "TaskVector", "diagonal_fisher", "merge_files", "open_checkpoint"]
