"""polytask.merging.fusion: fusion at the output, every module here registers itself by name on import.

A fuser keeps the base and every fine-tuned model and combines their logits per sample at
inference (:class:`Fuser`, :class:`FusedModel`, :func:`fuse_models`, :func:`fuse_suite`), registered
in :data:`~polytask.registry.FUSERS` (``polytask list fuser``). The merge benchmark and
``polytask compare`` (as ``merge:<fuser>``) report them as the upper bound that keeps every expert.
"""

from polytask._autoload import import_submodules
from polytask.merging.fusion.base import FusedModel, Fuser, fuse_models, fuse_suite, kept_parameters

import_submodules(__name__, __path__)

__all__ = ["FusedModel", "Fuser", "fuse_models", "fuse_suite", "kept_parameters"]
