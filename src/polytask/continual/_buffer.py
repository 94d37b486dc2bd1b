"""A rehearsal memory filled by reservoir sampling.

Vitter (ACM TOMS 1985), Algorithm R: the n-th item of a stream enters a memory of size M
directly while n <= M; afterwards it replaces slot j, j ~ U{0, ..., n-1}, when j < M.
Every item seen so far is then in the memory with probability M / n.

``class_balanced=True`` follows Chrysakis & Moens (ICML 2020, CBRS, Algorithm 1): when the
memory is full, an item of a class that is not among the largest ones in memory replaces a
random item of a largest class; an item of a largest class replaces a random item of its own
class with probability m_c / n_c (m_c stored, n_c seen of class c), so every class keeps a
uniform sample of its own stream and the classes are balanced.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from polytask.tasks import Batch, Inputs, Task


_NOTHING = torch.empty(0, dtype=torch.long)  # no item stored (read only)


class ReservoirBuffer:
    """Stores inputs, per-task labels and masks (and optional extra tensors such as logits)."""

    def __init__(self, capacity: int, *, class_balanced: bool = False, seed: int = 0) -> None:
        self.capacity = int(capacity)
        self.class_balanced = class_balanced
        self.seen = 0
        self.size = 0
        self.data: dict[str, Tensor] = {}
        self.full: frozenset[str] = frozenset()  # tasks labelled on every stored item
        self.class_seen: dict[int, int] = {}
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return self.size

    # -------------------------------------------------------------- filling
    def slots(self, count: int, keys: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Decide where each of ``count`` new items goes: (item indices, memory slots)."""
        if self.class_balanced:
            assert keys is not None, "class-balanced reservoir needs class keys"
            return self._balanced_slots(keys)
        # one tensor op for the draws, the rest in Python: for a batch of items that is cheaper than
        # a vectorised version's dozen small tensor ops (and, once the memory is full, most steps store nothing)
        chosen: dict[int, int] = {}
        for i, u in enumerate(torch.rand(count, generator=self.generator, dtype=torch.float64).tolist()):
            n = self.seen + i + 1
            slot = n - 1 if n <= self.capacity else int(u * n)
            if slot < self.capacity:
                chosen[slot] = i  # a later item overwrites an earlier one in the same slot
        self.seen += count
        if not chosen:
            return _NOTHING, _NOTHING
        return torch.tensor(list(chosen.values()), dtype=torch.long), torch.tensor(list(chosen), dtype=torch.long)

    def _balanced_slots(self, keys: Tensor) -> tuple[Tensor, Tensor]:
        stored = self.data.get("_key", torch.empty(0, dtype=torch.long))[:self.size].clone()
        items: list[int] = []
        slots: list[int] = []
        for i, c in enumerate(keys.tolist()):
            self.seen += 1
            self.class_seen[c] = self.class_seen.get(c, 0) + 1
            size = len(stored)
            if size < self.capacity:
                slot = size
                stored = torch.cat([stored, torch.tensor([c])])
            else:
                counts = torch.bincount(stored - stored.min(), minlength=1)
                largest = int(counts.max())
                m_c = int((stored == c).sum())
                if m_c < largest:  # c is not a largest class: evict from a largest class
                    big = (counts == largest).nonzero().reshape(-1) + int(stored.min())
                    pool = torch.isin(stored, big).nonzero().reshape(-1)
                else:
                    if float(torch.rand(1, generator=self.generator, dtype=torch.float64)) >= m_c / self.class_seen[c]:
                        continue
                    pool = (stored == c).nonzero().reshape(-1)
                slot = int(pool[torch.randint(len(pool), (1,), generator=self.generator)])
                stored[slot] = c
            if slot in slots:
                items[slots.index(slot)] = i
            else:
                items.append(i)
                slots.append(slot)
        return torch.tensor(items, dtype=torch.long), torch.tensor(slots, dtype=torch.long)

    def add(self, x: Inputs, tensors: dict[str, Tensor], keys: Tensor | None = None,
            full: frozenset[str] = frozenset()) -> None:
        """Offer a batch: inputs ``x`` plus named per-sample ``tensors`` (labels, masks, logits); ``full``: the
        tasks labelled on every item of the batch (the memory keeps, in :attr:`full`, those of every stored item)."""
        count = len(next(iter(x.values()))) if isinstance(x, dict) else len(x)
        items, slots = self.slots(count, keys)
        if len(items) == 0:
            return
        flat = {**_flatten_inputs(x), **tensors}
        if keys is not None:
            flat["_key"] = keys
        if not self.data:
            self.data = {k: torch.zeros((self.capacity, *v.shape[1:]), dtype=v.dtype) for k, v in flat.items()}
        for k, v in flat.items():  # into the preallocated tensors, one gather and one scatter each
            self.data[k].index_copy_(0, slots, v.detach().index_select(0, items).to(self.data[k].dtype))
        self.full = full if self.size == 0 else self.full & full
        if self.size < self.capacity:  # a full memory stays full
            self.size = max(self.size, int(slots.max()) + 1)

    # ------------------------------------------------------------- sampling
    def draw(self, n: int) -> Tensor:
        """The slots of ``n`` stored items drawn uniformly without replacement (all of them if fewer)."""
        return torch.randperm(self.size, generator=self.generator)[:n]

    def rows(self, idx: Tensor) -> dict[str, Tensor]:
        """The stored items in slots ``idx`` (one gather per stored tensor)."""
        return {k: v.index_select(0, idx) for k, v in self.data.items()}

    def sample(self, n: int) -> dict[str, Tensor]:
        """``n`` stored items drawn uniformly without replacement (all of them if fewer)."""
        return self.rows(self.draw(n))

    def all_rows(self) -> dict[str, Tensor]:
        return {k: v[:self.size] for k, v in self.data.items()}

    # ---------------------------------------------------------------- state
    def state_tensors(self, prefix: str) -> dict[str, Tensor]:
        out = {f"{prefix}{k}": v[:self.size] for k, v in self.data.items()}
        out[f"{prefix}_rng"] = self.generator.get_state()
        return out

    def state_meta(self) -> dict[str, Any]:
        return {"seen": self.seen, "size": self.size, "class_seen": {str(k): v for k, v in self.class_seen.items()},
                "capacity": self.capacity, "full": sorted(self.full)}

    def load(self, tensors: dict[str, Tensor], meta: dict[str, Any], prefix: str) -> None:
        self.seen, self.size = int(meta["seen"]), int(meta["size"])
        self.class_seen = {int(k): int(v) for k, v in meta["class_seen"].items()}
        self.full = frozenset(meta.get("full", ()))  # a checkpoint without it: the masks decide
        self.generator.set_state(tensors[f"{prefix}_rng"])
        self.data = {}
        for key, v in tensors.items():
            if key.startswith(prefix) and key != f"{prefix}_rng":
                full = torch.zeros((self.capacity, *v.shape[1:]), dtype=v.dtype)
                full[:len(v)] = v
                self.data[key[len(prefix):]] = full


def _flatten_inputs(x: Inputs) -> dict[str, Tensor]:
    return {f"x/{k}": v for k, v in x.items()} if isinstance(x, dict) else {"x": x}


def _unflatten_inputs(rows: dict[str, Tensor]) -> Inputs:
    if "x" in rows:
        return rows["x"]
    return {k[2:]: v for k, v in rows.items() if k.startswith("x/")}


def batch_tensors(batch: Batch, tasks: list[Task]) -> dict[str, Tensor]:
    """Labels and masks of ``batch`` for every task in ``tasks`` (zeros and False where absent)."""
    n = len(batch)
    out: dict[str, Tensor] = {}
    for t in tasks:
        if t.name in batch.y:
            out[f"y/{t.name}"], out[f"mask/{t.name}"] = batch.y[t.name], batch.mask[t.name]
        else:
            out[f"y/{t.name}"] = t.kind_impl.empty_labels(n, t.num_classes)
            out[f"mask/{t.name}"] = torch.zeros(n, dtype=torch.bool)
    return out


def class_keys(batch: Batch, tasks: list[str]) -> Tensor:
    """A class id per sample for balancing: 1000 · (index of its first labelled task) + its label
    (the first label column for multi-label tasks, the rounded value for regression)."""
    key = torch.full((len(batch),), -1, dtype=torch.long)
    for i, t in enumerate(tasks):
        if t not in batch.y:
            continue
        y = batch.y[t]
        lab = y.long().reshape(len(y), -1)[:, 0] if y.dim() > 1 or not y.is_floating_point() else y.round().long()
        free = (key < 0) & batch.mask[t]
        key = torch.where(free, 1000 * i + lab, key)
    return key.clamp(min=0)


def batch_rows(batch: Batch, tasks: list[Task]) -> dict[str, Tensor]:
    """A batch as flat named tensors (``x``/``x/<field>``, ``y/<task>``, ``mask/<task>``)."""
    return {**_flatten_inputs(batch.x), **batch_tensors(batch, tasks)}


def rows_batch(rows: dict[str, Tensor], tasks: list[Task], full: frozenset[str] = frozenset()) -> Batch:
    """The inverse of :func:`batch_rows`; ``full``: the tasks labelled on every row (a buffer's :attr:`full`)."""
    names = [t.name for t in tasks]
    return Batch(_unflatten_inputs(rows), {t: rows[f"y/{t}"] for t in names}, {t: rows[f"mask/{t}"] for t in names},
                 full & frozenset(names))
