"""Frozen-feature caching: run a frozen pretrained encoder once per distinct sample, keep the result on disk.

Two ways in, both backed by the same :class:`FeatureCache`:

* a frozen pretrained backbone (``minilm``, ``efficientnet-lite0`` with ``finetune="frozen"``, the
  default, and ``cache=True``, the default) looks each sample of a batch up by the hash of its bytes,
  encodes only the misses, and stores them; so ``polytask train --suite wordnet --backbone minilm``
  pays for the encoder in the first epoch only, and later runs not at all;
* :func:`featurize` (or the suite option ``features="minilm"``) turns a whole suite into a
  ``features`` suite (``InputSpec("features", dim)``) whose default backbone is ``identity``: the
  model then holds only the small task-specific and shared layers.

Entries live in ``<cache>/features/<backbone>-<hash of weights file and preprocessing options>/``
as append-only safetensors shards (``keys`` [N, 16] uint8 digests, ``features`` [N, D]).
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors.torch import load_file
from torch import Tensor

from polytask.errors import PolytaskError
from polytask.io import cache_dir, save_safetensors
from polytask.registry import BACKBONES
from polytask.sources import fingerprint
from polytask.tasks import Inputs, InputSpec, MultiTaskData, TaskSuite


def row_keys(x: Inputs) -> list[bytes]:
    """A 16-byte digest of every sample's bytes (all fields of a dict input, in key order)."""
    parts = [x[k] for k in sorted(x)] if isinstance(x, dict) else [x]
    n = len(parts[0])
    rows = np.concatenate([p.detach().cpu().contiguous().reshape(n, -1).numpy().view(np.uint8).reshape(n, -1)
                           for p in parts], axis=1)
    return [hashlib.blake2b(r.tobytes(), digest_size=16).digest() for r in rows]


class FeatureCache:
    """A disk-backed map from sample digests to frozen-encoder features."""

    def __init__(self, directory: Path, dim: int, flush_every: int = 4096) -> None:
        self.directory = Path(directory)
        self.dim = dim
        self.flush_every = flush_every
        self._index: dict[bytes, tuple[int, int]] | None = None
        self._chunks: list[Tensor] = []
        self._pending_keys: list[bytes] = []
        self._pending: list[Tensor] = []

    def __deepcopy__(self, memo: dict[int, object]) -> FeatureCache:
        return self  # content-addressed: copies of a model can share one cache

    @classmethod
    def for_encoder(cls, name: str, dim: int, identity: dict[str, object]) -> FeatureCache:
        return cls(cache_dir() / "features" / f"{name}-{fingerprint(name, identity)}", dim)

    def _load(self) -> dict[bytes, tuple[int, int]]:
        if self._index is None:
            self._index = {}
            for shard in sorted(self.directory.glob("*.safetensors")) if self.directory.is_dir() else []:
                t = load_file(str(shard))
                if t["features"].shape[-1] == self.dim:
                    self._add(list(map(bytes, t["keys"].numpy())), t["features"].float())
        return self._index

    def _add(self, keys: list[bytes], feats: Tensor) -> None:
        assert self._index is not None
        c = len(self._chunks)
        self._chunks.append(feats)
        for i, k in enumerate(keys):
            self._index[k] = (c, i)

    def __len__(self) -> int:
        return len(self._load())

    def encode(self, x: Inputs, encoder: Callable[[Inputs], Tensor]) -> Tensor:
        """Features of every sample of ``x``: cached ones looked up, the rest encoded and stored."""
        index = self._load()
        keys = row_keys(x)
        miss = [i for i, k in enumerate(keys) if k not in index]
        if miss:
            sel = torch.tensor(miss)
            sub = {k: v[sel] for k, v in x.items()} if isinstance(x, dict) else x[sel]
            with torch.inference_mode(False), torch.no_grad():
                feats = encoder(sub).detach().float().cpu().clone()
            new = {}
            for j, i in enumerate(miss):
                new.setdefault(keys[i], j)
            new_keys = list(new)
            rows = feats[torch.tensor(list(new.values()))]
            self._add(new_keys, rows)
            self._pending_keys += new_keys
            self._pending.append(rows)
            if len(self._pending_keys) >= self.flush_every:
                self.flush()
        out = torch.stack([self._chunks[c][r] for c, r in (index[k] for k in keys)])
        device = next(iter(x.values())).device if isinstance(x, dict) else x.device
        return out.to(device)

    def flush(self) -> None:
        """Write the entries added since the last flush as one new shard (atomic, append-only)."""
        if not self._pending_keys:
            return
        keys = torch.from_numpy(np.frombuffer(b"".join(self._pending_keys), dtype=np.uint8).reshape(-1, 16).copy())
        feats = torch.cat(self._pending)
        name = hashlib.sha256(keys.numpy().tobytes()).hexdigest()[:16]
        save_safetensors(self.directory / f"{name}.safetensors", {"keys": keys, "features": feats})
        self._pending_keys, self._pending = [], []


def _encode_split(backbone: torch.nn.Module, data: MultiTaskData, batch_size: int) -> Tensor:
    """Encode a split in batches; token inputs go shortest-first so batches carry little padding."""
    x = data.x
    n = len(data)
    if isinstance(x, dict) and "attention_mask" in x:
        order = torch.argsort(x["attention_mask"].sum(1), stable=True)
    else:
        order = torch.arange(n)
    out = torch.empty(n, backbone.out_dim)
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        sub = {k: v[idx] for k, v in x.items()} if isinstance(x, dict) else x[idx]
        with torch.no_grad():
            out[idx] = backbone(sub).float()
    return out


def featurize(suite: TaskSuite, backbone: str, batch_size: int = 128, **options: object) -> TaskSuite:
    """The same suite with every input replaced by its frozen ``backbone`` features (cached on disk).

    The result has ``InputSpec("features", dim=backbone.out_dim)``, so its default backbone is
    ``identity``; labels, masks and splits are unchanged.
    """
    if options.get("finetune", "frozen") != "frozen":
        raise PolytaskError(f"features are only cached for a frozen backbone; drop finetune={options['finetune']!r}")
    enc = BACKBONES.create(backbone, suite.input_spec, **options)  # by name: the backbones import this module
    if getattr(enc, "feature_cache", None) is None:
        raise PolytaskError(f"backbone {backbone!r} has no frozen-feature cache; use minilm or efficientnet-lite0")
    enc.eval()
    splits = {}
    for name in ("train", "val", "test"):
        data = getattr(suite, name)
        splits[name] = MultiTaskData(_encode_split(enc, data, batch_size), data.y, data.mask)
    enc.feature_cache.flush()
    note = f" Inputs: frozen {backbone} features ({enc.out_dim}-d)."
    return replace(suite, input_spec=InputSpec("features", dim=enc.out_dim),
                   description=suite.description + note, **splits)
