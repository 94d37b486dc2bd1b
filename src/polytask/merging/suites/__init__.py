"""Merge suites: one pretrained network, one fine-tuned copy of it per task, built offline and cached.

A merge suite is the data of the task-arithmetic benchmark (Ilharco et al., ICLR 2023; TIES,
AdaMerging, aTLAS and Twin-Merging use the same protocol): a pretrained *body* θ_0, one
fine-tuned body θ_t per task, and each task's own classification head. Heads are never merged;
a merged body is evaluated with every task's own fine-tuned head.

Each network is split into a frozen *stem* (run once per sample; its outputs are stored with the
suite) and the *body* (:mod:`polytask.models.bodies`), whose trainable tensors are the ones
fine-tuned, saved and merged. One module per suite, each registered by name in
:data:`~polytask.registry.MERGE_SUITES` (``polytask list merge-suite``):

* ``digits-merge`` (:mod:`.digits`): scikit-learn's 8x8 digits. A 64-128-128 ReLU MLP is pretrained
  by polytask itself on a self-supervised pretext task, rotation prediction (which of
  0/90/180/270 degrees; Gidaris et al., ICLR 2018), then fine-tuned on six tasks: ``digit`` (10),
  ``parity`` (2), ``mod3`` (3), ``large`` (digit >= 5), ``mirror`` (digit of the left-right
  flipped image) and ``invert`` (digit of the image 1 - x). Stem: none. Merged: every MLP weight
  and bias.
* ``vision-merge`` (:mod:`.vision`): ImageNet EfficientNet-Lite0 at 64x64 pixels on ``mnist``,
  ``fashion-mnist``, sklearn ``digits``, ``multi-mnist-left`` and ``multi-mnist-right`` (subsets).
  Stem (frozen, cached): the convolution stem and blocks 0-10. Merged: blocks 11-15 and the 1x1
  head convolution with their BatchNorm scales and shifts (2.67M of 3.4M parameters).
* ``text-merge`` (:mod:`.text`): all-MiniLM-L6-v2 (mean pooling) on ``wordnet-pos``,
  ``wordnet-topic``, ``fortunes`` (topic) and ``tweet-sentiment``; fine-tuned fully except the
  embeddings (frozen). Merged: the six transformer layers (10.6M parameters).
* ``text-merge-lora`` (:mod:`.text`): the same tasks, with per-task LoRA adapters (r = 8, α = 16 on
  the attention query and value projections, via peft). The task vector of a LoRA model is its
  adapter folded into the dense weights, τ_t = (α/r)·B_t A_t on each query/value matrix (peft's
  ``merge_and_unload``); the merged tensors are those twelve matrices.

The build, the cache and the loaded suite are in :mod:`.base`.
"""

from polytask._autoload import import_submodules
from polytask.merging.suites.base import (MergeSuite, Prepared, SuiteSpec, get_spec, linear_probe, load_merge_suite,
                                          suite_names)

import_submodules(__name__, __path__)

__all__ = ["MergeSuite", "Prepared", "SuiteSpec", "get_spec", "linear_probe", "load_merge_suite", "suite_names"]
