"""The vocabulary's data side: Task, InputSpec, MultiTaskData and TaskSuite."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Iterator, Literal, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from polytask.errors import PolytaskError
from polytask.kinds import KINDS, TaskKind, get_kind

if TYPE_CHECKING:
    import torchmetrics

Inputs = Tensor | dict[str, Tensor]

LOWER_IS_BETTER = frozenset({"mse", "mae", "rmse", "loss", "logloss"})


@dataclass
class Task:
    """One prediction target: its kind, loss, metrics and head.

    ``kind`` names a :mod:`polytask.kinds` kind (binary, multiclass, multilabel, regression, token,
    seq2seq, ranking); ``num_classes`` is the number of classes (multiclass, token), labels
    (multilabel) or vocabulary tokens (seq2seq); binary, regression and ranking tasks have one output.
    """

    name: str
    kind: str
    num_classes: int = 1
    metrics: tuple[str, ...] = ()
    main_metric: str = ""

    def __post_init__(self) -> None:
        kind = get_kind(self.kind, self.name)
        if kind.per_class and self.num_classes < 2:
            raise PolytaskError(f"{self.kind} task {self.name!r} needs num_classes >= 2")
        self.metrics = tuple(self.metrics) or kind.default_metrics
        self.main_metric = self.main_metric or self.metrics[0]
        for m in self.metrics:
            kind.metric(m, max(self.num_classes, 2))

    @property
    def kind_impl(self) -> TaskKind:
        """The :class:`~polytask.kinds.TaskKind` named by ``kind``."""
        return get_kind(self.kind, self.name)

    @property
    def out_dim(self) -> int:
        return self.kind_impl.out_dim(self.num_classes)

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        """Per-sample loss, shape [B]."""
        return self.kind_impl.loss(output, target)

    def predict(self, output: Tensor) -> Tensor:
        """Turn raw outputs into what the metrics consume (probabilities or values)."""
        return self.kind_impl.predict(output)

    def make_metrics(self) -> torchmetrics.MetricCollection:
        import torchmetrics  # on first use: it costs seconds to import, and a command that fails early never needs it

        kind = self.kind_impl
        return torchmetrics.MetricCollection({m: kind.metric(m, self.num_classes) for m in self.metrics})

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
        if _length(xt) == 0:
            raise PolytaskError("the dataset is empty; give at least one sample")
        for key, part in (xt.items() if isinstance(xt, dict) else [("x", xt)]):
            if part.is_floating_point() and not torch.isfinite(part).all():
                bad = int((~torch.isfinite(part.reshape(len(part), -1))).any(-1).sum())
                raise PolytaskError(f"{key} has NaN or infinite features in {bad} samples; impute or drop them first")
        unknown = [k for k in labels if k not in kinds]
        if unknown:
            raise PolytaskError(f"no kind given for task {unknown[0]!r}; pass kinds={{{unknown[0]!r}: {'|'.join(map(repr, KINDS))}}}")
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
            _check_labels(tname, kinds[tname], yt, mask)
            yt, n_cls = get_kind(kinds[tname], tname).labels(yt, mask)
            tasks.append(Task(tname, kinds[tname], num_classes=n_cls))
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
            categorical = get_kind(kind, col).categorical
            s = df[col]
            masks[col] = s.notna().to_numpy()
            if categorical and not is_numeric_dtype(s):
                labels[col] = s.astype("category").cat.codes.clip(lower=0).to_numpy()
            else:
                labels[col] = s.fillna(0).to_numpy(dtype=np.int64 if categorical else np.float32)
        return cls.from_tensors(x, labels, targets, masks=masks, name=name, **kwargs)


def _check_labels(name: str, kind: str, y: Tensor, mask: Tensor) -> None:
    """One-line errors for a task with no labelled sample or class labels out of range."""
    if not mask.any():
        raise PolytaskError(f"task {name!r} has no labelled sample (every label is masked or NaN); give labels or drop the task")
    seen = y[mask]
    if kind == "binary" and not bool(((seen == 0) | (seen == 1)).all()):
        raise PolytaskError(f"task {name!r} is binary but has labels other than 0 and 1 (e.g. {seen[(seen != 0) & (seen != 1)][0].item()}); "
                            "use kind 'multiclass' or map the labels to 0/1")
    if kind == "multiclass" and not bool(((seen >= 0) & (seen == seen.round())).all()):
        raise PolytaskError(f"task {name!r} is multiclass but has labels that are not whole numbers >= 0; number the classes 0..C-1")


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
