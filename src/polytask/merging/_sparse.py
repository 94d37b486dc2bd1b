"""Generalized task arithmetic: sparsify each task vector, optionally elect signs, add, scale.

TIES, DARE and Model Breadcrumbs differ only in how each τ_t is sparsified (top magnitudes,
random drop-and-rescale, or cutting both magnitude tails) and whether the sparsified vectors are
combined by TIES' sign election + disjoint merge or by a plain sum (task arithmetic):

    θ = θ_0 + λ · combine(w_1 sparsify(τ_1), ..., w_T sparsify(τ_T))

with per-model weights w_t (default 1; mergekit's ``weight``). Every one of them takes its
sparsity as ``density``, the fraction of each task vector's entries kept, in (0, 1] or [0, 1]
(mergekit's ``density``), one value for all models or one per model. ``combine`` is the sum, or
with ``normalize=True`` the sum divided by Σ_t w_t (mergekit's ``normalize``); with sign election
it is TIES' disjoint merge ``merge_func``: ``mean`` (Σ_{t∈A} w_t τ̂_t / Σ_{t∈A} w_t, the paper's
disjoint mean), ``sum`` (Σ_{t∈A} w_t τ̂_t) or ``max`` (γ · max_{t∈A} |w_t τ̂_t|), the three the
TIES reference code offers, with A = {t : sgn(w_t τ̂_t) = γ}, γ = sgn(Σ_t w_t τ̂_t).

Each tensor is merged in blocks of :data:`BLOCK` entries: the T deltas of a block are computed
into one [T, BLOCK] work buffer (never into the inputs, which may be memory-mapped files),
sparsified and combined there, so no full-size task vector is ever held. Magnitude thresholds
need the whole tensor first: per model, |τ_t| goes into one scratch buffer and an in-place
selection (``numpy.partition``, introselect) gives the exact k-th smallest value, the same value
``torch.kthvalue`` returns; entries tied with a threshold are all kept (TIES' reference code does
the same). A threshold over a whole task vector (TIES' default) comes from :func:`kth_largest_streaming`,
an exact radix selection over the bit patterns of |τ| that streams the tensors (two passes for
float32, a 65,536-bin histogram per model, no task vector held). The block arithmetic reproduces
the straightforward definitions bit for bit: masking ``τ ⊙ [|τ| ≥ t]`` is
``τ ⊙ sign(threshold(|τ|, t⁻, 0))`` with t⁻ the float just below t (same values and signed
zeros), and the disjoint sum Σ_t τ̂_t [τ̂_t γ > 0] is γ · Σ_t relu(τ̂_t γ) for γ ∈ {−1, 0, 1}
(same additions in the same order; rounding is sign-symmetric).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from polytask.errors import PolytaskError
from polytask.merging.base import Merger, read_only
from polytask.merging.taskvector import Checkpoint, compute_dtype, is_mergeable

#: Entries per model per block: a [T, BLOCK] float32 buffer for T = 8 models is 2 MB (cache-sized).
BLOCK = 1 << 16
#: λ values tried on the validation split by a benchmark (TIES, with its disjoint mean, has its own).
LAMBDA_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0)
#: TIES' disjoint-merge rules (the reference code's ``merge_func``).
MERGE_FUNCS = ("mean", "sum", "max")

PerModel = Union[float, Sequence[float]]


def check_fraction(name: str, value: float, *, open_left: bool = False) -> float:
    """``value`` as a float; a one-line error naming option ``name`` outside [0, 1] ((0, 1] if ``open_left``)."""
    value = float(value)
    if not (0.0 < value <= 1.0 if open_left else 0.0 <= value <= 1.0):
        interval = "(0, 1]" if open_left else "[0, 1]"
        raise PolytaskError(f"option {name}={value} is outside {interval}; pass a fraction such as {name}=0.2")
    return value


def check_fractions(name: str, value: PerModel, *, open_left: bool = False) -> tuple[float, ...]:
    """One fraction, or one per model (a list), each checked by :func:`check_fraction`."""
    if isinstance(value, (list, tuple)):
        if not value:
            raise PolytaskError(f"option {name}=[] is empty; pass one fraction, or one per model")
        return tuple(check_fraction(f"{name}[{i}]", v, open_left=open_left) for i, v in enumerate(value))
    return (check_fraction(name, value, open_left=open_left),)


def check_choice(name: str, value: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise PolytaskError(f"option {name}={value!r} is not one of {', '.join(choices)}; pass e.g. {name}={choices[0]}")
    return value


def per_model(name: str, values: tuple[Any, ...], n: int) -> tuple[Any, ...]:
    """``values`` (one, or one per model) for ``n`` models; a one-line error on a length mismatch."""
    if len(values) == 1:
        return values * n
    if len(values) != n:
        raise PolytaskError(f"option {name} has {len(values)} values but {n} models are merged; "
                            f"pass one value, or one per model")
    return values


def pick(values: tuple[Any, ...], index: int) -> Any:
    """Model ``index``'s entry of a per-model option (checked by :func:`per_model` in ``prepare``)."""
    return values[index] if len(values) > 1 else values[0]


def kth_smallest_inplace(work: Tensor, ks: Sequence[int]) -> list[float]:
    """The ks-th smallest entries (1-based) of the flat tensor ``work``, which is reordered in place
    (introselect on a numpy view: exact, like ``torch.kthvalue``, and ~8x faster on 16M entries)."""
    array = work.numpy()
    array.partition([k - 1 for k in ks])
    return [float(array[k - 1]) for k in ks]


def kth_largest_streaming(chunks: Callable[[], Iterable[list[Tensor]]], ks: Sequence[int], dtype: torch.dtype) -> list[float]:
    """The ks[t]-th largest entry (1-based) of model t's non-negative values, which ``chunks()`` yields
    block by block (one list with a flat ``dtype`` tensor per model each time; called once per pass).

    Exact radix selection on the bit patterns (non-negative floats order like their bits): each pass
    histograms the next 16 bits of the entries that share the prefix found so far, 2 passes for
    float32, 4 for float64; memory is one 65,536-bin histogram per model.
    """
    int_dtype, bits = (torch.int32, 32) if dtype == torch.float32 else (torch.int64, 64)
    n = len(ks)
    prefix, remaining = [0] * n, [int(k) for k in ks]
    for digit in range(bits // 16):
        shift = bits - 16 * (digit + 1)
        counts = [torch.zeros(1 << 16, dtype=torch.int64) for _ in range(n)]
        for block in chunks():
            for t, values in enumerate(block):
                code = values.view(int_dtype)
                if digit:
                    code = code[(code >> (shift + 16)) == prefix[t]]
                counts[t] += torch.bincount(((code >> shift) & 0xFFFF).long(), minlength=1 << 16)
        for t in range(n):
            above = counts[t].flip(0).cumsum(0).flip(0)  # entries whose digit is >= d
            d = int((above >= remaining[t]).nonzero().max())
            remaining[t] -= int(above[d + 1]) if d + 1 < (1 << 16) else 0
            prefix[t] = (prefix[t] << 16) | d
    return [float(torch.tensor(p, dtype=torch.int64).to(int_dtype).view(dtype)) for p in prefix]


def _below(value: float, dtype: torch.dtype) -> float:
    """The largest ``dtype`` number below ``value``: x > below(t) ⟺ x ≥ t for every ``dtype`` number x."""
    kind = np.float32 if dtype == torch.float32 else np.float64
    return float(np.nextafter(kind(value), kind(-np.inf)))


def abs_delta(model: Tensor, base: Tensor, out: Tensor) -> Tensor:
    """|θ_t − θ_0| of flat tensors into ``out``."""
    return torch.sub(model, base, out=out).abs_()


def keep_magnitudes(delta: Tensor, scratch: Tensor, low: float | None, high: float | None) -> Tensor:
    """Zero the entries of ``delta`` with |δ| < ``low`` or |δ| > ``high`` (in place; None: no bound).

    Equals ``delta * ((|δ| >= low) & (|δ| <= high))`` bit for bit, signed zeros included.
    """
    mag = torch.abs(delta, out=scratch)
    if low is not None:
        F.threshold_(mag, _below(low, delta.dtype), 0.0)
    if high is not None:
        mag.sub_(torch.threshold(mag, high, 0.0))  # |δ| > high -> |δ| - |δ| = 0, else |δ| - 0
    return delta.mul_(mag.sign_())  # |δ| or 0 -> 1 or 0


#: A magnitude plan that zeroes the whole tensor.
ZERO = "zero"
MagnitudePlan = Any  # None (keep all), ZERO, or (low, high) with None for a missing bound


def magnitude_plan(base: Tensor, model: Tensor, scratch: Tensor, drop_bottom: int, drop_top: int) -> MagnitudePlan:
    """Thresholds that drop the ``drop_bottom`` smallest and ``drop_top`` largest |θ_t − θ_0| entries of a
    flat tensor: keep |δ| ≥ (drop_bottom+1)-th smallest and |δ| ≤ (n − drop_top)-th smallest (ties kept)."""
    n = base.numel()
    if drop_bottom + drop_top >= n:
        return ZERO
    if drop_bottom == 0 and drop_top == 0:
        return None
    abs_delta(model, base, scratch)
    ks = ([drop_bottom + 1] if drop_bottom else []) + ([n - drop_top] if drop_top else [])
    values = kth_smallest_inplace(scratch, ks)
    return (values[0] if drop_bottom else None, values[-1] if drop_top else None)


#: Entries of |τ_t| sampled per model to bracket a whole-vector threshold (:func:`global_magnitude_plans`).
SAMPLE = 1 << 18
#: Largest fraction of a task vector's entries the bracket may hold before falling back to radix selection.
MAX_CANDIDATES = 0.05


def global_magnitude_plans(base: Checkpoint, models: Sequence[Checkpoint], densities: Sequence[float]) -> list[MagnitudePlan]:
    """Per model, the plan keeping the round(density · n) largest |τ_t| entries of its whole task vector
    (every floating-point tensor, n entries in all; ties with the threshold kept), found by streaming.

    One pass over the inputs: a stratified random sample of :data:`SAMPLE` entries per model brackets
    the threshold, [lo, hi], wide enough (±6 standard errors of the sample quantile) that it holds the
    k-th largest entry; the pass then counts the entries above ``hi`` and keeps those within the
    bracket, and an exact selection among them gives the threshold. The count proves the bracket:
    where it missed (or would hold more than :data:`MAX_CANDIDATES` of the entries, e.g. many tied
    zeros), that model's threshold comes from :func:`kth_largest_streaming` instead. Exact either way.
    """
    keys = [k for k in base.keys() if is_mergeable(base.meta(k)[1])]
    sizes = [int(np.prod(base.meta(k)[0], dtype=np.int64)) for k in keys]
    total = sum(sizes)
    keep = [round(d * total) for d in densities]
    plans: list[MagnitudePlan] = [ZERO if k == 0 else None for k in keep]
    todo = [t for t, k in enumerate(keep) if 0 < k < total]
    if not todo:
        return plans
    dtype = torch.float64 if any(compute_dtype(base.meta(k)[1]) == torch.float64 for k in keys) else torch.float32
    brackets = _sample_brackets(base, [models[t] for t in todo], [keep[t] for t in todo], keys, sizes, dtype)
    found = _bracketed_pass(base, [models[t] for t in todo], [keep[t] for t in todo], brackets, keys, dtype,
                            cap=int(MAX_CANDIDATES * total))
    missed = [i for i, v in enumerate(found) if v is None]
    if missed:
        def chunks() -> Iterable[list[Tensor]]:
            for key in keys:
                b = base.get(key).to(dtype).reshape(-1)
                yield [abs_delta(models[todo[i]].get(key).to(dtype).reshape(-1), b, torch.empty_like(b)) for i in missed]

        for i, value in zip(missed, kth_largest_streaming(chunks, [keep[todo[i]] for i in missed], dtype)):
            found[i] = value
    for i, t in enumerate(todo):
        plans[t] = (found[i], None)
    return plans


def _sample_brackets(base: Checkpoint, models: Sequence[Checkpoint], keep: Sequence[int], keys: Sequence[str],
                     sizes: Sequence[int], dtype: torch.dtype) -> list[tuple[float, float] | None]:
    """Per model, [lo, hi] that holds its keep-th largest |τ| with overwhelming probability (None: no bracket
    worth taking), from |τ| at the same stratified random positions of every model (seeded: reproducible)."""
    total = sum(sizes)
    generator = torch.Generator().manual_seed(0)
    picks = []
    for key, size in zip(keys, sizes):
        count = min(size, max(1, round(SAMPLE * size / total)))
        picks.append(torch.randint(size, (count,), generator=generator) if size else torch.empty(0, dtype=torch.long))
    samples = [[] for _ in models]
    for key, idx in zip(keys, picks):
        b = read_only(base, key).reshape(-1)[idx].to(dtype)
        for t, model in enumerate(models):
            samples[t].append(read_only(model, key).reshape(-1)[idx].to(dtype).sub_(b).abs_())
            model.release(key)
        base.release(key)
    brackets: list[tuple[float, float] | None] = []
    for t, k in enumerate(keep):
        values = torch.cat(samples[t]).numpy()
        m, q = values.size, k / total
        margin = 6.0 * float(np.sqrt(q * (1.0 - q) / m)) + 2.0 / m
        if 2.0 * margin > MAX_CANDIDATES:
            brackets.append(None)
            continue
        top, bottom = int(np.floor((q - margin) * m)), int(np.ceil((q + margin) * m))  # ranks, largest first
        ranks = [m - r for r in (top, bottom) if 1 <= r <= m]  # 0-based ascending positions
        values.partition(ranks)
        hi = float(values[m - top]) if 1 <= top <= m else float("inf")
        lo = float(values[m - bottom]) if 1 <= bottom <= m else 0.0
        brackets.append((lo, hi))
    return brackets


def _bracketed_pass(base: Checkpoint, models: Sequence[Checkpoint], keep: Sequence[int],
                    brackets: Sequence[tuple[float, float] | None], keys: Sequence[str], dtype: torch.dtype,
                    cap: int) -> list[float | None]:
    """One streaming pass: per model, the keep-th largest |τ| if it lies within its bracket (else None)."""
    n = len(models)
    above = [0] * n
    inside: list[list[np.ndarray] | None] = [[] if b is not None else None for b in brackets]
    held = [0] * n
    work = torch.empty(BLOCK, dtype=dtype)
    base_block = torch.empty(BLOCK, dtype=dtype)
    for key in keys:
        b = read_only(base, key).reshape(-1)
        flats = [read_only(model, key).reshape(-1) if inside[t] is not None else None for t, model in enumerate(models)]
        for start in range(0, b.numel(), BLOCK):
            stop = min(start + BLOCK, b.numel())
            bb = base_block[:stop - start].copy_(b[start:stop])
            for t, flat in enumerate(flats):
                if flat is None or inside[t] is None:
                    continue
                lo, hi = brackets[t]
                mag = torch.sub(flat[start:stop], bb, out=work[:stop - start]).abs_().numpy()
                above[t] += int(np.count_nonzero(mag > hi))  # numpy: its comparisons are ~6x torch's here
                within = mag[(mag >= lo) & (mag <= hi)]
                held[t] += within.size
                if held[t] > cap:
                    inside[t] = None  # the bracket holds too many entries (ties): radix selection instead
                else:
                    inside[t].append(within)
        for checkpoint in (base, *models):
            checkpoint.release(key)
    found: list[float | None] = []
    for t in range(n):
        rank = keep[t] - above[t]  # the threshold's rank among the bracketed entries, largest first
        if inside[t] is None or not 0 < rank <= held[t]:
            found.append(None)
            continue
        values = np.concatenate(inside[t])
        values.partition(held[t] - rank)
        found.append(float(values[held[t] - rank]))
    return found


def apply_magnitude_plan(plan: MagnitudePlan, delta: Tensor, scratch: Tensor) -> None:
    """Sparsify one block of a task vector by a :func:`magnitude_plan` (in place)."""
    if plan is ZERO:
        delta.zero_()
    elif plan is not None:
        keep_magnitudes(delta, scratch, *plan)


class SparseTaskArithmetic(Merger):
    """θ = θ_0 + λ · combine(w_t sparsify(τ_t)); subclasses define ``plan`` and ``sparsify`` and set
    ``sign_consensus``."""

    sign_consensus: bool = False
    lambda_grid = LAMBDA_GRID
    copies_inputs = False  # deltas go into work buffers; the inputs are only read
    stored_dtype_inputs = True  # θ_t − θ_0 promotes a bf16/fp16 θ_t to the base's compute dtype, block by block

    def __init__(self, lam: float, *, weights: Sequence[float] | None = None, normalize: bool = False,
                 merge_func: str = "mean") -> None:
        self.lam = float(lam)
        self.weights = None if weights is None else tuple(float(w) for w in weights)
        self.normalize = bool(normalize)
        self.merge_func = check_choice("merge_func", merge_func, MERGE_FUNCS)

    def prepare(self, base: Checkpoint, models: Sequence[Checkpoint], data: Any) -> None:
        if self.weights is not None:
            per_model("weights", self.weights, len(models))

    def plan(self, name: str, index: int, base: Tensor, model: Tensor, scratch: Tensor, shape: tuple[int, ...]) -> Any:
        """Per-model state for tensor ``name`` (of ``shape``) from the whole flat tensors (e.g. magnitude
        thresholds); ``scratch`` is a work buffer of the tensor's size."""
        return None

    def sparsify(self, state: Any, delta: Tensor, scratch: Tensor, start: int) -> None:
        """Sparsify one block of a task vector in place: its entries ``start`` onwards of the flat tensor
        (``scratch``: a work buffer of the block's size)."""

    def merge_models(self, name: str, base: Tensor, models: list[Tensor]) -> Tensor:
        flat_base = base.reshape(-1)
        flats = [m.reshape(-1) for m in models]
        n, dtype = flat_base.numel(), flat_base.dtype
        weights = None if self.weights is None else per_model("weights", self.weights, len(flats))
        scratch = torch.empty(n, dtype=dtype)
        states = [self.plan(name, i, flat_base, m, scratch, tuple(base.shape)) for i, m in enumerate(flats)]
        width = max(1, min(BLOCK, n))
        work = torch.empty(len(flats), width, dtype=dtype)
        rows = torch.empty(3, width, dtype=dtype)
        out = torch.empty(n, dtype=dtype)
        divisor = sum(weights) if weights is not None else float(len(flats))
        for start in range(0, n, width):
            stop = min(start + width, n)
            c = stop - start
            deltas = work[:, :c]
            b = flat_base[start:stop]
            for t, m in enumerate(flats):
                torch.sub(m[start:stop], b, out=deltas[t])
                self.sparsify(states[t], deltas[t], scratch[:c], start)
                if weights is not None:
                    deltas[t].mul_(weights[t])
            if self.sign_consensus:
                combined = sign_consensus_merge(deltas, rows[:, :c], self.merge_func, weights)
            else:
                combined = deltas[0]
                for d in deltas[1:]:
                    combined += d
                if self.normalize and abs(divisor) >= 1e-8:
                    combined.div_(divisor)
            torch.add(combined.mul_(self.lam), b, out=out[start:stop])
        return out.view(base.shape)


def sign_consensus_merge(deltas: Tensor, rows: Tensor, merge_func: str = "mean",
                         weights: Sequence[float] | None = None) -> Tensor:
    """TIES "elect" + "disjoint merge" on a [T, c] block of (weighted) deltas: γ = sgn(Σ_t τ̂_t), then the
    mean (weighted by ``weights``), sum or signed max of the entries whose sign equals γ. ``rows`` is a
    [3, c] work buffer; returns a view of it. ``deltas`` is overwritten.

    Same bits as summing ``τ̂_t * (τ̂_t * γ > 0)`` from zeros and dividing by the count (zero counts read
    as 1): relu(τ̂_t γ) is |τ̂_t| where τ̂_t agrees with γ and 0 elsewhere, and sign(relu(·)) the indicator.
    """
    elected, total, count = rows[0], rows[1], rows[2]
    elected.zero_()
    for d in deltas:
        elected += d
    elected.sign_()
    total.zero_()
    count.zero_()
    for t, d in enumerate(deltas):
        agree = d.mul_(elected).relu_()
        if merge_func == "max":
            torch.maximum(total, agree, out=total)
            continue
        total += agree
        if merge_func == "mean":
            indicator = agree.sign_()
            count += indicator if weights is None else indicator.mul_(weights[t])
    total.mul_(elected)
    if merge_func != "mean":
        return total
    return total.div_(count.masked_fill_(count == 0, 1.0))
