"""A merge suite's recipe (:class:`SuiteSpec`), its build (LP-FT per task), its cache, and the loaded suite.

Fine-tuning is LP-FT (Kumar et al., ICLR 2022): a linear probe on the frozen pretrained features
first, then body and head together, both with the shared :class:`~polytask.trainer.Trainer`.
Dropout and BatchNorm statistics stay in evaluation mode throughout, so BatchNorm running
statistics are the pretrained ones in every model and are not merged. Everything is seeded; on
CPU a build gives the same bytes every time. Files: ``base.safetensors``, ``<task>.safetensors``
(the fine-tuned merged tensors), ``heads.safetensors``, ``data.safetensors`` (stem outputs and
labels) and ``meta.json`` (written last) under ``<cache>/merge/<suite>/`` (non-default options:
``<suite>-<hash>/``); the folder is filled under a temporary name and renamed into place.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
from safetensors.torch import load_file
from torch import Tensor, nn
from torch.func import functional_call

from polytask.checkpoints import atomic_dir
from polytask.errors import PolytaskError
from polytask.io import cache_dir, save_safetensors, write_json
from polytask.merging.base import SIZE_CLASSES
from polytask.models.bodies import FineTuneNet
from polytask.registry import MERGE_SUITES, check_options
from polytask.tasks import MultiTaskData, Task

FORMAT = 1
SPLITS = ("train", "val", "test")
Split = tuple[Tensor, Tensor]


def merge_cache() -> Path:
    return cache_dir() / "merge"


@dataclass
class Prepared:
    """What a suite's :meth:`SuiteSpec.prepare` hands to the generic fine-tuning loop."""

    body: Callable[[], nn.Module]              # a fresh body holding the pretrained weights
    data: dict[str, dict[str, Split]]          # task -> split -> (stem output, labels)
    classes: dict[str, int]
    train: dict[str, Any]                      # TrainConfig fields for fine-tuning
    probe: dict[str, Any]                      # TrainConfig fields for the linear probe
    finetuned: Callable[[nn.Module], dict[str, Tensor]] | None = None  # merged tensors of a fine-tuned body
    plain: Callable[[], tuple[nn.Module, dict[str, Tensor]]] | None = None  # LoRA: adapter-free body, its merged tensors
    info: dict[str, Any] = field(default_factory=dict)


class SuiteSpec:
    """A merge suite's recipe, registered by name in :data:`~polytask.registry.MERGE_SUITES`.

    The keyword-only parameters of :meth:`prepare` are the suite's build options (their defaults
    are the suite's); :meth:`pretrained_body` gives the architecture a loaded suite runs. The
    docstring's first line is the suite's description.
    """

    name: ClassVar[str]
    tasks: ClassVar[tuple[str, ...]]   # every task the suite offers
    kind: ClassVar[str]                # "dense" (vmap-friendly) or "text"
    size_class: ClassVar[str]          # one of SIZE_CLASSES: which per-size merger defaults apply
    eval_batch: ClassVar[int]          # batch size for evaluating merged models
    val_limit: ClassVar[int | None]    # validation samples per task for choosing λ (None: all)

    @classmethod
    def prepare(cls, **options: Any) -> Prepared:
        """Data, the pretrained body and the fine-tuning settings for the build."""
        raise NotImplementedError

    @classmethod
    def pretrained_body(cls, options: dict[str, Any]) -> nn.Module:
        """The body architecture with its pretrained (package) weights, for every build option resolved;
        the suite's ``base.safetensors`` is loaded over it."""
        raise NotImplementedError

    @classmethod
    def description(cls) -> str:
        return (inspect.getdoc(cls) or "").splitlines()[0]

    @classmethod
    def check_tasks(cls, tasks: list[str] | None) -> list[str]:
        """The chosen tasks (all by default), or a one-line error."""
        if tasks is None:
            return list(cls.tasks)
        bad = [t for t in tasks if t not in cls.tasks]
        choices = ", ".join(cls.tasks)
        if bad:
            raise PolytaskError(f"suite {cls.name!r} has no task {bad[0]!r}; choose at least two of: {choices}")
        if len(tasks) < 2:
            raise PolytaskError(f"suite {cls.name!r} needs at least two tasks to merge; choose among: {choices}")
        return list(dict.fromkeys(tasks))


def _trainable(body: nn.Module) -> dict[str, Tensor]:
    """Copies of the body's trainable tensors (the merged ones)."""
    return {k: p.detach().clone() for k, p in body.named_parameters() if p.requires_grad}


def splits_of(suite: Any, task: str, stem: Callable[[Any], Tensor]) -> dict[str, Split]:
    """(stem output, labels of ``task``) for each split of a :class:`~polytask.tasks.TaskSuite`."""
    return {s: (stem(getattr(suite, s).x), getattr(suite, s).y[task].long()) for s in SPLITS}


def suite_names() -> list[str]:
    """Registered merge suites, cheapest first."""
    return sorted(MERGE_SUITES.names(), key=lambda n: (SIZE_CLASSES.index(MERGE_SUITES.get(n).size_class), n))


def get_spec(name: str) -> type[SuiteSpec]:
    """The registered :class:`SuiteSpec` of merge suite ``name``, or a one-line error listing the suites."""
    if name not in MERGE_SUITES:
        raise PolytaskError(f"unknown merge suite {name!r}; choose one of: {', '.join(suite_names())}")
    return MERGE_SUITES.get(name)


# --------------------------------------------------------------------------- the loaded suite

@dataclass
class MergeSuite:
    """A built merge suite: pretrained body, fine-tuned tensors per task, heads and data."""

    name: str
    directory: Path
    tasks: list[str]
    body: nn.Module
    heads: dict[str, nn.Module]
    data: dict[str, dict[str, Split]]
    meta: dict[str, Any]
    spec: type[SuiteSpec]

    @property
    def kind(self) -> str:
        return self.spec.kind

    @property
    def base_path(self) -> Path:
        return self.directory / "base.safetensors"

    def model_path(self, task: str) -> Path:
        return self.directory / f"{task}.safetensors"

    @property
    def model_paths(self) -> list[Path]:
        return [self.model_path(t) for t in self.tasks]

    def logits(self, params: dict[str, Tensor], x: Tensor, task: str) -> Tensor:
        """The task's head on the body run with ``params`` (a state dict of the merged tensors)."""
        return self.heads[task](functional_call(self.body, params, (x,)))

    def forward_fn(self) -> Callable[[nn.Module, dict[str, Tensor], Tensor, int], Tensor]:
        """The ``forward(model, params, x, task_index)`` of the learned mergers."""
        return lambda model, params, x, t: self.heads[self.tasks[t]](functional_call(model, params, (x,)))

    @torch.no_grad()
    def accuracy(self, params: dict[str, Tensor], task: str, split: str = "test", batch_size: int = 256,
                 limit: int | None = None) -> float:
        x, y = self.data[task][split]
        if limit is not None:
            x, y = x[:limit], y[:limit]
        correct = 0
        for i in range(0, len(y), batch_size):
            correct += int((self.logits(params, x[i:i + batch_size], task).argmax(-1) == y[i:i + batch_size]).sum())
        return correct / len(y)

    def load_base(self) -> dict[str, Tensor]:
        return load_file(str(self.base_path))

    def load_model(self, task: str) -> dict[str, Tensor]:
        return load_file(str(self.model_path(task)))


def suite_directory(name: str, options: dict[str, Any]) -> Path:
    if not options:
        return merge_cache() / name
    key = hashlib.sha256(json.dumps(options, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return merge_cache() / f"{name}-{key}"


def load_merge_suite(name: str, *, progress: bool = True, rebuild: bool = False, **options: Any) -> MergeSuite:
    """Load merge suite ``name`` from the cache, building it first (with a progress bar) if missing."""
    spec = get_spec(name)
    check_options(spec.prepare, options, f"merge suite {name!r}")
    directory = suite_directory(name, options)
    meta_path = directory / "meta.json"
    resolved = resolved_options(spec, options)
    if rebuild or not meta_path.is_file() or _stale(json.loads(meta_path.read_text()), resolved):
        build_suite(spec, directory, options, progress=progress)
    meta = json.loads(meta_path.read_text())
    tensors = load_file(str(directory / "data.safetensors"))
    tasks = meta["tasks"]
    data = {t: {s: (tensors[f"{t}/{s}/x"], tensors[f"{t}/{s}/y"]) for s in SPLITS} for t in tasks}
    head_sd = load_file(str(directory / "heads.safetensors"))
    heads = {}
    for t in tasks:
        head = nn.Linear(meta["head_in"], meta["classes"][t])
        head.load_state_dict({"weight": head_sd[f"{t}.weight"], "bias": head_sd[f"{t}.bias"]})
        heads[t] = head.requires_grad_(False).eval()
    body = spec.pretrained_body(resolved)
    body.load_state_dict(load_file(str(directory / "base.safetensors")), strict=False)
    body.requires_grad_(False).eval()
    return MergeSuite(name, directory, tasks, body, heads, data, meta, spec)


def resolved_options(spec: type[SuiteSpec], options: dict[str, Any]) -> dict[str, Any]:
    """Every build option of ``spec`` with its default filled in (a changed default rebuilds)."""
    params = inspect.signature(spec.prepare).parameters
    out = {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}
    out.update(options)
    return json.loads(json.dumps(out, default=str))


def _stale(meta: dict[str, Any], resolved: dict[str, Any]) -> bool:
    return meta.get("format") != FORMAT or meta.get("resolved_options") != resolved


# --------------------------------------------------------------------------- the build

def build_suite(spec: type[SuiteSpec], directory: Path, options: dict[str, Any], progress: bool = True) -> dict[str, Any]:
    """Pretrain (digits) or load the backbone, fine-tune one copy per task with the Trainer, write the files."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from polytask.trainer import TrainConfig, Trainer, evaluate_model, seed_everything

    start = time.perf_counter()
    seed = int(options.get("seed", 0))
    threads = torch.get_num_threads()
    with Progress(TextColumn(f"[bold]building {spec.name}[/bold] {{task.description}}"), BarColumn(),
                  MofNCompleteColumn(), TimeElapsedColumn(), disable=not progress, transient=True) as bar, \
            atomic_dir(directory) as tmp:
        job = bar.add_task("preparing data and the pretrained network", total=None)
        prep = spec.prepare(**options)
        names = list(prep.data)
        bar.update(job, total=len(names), completed=0, description="fine-tuning")
        torch.set_num_threads(threads)
        seed_everything(seed)
        base_body = prep.body()
        base = _trainable(base_body)
        head_in = base_body.out_dim
        heads, accuracy, val_accuracy, base_accuracy, probe_accuracy, seconds = {}, {}, {}, {}, {}, {}
        tensors: dict[str, Tensor] = {}
        for i, t in enumerate(names):
            bar.update(job, description=f"fine-tuning {t} ({i + 1}/{len(names)})")
            t0 = time.perf_counter()
            task = Task(t, "multiclass", num_classes=prep.classes[t])
            splits = {s: MultiTaskData(*_xy(prep.data[t][s], t)) for s in SPLITS}
            # 1. linear probe on the frozen pretrained features (LP-FT)
            head = linear_probe(base_body, task, prep.data[t], prep.probe, seed, i)
            # 2. fine-tune body and head together
            body = prep.body()
            net = FineTuneNet(body, head, t)
            probe_accuracy[t] = evaluate_model(net, [task], splits["test"], 256)[t]["accuracy"]
            cfg = TrainConfig(**prep.train, seed=seed, progress=False, num_threads=None)
            Trainer(net, [task], "ew", cfg).fit(splits["train"], splits["val"])
            net.eval()
            accuracy[t] = evaluate_model(net, [task], splits["test"], 256)[t]["accuracy"]
            val_accuracy[t] = evaluate_model(net, [task], splits["val"], 256)[t]["accuracy"]
            tuned = prep.finetuned(body) if prep.finetuned is not None else _trainable(body)
            heads[t] = head
            save_safetensors(tmp / f"{t}.safetensors", tuned, metadata={"polytask_merge": f"{spec.name}/{t}"})  # one key: safetensors orders keys at random
            for s in SPLITS:
                tensors[f"{t}/{s}/x"], tensors[f"{t}/{s}/y"] = prep.data[t][s]
            seconds[t] = round(time.perf_counter() - t0, 2)
            bar.update(job, advance=1)
        if prep.plain is not None:  # LoRA: the base of the folded matrices is the plain pretrained model
            base_body, base = prep.plain()
        save_safetensors(tmp / "base.safetensors", base, metadata={"polytask_merge": f"{spec.name}/base"})
        save_safetensors(tmp / "heads.safetensors", {f"{t}.{k}": v for t, h in heads.items() for k, v in h.state_dict().items()})
        save_safetensors(tmp / "data.safetensors", {k: v.contiguous() for k, v in tensors.items()})
        base_body.load_state_dict(base, strict=False)
        for t in names:
            net = FineTuneNet(base_body, heads[t], t).eval()
            test = MultiTaskData(*_xy(prep.data[t]["test"], t))
            base_accuracy[t] = evaluate_model(net, [Task(t, "multiclass", num_classes=prep.classes[t])], test, 256)[t]["accuracy"]
        meta = {
            "format": FORMAT, "suite": spec.name, "description": spec.description(), "options": options,
            "resolved_options": resolved_options(spec, options),
            "tasks": names, "classes": prep.classes, "head_in": head_in,
            "merged_tensors": len(base), "merged_parameters": int(sum(v.numel() for v in base.values())),
            "finetune": {"probe": prep.probe, "train": prep.train}, "info": prep.info,
            "finetuned_accuracy": accuracy, "finetuned_val_accuracy": val_accuracy, "base_accuracy": base_accuracy, "probe_accuracy": probe_accuracy,
            "samples": {t: {s: len(prep.data[t][s][1]) for s in SPLITS} for t in names},
            "build_seconds": round(time.perf_counter() - start, 1), "task_seconds": seconds, "threads": threads,
        }
        write_json(tmp / "meta.json", meta)
    return meta


def linear_probe(body: nn.Module, task: Task, data: dict[str, Split], probe: dict[str, Any], seed: int,
                 index: int) -> nn.Linear:
    """Step 1 of LP-FT for the ``index``-th task: a linear head trained on the frozen ``body``'s features
    of the task's train split (validation for the best epoch), seeded by (seed, index)."""
    from polytask.trainer import TrainConfig, Trainer, seed_everything

    with torch.no_grad():
        feats = {s: _encode(body, data[s][0]) for s in ("train", "val")}
    seed_everything(seed * 7919 + index)
    head = nn.Linear(body.out_dim, task.num_classes)
    cfg = TrainConfig(**probe, seed=seed, progress=False, num_threads=None)
    Trainer(FineTuneNet(nn.Identity(), head, task.name), [task], "ew", cfg).fit(
        MultiTaskData(feats["train"], {task.name: data["train"][1]}), MultiTaskData(feats["val"], {task.name: data["val"][1]}))
    return head


def _xy(split: Split, task: str) -> tuple[Tensor, dict[str, Tensor]]:
    return split[0], {task: split[1]}


@torch.no_grad()
def _encode(body: nn.Module, x: Tensor, batch_size: int = 128) -> Tensor:
    body.eval()
    return torch.cat([body(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])
