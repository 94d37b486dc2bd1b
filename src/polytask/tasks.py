"""The vocabulary's data side: Task, InputSpec, MultiTaskData and TaskSuite."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Iterator, Literal, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import torchmetrics
from torch import Tensor, nn

from polytask.errors import PolytaskError

TaskKind = Literal["binary", "multiclass", "multilabel", "regression"]
KINDS: tuple[str, ...] = ("binary", "multiclass", "multilabel", "regression")
Inputs = Tensor | dict[str, Tensor]

DEFAULT_METRICS: dict[str, tuple[str, ...]] = {
    "binary": ("auroc", "accuracy"),
    "multiclass": ("accuracy", "f1"),
    "multilabel": ("auroc", "f1"),
    "regression": ("mse", "mae"),
}
LOWER_IS_BETTER = frozenset({"mse", "mae", "rmse", "loss"})


def _metric(kind: str, name: str, n: int) -> torchmetrics.Metric:
    """Build the torchmetrics object for metric ``name`` of a task of ``kind`` with ``n`` outputs."""
    tm = torchmetrics
    table: dict[tuple[str, str], Any] = {
        ("binary", "auroc"): lambda: tm.AUROC(task="binary"),
        ("binary", "accuracy"): lambda: tm.Accuracy(task="binary"),
        ("binary", "f1"): lambda: tm.F1Score(task="binary"),
        ("binary", "ap"): lambda: tm.AveragePrecision(task="binary"),
        ("multiclass", "accuracy"): lambda: tm.Accuracy(task="multiclass", num_classes=n, average="micro"),
        ("multiclass", "f1"): lambda: tm.F1Score(task="multiclass", num_classes=n, average="macro"),
        ("multiclass", "auroc"): lambda: tm.AUROC(task="multiclass", num_classes=n),
        ("multilabel", "auroc"): lambda: tm.AUROC(task="multilabel", num_labels=n),
        ("multilabel", "f1"): lambda: tm.F1Score(task="multilabel", num_labels=n, average="macro"),
        ("multilabel", "accuracy"): lambda: tm.Accuracy(task="multilabel", num_labels=n),
        ("multilabel", "ap"): lambda: tm.AveragePrecision(task="multilabel", num_labels=n),
        ("regression", "mse"): lambda: tm.MeanSquaredError(),
        ("regression", "rmse"): lambda: tm.MeanSquaredError(squared=False),
        ("regression", "mae"): lambda: tm.MeanAbsoluteError(),
        ("regression", "r2"): lambda: tm.R2Score(),
    }
    if (kind, name) not in table:
        valid = sorted(m for k, m in table if k == kind)
        raise PolytaskError(f"metric {name!r} does not apply to a {kind} task; use one of: {', '.join(valid)}")
    return table[(kind, name)]()


@dataclass
class Task:
    """One prediction target: its kind, loss, metrics and head.

    ``num_classes`` is the number of classes (multiclass) or labels (multilabel);
    binary and regression tasks have one output.
    """

    name: str
    kind: TaskKind
    num_classes: int = 1
    metrics: tuple[str, ...] = ()
    main_metric: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise PolytaskError(f"task {self.name!r} has kind {self.kind!r}; use one of: {', '.join(KINDS)}")
        if self.kind in ("multiclass", "multilabel") and self.num_classes < 2:
            raise PolytaskError(f"{self.kind} task {self.name!r} needs num_classes >= 2")
        self.metrics = tuple(self.metrics) or DEFAULT_METRICS[self.kind]
        self.main_metric = self.main_metric or self.metrics[0]
        for m in self.metrics:
            _metric(self.kind, m, max(self.num_classes, 2))

    @property
    def out_dim(self) -> int:
        return self.num_classes if self.kind in ("multiclass", "multilabel") else 1

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        """Per-sample loss, shape [B]."""
        if self.kind == "multiclass":
            return F.cross_entropy(output, target.long(), reduction="none")
        if self.kind == "multilabel":
            return F.binary_cross_entropy_with_logits(output, target.float(), reduction="none").mean(-1)
        out = output.reshape(-1)
        if self.kind == "binary":
            return F.binary_cross_entropy_with_logits(out, target.float().reshape(-1), reduction="none")
        return F.mse_loss(out, target.float().reshape(-1), reduction="none")

    def predict(self, output: Tensor) -> Tensor:
        """Turn raw outputs into what the metrics consume (probabilities or values)."""
        if self.kind == "multiclass":
            return output.softmax(-1)
        if self.kind == "multilabel":
            return output.sigmoid()
        out = output.reshape(-1)
        return out.sigmoid() if self.kind == "binary" else out

    def make_metrics(self) -> torchmetrics.MetricCollection:
        return torchmetrics.MetricCollection({m: _metric(self.kind, m, self.num_classes) for m in self.metrics})

    def make_head(self, in_dim: int, hidden: Sequence[int] = ()) -> nn.Module:
        """A tower: optional hidden ReLU layers, then a linear output layer."""
        layers: list[nn.Module] = []
        for h in hidden:
            layers += [nn.Linear(in_dim, h), nn.ReLU()]
            in_dim = h
        layers.append(nn.Linear(in_dim, self.out_dim))
        return nn.Sequential(*layers)

    @staticmethod
    def higher_is_better(metric: str) -> bool:
        return metric not in LOWER_IS_BETTER


@dataclass
class InputSpec:
    """What one input sample looks like, so a backbone can be built for it.

    kinds: ``dense`` (a float vector of ``dim``), ``image`` (float ``shape`` C,H,W),
    ``recsys`` (dict with ``fields`` [F] long ids, ``seqs`` [S, L] item ids with 0 as
    padding, ``dense`` [D] floats), ``features`` (precomputed embeddings of ``dim``),
    ``tokens`` (dict with ``input_ids`` and ``attention_mask`` [seq_len] for a text encoder).
    """

    kind: Literal["dense", "image", "recsys", "features", "tokens"]
    dim: int = 0
    shape: tuple[int, ...] = ()
    field_vocab: tuple[int, ...] = ()
    seq_names: tuple[str, ...] = ()
    item_vocab: int = 0
    seq_len: int = 0
    dense_dim: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


def _index(x: Inputs, idx: Tensor) -> Inputs:
    return {k: v[idx] for k, v in x.items()} if isinstance(x, dict) else x[idx]


def _length(x: Inputs) -> int:
    if isinstance(x, dict):
        lengths = {len(v) for v in x.values()}
        if len(lengths) != 1:
            raise PolytaskError(f"input fields have different lengths {sorted(lengths)}; give every field one row per sample")
        return lengths.pop()
    return len(x)


@dataclass
class Batch:
    """A batch: inputs, labels and masks per task; ``full`` names the tasks labelled on every sample."""

    x: Inputs
    y: dict[str, Tensor]
    mask: dict[str, Tensor]
    full: frozenset[str] = frozenset()

    def __len__(self) -> int:
        return _length(self.x)

    def subset(self, idx: Tensor) -> Batch:
        return Batch(_index(self.x, idx), {k: v[idx] for k, v in self.y.items()},
                     {k: v[idx] for k, v in self.mask.items()}, self.full)


@dataclass
class MultiTaskData:
    """Inputs plus one label tensor and one boolean mask per task (False = label missing)."""

    x: Inputs
    y: dict[str, Tensor]
    mask: dict[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = _length(self.x)
        if n == 0:
            raise PolytaskError("the dataset is empty; give at least one sample")
        for name, y in self.y.items():
            if len(y) != n:
                raise PolytaskError(f"labels of task {name!r} have {len(y)} rows but the inputs have {n}; give one label per sample")
            m = self.mask.get(name)
            if m is None:
                self.mask[name] = torch.ones(n, dtype=torch.bool)
            elif len(m) != n:
                raise PolytaskError(f"mask of task {name!r} has {len(m)} rows but the inputs have {n}")
            else:
                self.mask[name] = m.bool()

    def __len__(self) -> int:
        return _length(self.x)

    def subset(self, idx: Tensor | Sequence[int]) -> MultiTaskData:
        idx = torch.as_tensor(idx, dtype=torch.long)
        return MultiTaskData(_index(self.x, idx), {k: v[idx] for k, v in self.y.items()},
                             {k: v[idx] for k, v in self.mask.items()})

    def select_tasks(self, names: Sequence[str]) -> MultiTaskData:
        return MultiTaskData(self.x, {n: self.y[n] for n in names}, {n: self.mask[n] for n in names})

    def batches(self, batch_size: int, shuffle: bool = False,
                generator: torch.Generator | None = None, drop_last: bool = False) -> Iterator[Batch]:
        """Yield in-memory batches; indexing whole tensors is much faster than a DataLoader."""
        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        stop = n - n % batch_size if drop_last and n >= batch_size else n
        whole = Batch(self.x, self.y, self.mask, frozenset(k for k, m in self.mask.items() if bool(m.all())))
        for start in range(0, stop, batch_size):
            yield whole.subset(order[start:start + batch_size])


@dataclass
class TaskSuite:
    """Tasks plus their data splits (joint route: one input stream with several labels)."""

    name: str
    tasks: list[Task]
    input_spec: InputSpec
    train: MultiTaskData
    val: MultiTaskData
    test: MultiTaskData
    description: str = ""

    def __post_init__(self) -> None:
        names = [t.name for t in self.tasks]
        if not names:
            raise PolytaskError(f"suite {self.name!r} has no tasks; give at least one")
        if len(set(names)) != len(names):
            raise PolytaskError(f"suite {self.name!r} has duplicate task names {names}")
        for split in ("train", "val", "test"):
            data = getattr(self, split)
            missing = [n for n in names if n not in data.y]
            if missing:
                raise PolytaskError(f"the {split} split of suite {self.name!r} has no labels for task {missing[0]!r}")

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def task(self, name: str) -> Task:
        for t in self.tasks:
            if t.name == name:
                return t
        raise PolytaskError(f"suite {self.name!r} has no task {name!r}; its tasks are: {', '.join(self.task_names)}")

    def restrict(self, names: Sequence[str]) -> TaskSuite:
        """The same data with only the tasks ``names`` (e.g. for single-task baselines)."""
        tasks = [self.task(n) for n in names]
        return replace(self, tasks=tasks, train=self.train.select_tasks(names),
                       val=self.val.select_tasks(names), test=self.test.select_tasks(names))

    @classmethod
    def from_tensors(cls, x: Inputs | np.ndarray, labels: Mapping[str, Tensor | np.ndarray],
                     kinds: Mapping[str, str], masks: Mapping[str, Tensor | np.ndarray] | None = None,
                     name: str = "custom", val_fraction: float = 0.15, test_fraction: float = 0.15,
                     seed: int = 0, input_spec: InputSpec | None = None) -> TaskSuite:
        """Build a suite from arrays: ``x`` [N, ...], ``labels`` {task: [N] or [N, L]}, ``kinds`` {task: kind}.

        Class counts are inferred from the labels; samples are split at random with ``seed``.
        A mask entry False (or a NaN label) marks a missing label.
        """
        xt: Inputs = {k: _tensor(v) for k, v in x.items()} if isinstance(x, dict) else _tensor(x)
        if not isinstance(xt, dict) and xt.is_floating_point():
            xt = xt.float()
        unknown = [k for k in labels if k not in kinds]
        if unknown:
            raise PolytaskError(f"no kind given for task {unknown[0]!r}; pass kinds={{{unknown[0]!r}: 'binary'|'multiclass'|'multilabel'|'regression'}}")
        ys: dict[str, Tensor] = {}
        ms: dict[str, Tensor] = {}
        tasks: list[Task] = []
        for tname, y in labels.items():
            yt = _tensor(y)
            mask = _tensor(masks[tname]).bool() if masks and tname in masks else torch.ones(len(yt), dtype=torch.bool)
            if yt.is_floating_point():
                nan = torch.isnan(yt).reshape(len(yt), -1).any(-1)
                mask = mask & ~nan
                yt = torch.nan_to_num(yt)
            kind = kinds[tname]
            n_cls = 1
            if kind == "multiclass":
                yt = yt.long()
                n_cls = int(yt[mask].max().item()) + 1 if mask.any() else 2
            elif kind == "multilabel":
                yt = yt.float()
                n_cls = yt.shape[1] if yt.dim() == 2 else 0
            else:
                yt = yt.float()
            tasks.append(Task(tname, kind, num_classes=n_cls))  # type: ignore[arg-type]
            ys[tname], ms[tname] = yt, mask
        data = MultiTaskData(xt, ys, ms)
        spec = input_spec or _infer_spec(xt)
        train, val, test = split_data(data, val_fraction, test_fraction, seed)
        return cls(name, tasks, spec, train, val, test)

    @classmethod
    def from_dataframe(cls, df: Any, features: Sequence[str], targets: Mapping[str, str],
                       name: str = "custom", **kwargs: Any) -> TaskSuite:
        """Build a suite from a pandas DataFrame: numeric ``features`` columns and ``targets`` {column: kind}.

        Non-numeric target columns of a multiclass task are encoded as category codes; missing
        target values become masked labels.
        """
        missing = [c for c in list(features) + list(targets) if c not in df.columns]
        if missing:
            raise PolytaskError(f"the DataFrame has no column {missing[0]!r}; its columns are: {', '.join(map(str, df.columns))}")
        from pandas.api.types import is_numeric_dtype

        x = df[list(features)].to_numpy(dtype=np.float32)
        labels: dict[str, np.ndarray] = {}
        masks: dict[str, np.ndarray] = {}
        for col, kind in targets.items():
            s = df[col]
            masks[col] = s.notna().to_numpy()
            if kind == "multiclass" and not is_numeric_dtype(s):
                labels[col] = s.astype("category").cat.codes.clip(lower=0).to_numpy()
            else:
                labels[col] = s.fillna(0).to_numpy(dtype=np.float32 if kind != "multiclass" else np.int64)
        return cls.from_tensors(x, labels, targets, masks=masks, name=name, **kwargs)


def _tensor(v: Any) -> Tensor:
    """A tensor from a tensor or array-like (arrays are copied: they may be read-only)."""
    return v if isinstance(v, Tensor) else torch.from_numpy(np.array(v))


def _infer_spec(x: Inputs) -> InputSpec:
    if isinstance(x, dict):
        raise PolytaskError("dict inputs need an explicit input_spec=InputSpec(kind='recsys', ...)")
    if x.dim() == 2:
        return InputSpec("dense", dim=x.shape[1])
    if x.dim() == 4:
        return InputSpec("image", shape=tuple(x.shape[1:]))
    raise PolytaskError(f"inputs of shape {tuple(x.shape)} are neither [N, D] vectors nor [N, C, H, W] images; reshape them or pass input_spec")


def split_data(data: MultiTaskData, val_fraction: float, test_fraction: float,
               seed: int) -> tuple[MultiTaskData, MultiTaskData, MultiTaskData]:
    """A seeded random train/val/test split."""
    n = len(data)
    n_val, n_test = int(round(n * val_fraction)), int(round(n * test_fraction))
    if n - n_val - n_test < 1 or n_val < 1 or n_test < 1:
        raise PolytaskError(f"{n} samples are too few to split into train/val/test; give at least 3 samples")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return (data.subset(perm[n_val + n_test:]), data.subset(perm[:n_val]), data.subset(perm[n_val:n_val + n_test]))
