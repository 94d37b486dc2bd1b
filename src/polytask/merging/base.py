"""The Merger base class, what a merger declares it needs, and the streaming file merge.

A merger is called one way, ``merge(base, finetuned, data=None)``. It declares as class attributes
what it needs beyond the checkpoints (:attr:`Merger.needs`, from :data:`NEEDS`), which λ values
a benchmark should try (:attr:`Merger.lambda_grid`) and, per suite size class, option defaults and
how much data to hand over; a harness reads these and fills a :class:`MergeData`, so it knows no
merger by name.

A data-free merger is a per-tensor rule. Task-vector methods implement
``merge_tensor(name, base, deltas)`` (τ_t = θ_t − θ_0 as deltas); weight-space methods
(averaging, Fisher merging) override ``merge_models(name, base, models)`` instead. Both see
float32 tensors (float64 for float64 models) and the result is cast back to the base dtype.
Integer and bool tensors (e.g. BatchNorm step counters) are copied from the base.

Merging reads one key at a time from every input (memory-mapped safetensors), so peak memory
is one tensor per input plus the work buffers. Inputs are never written to: an in-place write
into a tensor of a memory-mapped file would copy its pages into private memory for as long as
the file stays open. :func:`merge_files` writes each merged tensor as soon as it is computed
(a ``.safetensors`` file, or a Hugging Face folder shard by shard) and renames the result into
place at the end, so the merged model is never held whole. The in-memory :meth:`Merger.merge`
runs the very same per-key computation (:meth:`Merger.merge_key` after :meth:`Merger.open`),
so both give identical bits. Both take ``threads``: keys are merged by a pool of that many threads
(torch kernels release the GIL), at most ``threads`` tensors ahead of the one being written, and
the result does not depend on the thread count (each key's computation is independent of the others).
A merger whose rule only reads its inputs sets :attr:`Merger.copies_inputs` to False and then gets
the tensors of an in-memory state dict as they are, not copies.
"""

from __future__ import annotations

import json
import os
import time
from itertools import islice
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from polytask.errors import PolytaskError
from polytask.io import SafetensorsWriter, atomic_path
from polytask.merging.hf import open_inputs, polytask_version, shard_layout, write_folder
from polytask.merging.taskvector import Checkpoint, DictCheckpoint, ModelSource, compute_dtype, is_mergeable
from polytask.registry import MERGERS


#: What a merger may need besides the checkpoints: ``fisher`` (a diagonal Fisher per fine-tuned model),
#: ``unlabeled`` (unlabeled input batches per task, e.g. test inputs), ``labeled`` (a few (x, y) batches
#: per task) or ``routing`` (a few input batches per task, their task id as the label).
NEEDS = frozenset({"fisher", "unlabeled", "labeled", "routing"})
#: The needs met by batches in :attr:`MergeData.batches` (a merger has at most one).
BATCH_NEEDS = frozenset({"unlabeled", "labeled", "routing"})
#: Suite size classes, cheapest first; they key :attr:`Merger.suite_defaults` and :attr:`Merger.data_sizes`.
SIZE_CLASSES = ("small", "vision", "text")

#: ``forward(model, params, x, task_index) -> logits`` of that task's head on the model run with ``params``
Forward = Callable[[nn.Module, dict[str, Tensor], Tensor, int], Tensor]


@dataclass
class MergeData:
    """What a merger gets besides the checkpoints; which fields it reads follows its :attr:`Merger.needs`."""

    model: nn.Module | None = None                       # the network the checkpoints belong to
    batches: Sequence[Iterable[Any]] | None = None       # one list of batches per task: inputs x or (x, y)
    forward: Forward | None = None                       # default: run ``model``, a dict output gives its t-th entry
    features: Callable[[Tensor], Tensor] | None = None   # router input φ(x); default: the flattened input
    fishers: Sequence[ModelSource] | None = None         # one diagonal Fisher per fine-tuned model


class Merger:
    """Base class: combine a base model and N fine-tuned models into one set of weights."""

    #: Subset of :data:`NEEDS`; empty for a data-free rule.
    needs: ClassVar[frozenset[str]] = frozenset()
    #: False when ``merge`` needs batches (set from :attr:`needs`; Fisher merging takes Fishers as an option too).
    data_free: ClassVar[bool] = True
    #: Values of the option ``lam`` a benchmark tries on the validation split; empty: λ is not tuned.
    lambda_grid: ClassVar[tuple[float, ...]] = ()
    #: Per size class (:data:`SIZE_CLASSES`): options a benchmark uses instead of the constructor's defaults.
    suite_defaults: ClassVar[Mapping[str, Mapping[str, Any]]] = {}
    #: Per size class: (batches per task, None for all; batch size) of the data a benchmark hands over.
    data_sizes: ClassVar[Mapping[str, tuple[int | None, int]]] = {}
    #: False when ``merge_models`` / ``merge_tensor`` never write into their input tensors: in-memory
    #: inputs are then passed without copying.
    copies_inputs: ClassVar[bool] = True
    #: True when ``merge_models`` takes the fine-tuned tensors in their stored dtype (e.g. bf16) and
    #: computes in the base's compute dtype itself (per block or per model): no N converted copies held.
    stored_dtype_inputs: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.needs <= NEEDS or len(cls.needs & BATCH_NEEDS) > 1:
            raise TypeError(f"{cls.__name__}.needs must be a subset of {sorted(NEEDS)} with at most one of "
                            f"{sorted(BATCH_NEEDS)}, not {sorted(cls.needs)}")
        if cls.needs and set(cls.data_sizes) != set(SIZE_CLASSES):
            raise TypeError(f"{cls.__name__} needs data: give data_sizes for each size class {SIZE_CLASSES}")
        cls.data_free = not cls.needs & BATCH_NEEDS

    def merge_tensor(self, name: str, base: Tensor, deltas: list[Tensor]) -> Tensor:
        """Merged weights of tensor ``name`` from the base and the task vectors' entries (``deltas`` may be
        modified in place)."""
        raise NotImplementedError(f"{type(self).__name__} implements neither merge_tensor nor merge_models")

    def merge_models(self, name: str, base: Tensor, models: list[Tensor]) -> Tensor:
        """Merged weights of tensor ``name`` from the base and the fine-tuned weights."""
        return self.merge_tensor(name, base, [m - base for m in models])

    def prepare(self, base: Checkpoint, models: Sequence[Checkpoint], data: MergeData | None) -> None:
        """Hook run once the inputs are open and checked (e.g. to open Fisher files)."""

    def open(self, base: ModelSource, finetuned: Sequence[ModelSource],
             data: MergeData | None = None) -> tuple[Checkpoint, list[Checkpoint]]:
        """Open and check the inputs (peft adapter folders included) and run :meth:`prepare`."""
        base_ck, models = open_inputs(base, finetuned)
        self.prepare(base_ck, models, data)
        return base_ck, models

    def merge_key(self, key: str, base: Checkpoint, models: Sequence[Checkpoint]) -> Tensor:
        """The merged tensor ``key`` (in the base's dtype) of inputs returned by :meth:`open`."""
        def read(checkpoint: Checkpoint, key: str) -> Tensor:
            return checkpoint.get(key) if self.copies_inputs else read_only(checkpoint, key)

        value = read(base, key)
        if not is_mergeable(value.dtype):
            return value if self.copies_inputs else value.clone()
        cd = compute_dtype(value.dtype)
        inputs = [read(m, key) for m in models]
        if not self.stored_dtype_inputs:
            inputs = [x.to(cd) for x in inputs]
        merged = self.merge_models(key, value.to(cd), inputs).to(value.dtype)
        for checkpoint in (base, *models):
            checkpoint.release(key)  # a streaming merge holds only the tensors in use
        return merged

    def merge(self, base: ModelSource, finetuned: Sequence[ModelSource], data: MergeData | None = None, *,
              threads: int = 1) -> dict[str, Tensor]:
        """Merge state dicts, files or folders tensor by tensor; returns the merged state dict.

        ``data`` carries what :attr:`needs` names; a rule that needs nothing ignores it. ``threads``: how
        many keys are merged at once (same result for any value).
        """
        base_ck, models = self.open(base, finetuned, data)
        keys = base_ck.keys()
        return dict(zip(keys, map_keys(lambda key: self.merge_key(key, base_ck, models), keys, threads)))


def read_only(checkpoint: Checkpoint, key: str) -> Tensor:
    """Tensor ``key`` of ``checkpoint`` without a copy where it is in memory (never write into it)."""
    return checkpoint.tensors[key] if isinstance(checkpoint, DictCheckpoint) else checkpoint.get(key)


def map_keys(fn: Callable[[str], Tensor], keys: Sequence[str], threads: int = 1) -> Iterator[Tensor]:
    """``fn(key)`` for each key in order, computed by ``threads`` threads at most ``threads`` keys ahead."""
    if int(threads) < 1:
        raise PolytaskError(f"threads={threads} is below 1; pass threads=1 (one thread) or more")
    if threads == 1:
        yield from map(fn, keys)
        return
    with ThreadPoolExecutor(max_workers=int(threads)) as pool:
        pending: list[Future[Tensor]] = []
        for key in keys:
            pending.append(pool.submit(fn, key))
            if len(pending) > threads:
                yield pending.pop(0).result()
        for future in pending:
            yield future.result()


def prefetched(fn: Callable[[str], Tensor], order: Sequence[str], threads: int) -> Callable[[str], Tensor]:
    """``fn`` for a caller that asks for the keys in ``order``, computed ahead by :func:`map_keys`; a key
    asked for out of that order is computed on the spot (same result, no look-ahead)."""
    results = zip(order, map_keys(fn, order, threads))
    head: list[tuple[str, Tensor]] = []

    def get(key: str) -> Tensor:
        if not head:
            head.extend(islice(results, 1))
        return head.pop()[1] if head and head[0][0] == key else fn(key)
    return get


def is_folder_output(out: str | os.PathLike[str]) -> bool:
    """Whether ``out`` names an output folder: an existing folder, a path ending in a separator, or any
    name without the ``.safetensors`` suffix (that suffix alone means one file)."""
    text = os.fspath(out)
    return os.path.isdir(text) or text.endswith(("/", os.sep)) or not text.endswith(".safetensors")


def merge_files(method: str | Merger, base_path: ModelSource, finetuned_paths: Sequence[ModelSource],
                out_path: str | os.PathLike[str], *, out_dtype: torch.dtype | None = None,
                max_shard_size: int | str | None = None, overwrite: bool = False,
                record: Mapping[str, Any] | None = None, threads: int = 1, **options: Any) -> dict[str, Any]:
    """Merge models with the data-free ``method`` (a name and its ``options``, or a :class:`Merger`) and write
    ``out_path`` atomically (nothing there on error), one tensor at a time.

    ``out_path`` ending in ``.safetensors`` is one file; anything else is a Hugging Face folder (see
    :func:`is_folder_output` and :mod:`polytask.merging.hf`): shards like the base or of ``max_shard_size``,
    the base's config and tokenizer files, ``polytask_merge.yaml`` (``record`` plus method, options, inputs
    with sha256, version). ``out_dtype`` casts the floating-point tensors (default: the inputs' dtype).
    ``threads`` tensors are merged at once (same output for any value; see :func:`map_keys`).
    Returns a summary: method, models, tensors, seconds, out.
    """
    start = time.perf_counter()
    merger = method if isinstance(method, Merger) else MERGERS.create(method, **options)
    name = method if isinstance(method, str) else type(method).__name__
    if not merger.data_free:
        free = ", ".join(n for n in MERGERS.names() if MERGERS.get(n).data_free)
        raise PolytaskError(f"merger {name!r} learns from data; call its merge from Python with "
                            f"data=MergeData(model=..., batches=...), "
                            f"or pick a data-free merger: {free}")
    base_ck, models = merger.open(base_path, finetuned_paths)
    keys = base_ck.keys()
    settings = options if isinstance(method, str) else {k: v for k, v in vars(merger).items() if not k.startswith("_")}
    info = {"method": name, "options": dict(settings), **(record or {}), "polytask_version": polytask_version()}
    def merged(key: str) -> Tensor:
        return merger.merge_key(key, base_ck, models)

    if is_folder_output(out_path):
        layout = [(key, *base_ck.meta(key)) for key in keys]
        order = [key for _, entries in shard_layout(base_path, layout, max_shard_size) for key, _, _ in entries]
        write_folder(out_path, base_path, base_ck, prefetched(merged, order, threads),
                     json.loads(json.dumps(info, default=str)), inputs=[base_path, *finetuned_paths],
                     out_dtype=out_dtype, max_shard_size=max_shard_size, overwrite=overwrite)
    else:
        if max_shard_size is not None:
            raise PolytaskError(f"max_shard_size applies to folder outputs, and {str(out_path)!r} is one .safetensors file; "
                                f"pass an out= folder name (without .safetensors) to shard")
        layout = []
        for key in keys:
            shape, dtype = base_ck.meta(key)
            layout.append((key, shape, out_dtype if out_dtype is not None and is_mergeable(dtype) else dtype))
        meta = {"format": "pt", "polytask_merger": name, "polytask_options": json.dumps(options, default=str)}
        with atomic_path(out_path) as tmp:
            with SafetensorsWriter(tmp, layout, metadata=meta) as writer:
                for (key, _, dtype), value in zip(layout, map_keys(merged, keys, threads)):
                    writer.write(key, value.to(dtype))
    return {"method": name, "models": len(finetuned_paths), "tensors": len(keys),
            "seconds": time.perf_counter() - start, "out": str(out_path)}
