"""Merge suites: one pretrained network, one fine-tuned copy of it per task, built offline and cached.

A merge suite is the data of the task-arithmetic benchmark (Ilharco et al., ICLR 2023; TIES,
AdaMerging, aTLAS and Twin-Merging use the same protocol): a pretrained *body* θ_0, one
fine-tuned body θ_t per task, and each task's own classification head. Heads are never merged;
a merged body is evaluated with every task's own fine-tuned head.

Each network is split into a frozen *stem* (run once per sample; its outputs are stored with the
suite) and the *body*, whose trainable tensors are the ones fine-tuned, saved and merged:

* ``digits-merge``: scikit-learn's 8x8 digits. A 64-128-128 ReLU MLP is pretrained by polytask
  itself on a self-supervised pretext task, rotation prediction (which of 0/90/180/270 degrees;
  Gidaris et al., ICLR 2018), then fine-tuned on six tasks: ``digit`` (10), ``parity`` (2),
  ``mod3`` (3), ``large`` (digit >= 5), ``mirror`` (digit of the left-right flipped image) and
  ``invert`` (digit of the image 1 - x). Stem: none. Merged: every MLP weight and bias.
* ``vision-merge``: ImageNet EfficientNet-Lite0 at 64x64 pixels on ``mnist``, ``fashion-mnist``,
  sklearn ``digits``, ``multi-mnist-left`` and ``multi-mnist-right`` (subsets). Stem (frozen,
  cached): the convolution stem and blocks 0-10. Merged: blocks 11-15 and the 1x1 head
  convolution with their BatchNorm scales and shifts (2.67M of 3.4M parameters).
* ``text-merge``: all-MiniLM-L6-v2 (mean pooling) on ``wordnet-pos``, ``wordnet-topic``,
  ``fortunes`` (topic) and ``tweet-sentiment``; fine-tuned fully except the embeddings (frozen).
  Merged: the six transformer layers (10.6M parameters).
* ``text-merge-lora``: the same tasks, with per-task LoRA adapters (r = 8, α = 16 on the
  attention query and value projections, via peft). The task vector of a LoRA model is its
  adapter folded into the dense weights, τ_t = (α/r)·B_t A_t on each query/value matrix
  (peft's ``merge_and_unload``); the merged tensors are those twelve matrices.

Fine-tuning is LP-FT (Kumar et al., ICLR 2022): a linear probe on the frozen pretrained features
first, then body and head together, both with the shared :class:`~polytask.trainer.Trainer`.
Dropout and BatchNorm statistics stay in evaluation mode throughout, so BatchNorm running
statistics are the pretrained ones in every model and are not merged. Everything is seeded; on
CPU a build gives the same bytes every time. Files: ``base.safetensors``, ``<task>.safetensors``
(the fine-tuned merged tensors), ``heads.safetensors``, ``data.safetensors`` (stem outputs and
labels) and ``meta.json`` (written last) under ``<cache>/merge/<suite>/`` (non-default options:
``<suite>-<hash>/``).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file
from torch import Tensor, nn
from torch.func import functional_call

from polytask.errors import PolytaskError
from polytask.io import save_safetensors, write_json
from polytask.registry import check_options
from polytask.tasks import MultiTaskData, Task

FORMAT = 1
Split = tuple[Tensor, Tensor]


def merge_cache() -> Path:
    from polytask.io import cache_dir

    return cache_dir() / "merge"


# --------------------------------------------------------------------------- modules

class FineTuneNet(nn.Module):
    """body -> task head, as the Trainer wants it (``forward(x) -> {task: logits}``).

    ``train()`` keeps the body in evaluation mode (no dropout, frozen BatchNorm statistics).
    """

    def __init__(self, body: nn.Module, head: nn.Module, task: str) -> None:
        super().__init__()
        self.body, self.head, self.task = body, head, task

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {self.task: self.head(self.body(x))}

    def train(self, mode: bool = True) -> FineTuneNet:
        super().train(mode)
        self.body.eval()
        return self


class DigitsBody(nn.Module):
    """The digits-merge MLP: flattened 8x8 image -> two ReLU layers."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.out_dim = hidden

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class EfficientNetTail(nn.Module):
    """Blocks ``start``.. of an EfficientNet, its head convolution and global average pooling."""

    def __init__(self, net: nn.Module, start: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(list(net._blocks)[start:])
        self.conv_head, self.bn1, self.act = net._conv_head, net._bn1, net._swish
        self.out_dim = 1280

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return self.act(self.bn1(self.conv_head(x))).mean((2, 3))


class MiniLMBody(nn.Module):
    """A Hugging Face BERT encoder on packed tokens [B, 2, L] (ids, attention mask), mean-pooled."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.out_dim = 384

    def forward(self, x: Tensor) -> Tensor:
        ids, mask = x[:, 0], x[:, 1]
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


# --------------------------------------------------------------------------- suite specs

@dataclass
class Prepared:
    """What a builder hands to the generic fine-tuning loop."""

    body: Callable[[], nn.Module]              # a fresh body holding the pretrained weights
    data: dict[str, dict[str, Split]]          # task -> split -> (stem output, labels)
    classes: dict[str, int]
    train: dict[str, Any]                      # TrainConfig fields for fine-tuning
    probe: dict[str, Any]                      # TrainConfig fields for the linear probe
    finetuned: Callable[[nn.Module], dict[str, Tensor]] | None = None  # merged tensors of a fine-tuned body
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SuiteSpec:
    name: str
    description: str
    prepare: Callable[..., Prepared]
    tasks: tuple[str, ...]
    kind: str  # "dense" (vmap-friendly) or "text"


def _trainable(body: nn.Module) -> dict[str, Tensor]:
    return {k: p.detach().clone() for k, p in body.named_parameters() if p.requires_grad}


def _splits_of(suite: Any, task: str, stem: Callable[[Any], Tensor]) -> dict[str, Split]:
    return {s: (stem(getattr(suite, s).x), getattr(suite, s).y[task].long()) for s in ("train", "val", "test")}


# digits ---------------------------------------------------------------------------------

DIGITS_TASKS = ("digit", "parity", "mod3", "large", "mirror", "invert")


def _digits_images() -> tuple[Tensor, Tensor, list[Tensor]]:
    from sklearn.datasets import load_digits

    from polytask.data._sources import seeded_splits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    return x, y, list(seeded_splits(len(y), 0.2, 0.2, 0))


def _digits_task(task: str, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    return {
        "digit": (x, y), "parity": (x, y % 2), "mod3": (x, y % 3), "large": (x, (y >= 5).long()),
        "mirror": (x.flip(-1), y), "invert": (1.0 - x, y),
    }[task]


def prepare_digits(*, tasks: list[str] | None = None, hidden: int = 128, pretrain_epochs: int = 5,
                   probe_epochs: int = 20, epochs: int = 20, lr: float = 1e-3, seed: int = 0) -> Prepared:
    """Pretrain the MLP by rotation prediction, then hand over the six digit tasks."""
    from polytask.trainer import TrainConfig, Trainer, seed_everything

    names = _check_tasks("digits-merge", tasks, DIGITS_TASKS)
    x, y, (tr, va, te) = _digits_images()
    rot = lambda imgs: torch.cat([imgs.rot90(k, (2, 3)) for k in range(4)])  # noqa: E731
    rot_y = lambda n: torch.arange(4).repeat_interleave(n)  # noqa: E731
    seed_everything(seed)
    body = DigitsBody(hidden)
    pretext = FineTuneNet(body, nn.Linear(hidden, 4), "rotation")
    cfg = TrainConfig(epochs=pretrain_epochs, batch_size=64, lr=lr, seed=seed, progress=False, num_threads=None)
    Trainer(pretext, [Task("rotation", "multiclass", num_classes=4)], "ew", cfg).fit(
        MultiTaskData(rot(x[tr]), {"rotation": rot_y(len(tr))}), MultiTaskData(rot(x[va]), {"rotation": rot_y(len(va))}))
    base = {k: v.detach().clone() for k, v in body.state_dict().items()}

    def fresh() -> nn.Module:
        b = DigitsBody(hidden)
        b.load_state_dict(base)
        return b

    data = {}
    for t in names:
        data[t] = {s: _digits_task(t, x[idx], y[idx]) for s, idx in (("train", tr), ("val", va), ("test", te))}
    classes = {t: int(data[t]["train"][1].max()) + 1 for t in names}
    return Prepared(fresh, data, classes,
                    train={"epochs": epochs, "batch_size": 64, "lr": lr},
                    probe={"epochs": probe_epochs, "batch_size": 64, "lr": 1e-2},
                    info={"pretext": "rotation prediction", "hidden": hidden})


# vision ---------------------------------------------------------------------------------

VISION_TASKS = ("mnist", "fashion-mnist", "digits", "multi-mnist-left", "multi-mnist-right")


def _vision_splits(task: str, subset: int, seed: int, stem: Callable[[Tensor], Tensor]) -> dict[str, Split]:
    from polytask.registry import SUITES

    if task == "digits":
        x, y, idx = _digits_images()
        return {s: (stem(x[i]), y[i]) for s, i in zip(("train", "val", "test"), idx)}
    if task.startswith("multi-mnist-"):
        side = task.rsplit("-", 1)[1]
        return _splits_of(SUITES.create("multi-mnist", subset=subset, seed=seed, tasks=[side]), side, stem)
    label = "digit" if task == "mnist" else "category"
    return _splits_of(SUITES.create(task, subset=subset, seed=seed, tasks=[label]), label, stem)


def _efficientnet(image_size: int) -> Any:
    from polytask.models.pretrained import EfficientNetLite0
    from polytask.tasks import InputSpec

    enc = EfficientNetLite0(InputSpec("image", shape=(1, 28, 28)), finetune="full", image_size=image_size, cache=False)
    return enc.eval()


def prepare_vision(*, tasks: list[str] | None = None, subset: int = 2000, image_size: int = 64, first_block: int = 11,
                   probe_epochs: int = 10, epochs: int = 2, lr: float = 1e-4, seed: int = 0) -> Prepared:
    """EfficientNet-Lite0: cache the frozen stem's outputs, fine-tune blocks ``first_block``.. per task."""
    names = _check_tasks("vision-merge", tasks, VISION_TASKS)
    if not 1 <= first_block <= 15:
        raise PolytaskError(f"first_block must be between 1 and 15, not {first_block}")
    enc = _efficientnet(image_size)
    net = enc.encoder

    @torch.no_grad()
    def stem(x: Tensor) -> Tensor:
        outs = []
        for i in range(0, len(x), 256):
            xb = x[i:i + 256].float().expand(-1, 3, -1, -1)
            xb = torch.nn.functional.interpolate(xb, size=(image_size, image_size), mode="bilinear", align_corners=False)
            h = net._swish(net._bn0(net._conv_stem((xb - enc.mean) / enc.std)))
            for block in list(net._blocks)[:first_block]:
                h = block(h)
            outs.append(h)
        return torch.cat(outs)

    data = {t: _vision_splits(t, subset, seed, stem) for t in names}
    classes = {t: int(data[t]["train"][1].max()) + 1 for t in names}
    return Prepared(lambda: vision_body(image_size, first_block), data, classes, train={"epochs": epochs, "batch_size": 32, "lr": lr},
                    probe={"epochs": probe_epochs, "batch_size": 128, "lr": 1e-2},
                    info={"image_size": image_size, "first_block": first_block, "subset": subset})


# text -----------------------------------------------------------------------------------

TEXT_TASKS = ("wordnet-pos", "wordnet-topic", "fortunes", "tweet-sentiment")


def _text_source(task: str, subset: int, seed: int, seq_len: int) -> tuple[Any, str]:
    from polytask.registry import SUITES

    if task.startswith("wordnet-"):
        label = task.split("-", 1)[1]
        return SUITES.create("wordnet", subset=subset, seed=seed, seq_len=seq_len, tasks=[label]), label
    if task == "fortunes":
        return SUITES.create("fortunes", subset=subset, seed=seed, seq_len=seq_len, tasks=["topic"]), "topic"
    return SUITES.create("tweet-sentiment", subset=subset, seed=seed, seq_len=seq_len, tasks=["sentiment"]), "sentiment"


def _pack(x: dict[str, Tensor]) -> Tensor:
    """Tokens as one tensor [N, 2, L] (ids, mask), trimmed to the longest sequence."""
    length = max(int(x["attention_mask"].sum(1).max()), 1)
    return torch.stack([x["input_ids"][:, :length], x["attention_mask"][:, :length]], 1)


def prepare_text(*, lora: bool = False, tasks: list[str] | None = None, subset: int = 1000, seq_len: int = 48,
                 probe_epochs: int = 20, epochs: int = 1, lr: float | None = None, r: int = 8, alpha: float = 16.0,
                 seed: int = 0) -> Prepared:
    """MiniLM: fully fine-tuned transformer layers, or LoRA adapters folded into the weights."""
    names = _check_tasks("text-merge-lora" if lora else "text-merge", tasks, TEXT_TASKS)

    def folded(body: nn.Module) -> dict[str, Tensor]:
        """LoRA: W + (α/r)·B·A for every adapted matrix, under the plain model's tensor names."""
        dense = body.model.merge_and_unload()
        return {f"model.{k}": v.detach().clone() for k, v in dense.state_dict().items() if _lora_target(k)}

    data, classes = {}, {}
    for t in names:
        suite, label = _text_source(t, subset, seed, seq_len)
        data[t] = _splits_of(suite, label, _pack)
        classes[t] = int(max(int(s[1].max()) for s in data[t].values())) + 1
    return Prepared(lambda: text_body("lora" if lora else "full", r, alpha), data, classes,
                    train={"epochs": epochs, "batch_size": 16, "lr": lr or (5e-4 if lora else 5e-5)},
                    probe={"epochs": probe_epochs, "batch_size": 128, "lr": 1e-2},
                    finetuned=folded if lora else None,
                    info={"subset": subset, "seq_len": seq_len, "lora": {"r": r, "alpha": alpha} if lora else None})


def _lora_target(key: str) -> bool:
    return key.endswith(("attention.self.query.weight", "attention.self.value.weight"))


def text_body(mode: str = "full", r: int = 8, alpha: float = 16.0) -> nn.Module:
    """Pretrained MiniLM: ``full`` (embeddings and pooler frozen), ``lora`` (peft adapters) or ``plain``
    (no adapters, nothing trainable; LoRA suites are evaluated on it with the adapters folded in)."""
    from polytask.models.pretrained import MiniLM
    from polytask.tasks import InputSpec

    enc = MiniLM(InputSpec("tokens", seq_len=8), finetune="lora" if mode == "lora" else "full", r=r, alpha=alpha,
                 cache=False).encoder
    if mode == "full":
        enc.embeddings.requires_grad_(False)
        enc.pooler.requires_grad_(False)
    return MiniLMBody(enc).eval()


def vision_body(image_size: int = 64, first_block: int = 11) -> nn.Module:
    return EfficientNetTail(_efficientnet(image_size).encoder, first_block).eval()


def make_body(name: str, options: dict[str, Any]) -> nn.Module:
    """The body architecture of suite ``name`` with its pretrained (package) weights; the suite's
    ``base.safetensors`` is loaded over it."""
    if name == "digits-merge":
        return DigitsBody(options.get("hidden", 128))
    if name == "vision-merge":
        return vision_body(options.get("image_size", 64), options.get("first_block", 11))
    return text_body("full" if name == "text-merge" else "plain")


SPECS: dict[str, SuiteSpec] = {
    "digits-merge": SuiteSpec("digits-merge", "MLP pretrained by rotation prediction on sklearn digits; 6 digit tasks",
                              prepare_digits, DIGITS_TASKS, "dense"),
    "vision-merge": SuiteSpec("vision-merge", "ImageNet EfficientNet-Lite0 fine-tuned on 5 image tasks (last blocks)",
                              prepare_vision, VISION_TASKS, "dense"),
    "text-merge": SuiteSpec("text-merge", "all-MiniLM-L6-v2 fully fine-tuned on 4 text tasks",
                            lambda **o: prepare_text(lora=False, **o), TEXT_TASKS, "text"),
    "text-merge-lora": SuiteSpec("text-merge-lora", "all-MiniLM-L6-v2 with per-task LoRA adapters on 4 text tasks",
                                 lambda **o: prepare_text(lora=True, **o), TEXT_TASKS, "text"),
}
_PREPARE_SIGNATURE = {"digits-merge": prepare_digits, "vision-merge": prepare_vision,
                      "text-merge": prepare_text, "text-merge-lora": prepare_text}


def _check_tasks(suite: str, tasks: list[str] | None, valid: tuple[str, ...]) -> list[str]:
    if tasks is None:
        return list(valid)
    bad = [t for t in tasks if t not in valid]
    if bad or len(tasks) < 2:
        raise PolytaskError(f"suite {suite!r} has no task {bad[0]!r}; choose at least two of: {', '.join(valid)}" if bad
                            else f"suite {suite!r} needs at least two tasks to merge; choose among: {', '.join(valid)}")
    return list(dict.fromkeys(tasks))


def suite_names() -> list[str]:
    return list(SPECS)


def get_spec(name: str) -> SuiteSpec:
    if name not in SPECS:
        raise PolytaskError(f"unknown merge suite {name!r}; choose one of: {', '.join(SPECS)}")
    return SPECS[name]


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
    kind: str

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
    check_options(_PREPARE_SIGNATURE[name], options, f"merge suite {name!r}")
    if "lora" in options:
        raise PolytaskError(f"merge suite {name!r} has no option 'lora'; pick text-merge or text-merge-lora")
    directory = suite_directory(name, options)
    meta_path = directory / "meta.json"
    resolved = resolved_options(name, options)
    if rebuild or not meta_path.is_file() or _stale(json.loads(meta_path.read_text()), resolved):
        build_suite(spec, directory, options, progress=progress)
    meta = json.loads(meta_path.read_text())
    tensors = load_file(str(directory / "data.safetensors"))
    tasks = meta["tasks"]
    data = {t: {s: (tensors[f"{t}/{s}/x"], tensors[f"{t}/{s}/y"]) for s in ("train", "val", "test")} for t in tasks}
    head_sd = load_file(str(directory / "heads.safetensors"))
    heads = {}
    for t in tasks:
        head = nn.Linear(meta["head_in"], meta["classes"][t])
        head.load_state_dict({"weight": head_sd[f"{t}.weight"], "bias": head_sd[f"{t}.bias"]})
        heads[t] = head.requires_grad_(False).eval()
    body = make_body(name, options)
    body.load_state_dict(load_file(str(directory / "base.safetensors")), strict=False)
    body.requires_grad_(False).eval()
    return MergeSuite(name, directory, tasks, body, heads, data, meta, spec.kind)


def resolved_options(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """Every build option of suite ``name`` with its default filled in (a changed default rebuilds)."""
    import inspect

    params = inspect.signature(_PREPARE_SIGNATURE[name]).parameters
    out = {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty and k != "lora"}
    out.update(options)
    return json.loads(json.dumps(out, default=str))


def _stale(meta: dict[str, Any], resolved: dict[str, Any]) -> bool:
    return meta.get("format") != FORMAT or meta.get("resolved_options") != resolved


def build_suite(spec: SuiteSpec, directory: Path, options: dict[str, Any], progress: bool = True) -> dict[str, Any]:
    """Pretrain (digits) or load the backbone, fine-tune one copy per task with the Trainer, write the files."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from polytask.trainer import TrainConfig, Trainer, evaluate_model, seed_everything

    start = time.perf_counter()
    seed = int(options.get("seed", 0))
    threads = torch.get_num_threads()
    with Progress(TextColumn(f"[bold]building {spec.name}[/bold] {{task.description}}"), BarColumn(),
                  MofNCompleteColumn(), TimeElapsedColumn(), disable=not progress, transient=True) as bar:
        job = bar.add_task("preparing data and the pretrained network", total=None)
        prep = spec.prepare(**options)
        names = list(prep.data)
        bar.update(job, total=len(names), completed=0, description="fine-tuning")
        torch.set_num_threads(threads)
        seed_everything(seed)
        base_body = prep.body()
        base = _trainable(base_body)
        head_in = base_body.out_dim
        tmp = directory.with_name(f".{directory.name}.building")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        heads, accuracy, val_accuracy, base_accuracy, probe_accuracy, seconds = {}, {}, {}, {}, {}, {}
        tensors: dict[str, Tensor] = {}
        for i, t in enumerate(names):
            bar.update(job, description=f"fine-tuning {t} ({i + 1}/{len(names)})")
            t0 = time.perf_counter()
            task = Task(t, "multiclass", num_classes=prep.classes[t])
            splits = {s: MultiTaskData(*_xy(prep.data[t][s], t)) for s in ("train", "val", "test")}
            # 1. linear probe on the frozen pretrained features (LP-FT)
            with torch.no_grad():
                feats = {s: _encode(base_body, prep.data[t][s][0]) for s in ("train", "val")}
            seed_everything(seed * 7919 + i)
            head = nn.Linear(head_in, prep.classes[t])
            probe = FineTuneNet(nn.Identity(), head, t)
            pcfg = TrainConfig(**prep.probe, seed=seed, progress=False, num_threads=None)
            Trainer(probe, [task], "ew", pcfg).fit(MultiTaskData(feats["train"], {t: prep.data[t]["train"][1]}),
                                                   MultiTaskData(feats["val"], {t: prep.data[t]["val"][1]}))
            # 2. fine-tune body and head together
            body = prep.body()
            net = FineTuneNet(body, head, t)
            probe_accuracy[t] = evaluate_model(net, [task], splits["test"], 256)[t]["accuracy"]
            cfg = TrainConfig(**prep.train, seed=seed, progress=False, num_threads=None)
            Trainer(net, [task], "ew", cfg).fit(splits["train"], splits["val"])
            net.eval()
            accuracy[t] = evaluate_model(net, [task], splits["test"], 256)[t]["accuracy"]
            val_accuracy[t] = evaluate_model(net, [task], splits["val"], 256)[t]["accuracy"]
            tuned = prep.finetuned(body) if prep.finetuned else _trainable(body)
            heads[t] = head
            save_safetensors(tmp / f"{t}.safetensors", tuned, metadata={"polytask_merge": f"{spec.name}/{t}"})  # one key: safetensors orders keys at random
            for s in ("train", "val", "test"):
                tensors[f"{t}/{s}/x"], tensors[f"{t}/{s}/y"] = prep.data[t][s]
            seconds[t] = round(time.perf_counter() - t0, 2)
            bar.update(job, advance=1)
        if prep.finetuned:  # LoRA: the base of the folded matrices is the plain pretrained model
            plain = text_body("plain")
            base = {k: v.detach().clone() for k, v in plain.state_dict().items() if _lora_target(k.removeprefix("model."))}
            base_body = plain
        save_safetensors(tmp / "base.safetensors", base, metadata={"polytask_merge": f"{spec.name}/base"})
        save_safetensors(tmp / "heads.safetensors", {f"{t}.{k}": v for t, h in heads.items() for k, v in h.state_dict().items()})
        save_safetensors(tmp / "data.safetensors", {k: v.contiguous() for k, v in tensors.items()})
        base_body.load_state_dict(base, strict=False)
        for t in names:
            net = FineTuneNet(base_body, heads[t], t).eval()
            test = MultiTaskData(*_xy(prep.data[t]["test"], t))
            base_accuracy[t] = evaluate_model(net, [Task(t, "multiclass", num_classes=prep.classes[t])], test, 256)[t]["accuracy"]
        meta = {
            "format": FORMAT, "suite": spec.name, "description": spec.description, "options": options, "resolved_options": resolved_options(spec.name, options),
            "tasks": names, "classes": prep.classes, "head_in": head_in,
            "merged_tensors": len(base), "merged_parameters": int(sum(v.numel() for v in base.values())),
            "finetune": {"probe": prep.probe, "train": prep.train}, "info": prep.info,
            "finetuned_accuracy": accuracy, "finetuned_val_accuracy": val_accuracy, "base_accuracy": base_accuracy, "probe_accuracy": probe_accuracy,
            "samples": {t: {s: len(prep.data[t][s][1]) for s in ("train", "val", "test")} for t in names},
            "build_seconds": round(time.perf_counter() - start, 1), "task_seconds": seconds, "threads": threads,
        }
        write_json(tmp / "meta.json", meta)
        shutil.rmtree(directory, ignore_errors=True)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(directory)
    return meta


def _xy(split: Split, task: str) -> tuple[Tensor, dict[str, Tensor]]:
    return split[0], {task: split[1]}


@torch.no_grad()
def _encode(body: nn.Module, x: Tensor, batch_size: int = 128) -> Tensor:
    body.eval()
    return torch.cat([body(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])
