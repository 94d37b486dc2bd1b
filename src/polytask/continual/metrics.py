"""Continual-learning metrics on the accuracy matrix, and its plots.

R[i, j] is the accuracy (each experience's main metric) on the test set of experience j
after training on experiences 0..i; b[j] is that of the randomly initialised model.
With T experiences (Lopez-Paz & Ranzato, NeurIPS 2017, "Gradient Episodic Memory", Eq. 2-4):

    ACC = 1/T Σ_j R[T-1, j]
    BWT = 1/(T-1) Σ_{j<T-1} (R[T-1, j] - R[j, j])
    FWT = 1/(T-1) Σ_{j>0} (R[j-1, j] - b[j])

and forgetting (Chaudhry et al., ECCV 2018, "Riemannian Walk", Eq. 5-6):

    f_j = max_{l < T-1} R[l, j] - R[T-1, j],     F = 1/(T-1) Σ_{j<T-1} f_j.

Multi-label class-incremental steps are scored by :func:`multilabel_scores` (mAP, CF1, OF1).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from torch import Tensor

from polytask.errors import PolytaskError
from polytask.io import atomic_path, write_text


def _matrix(r: Sequence[Sequence[float]]) -> np.ndarray:
    m = np.asarray(r, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] == 0:
        raise PolytaskError(f"the accuracy matrix must be square and non-empty, got shape {m.shape}")
    return m


def average_accuracy(r: Sequence[Sequence[float]]) -> float:
    return float(_matrix(r)[-1].mean())


def backward_transfer(r: Sequence[Sequence[float]]) -> float:
    m = _matrix(r)
    t = len(m)
    return float(np.mean([m[-1, j] - m[j, j] for j in range(t - 1)])) if t > 1 else 0.0


def forward_transfer(r: Sequence[Sequence[float]], random_init: Sequence[float]) -> float:
    m = _matrix(r)
    b = np.asarray(random_init, dtype=np.float64)
    t = len(m)
    return float(np.mean([m[j - 1, j] - b[j] for j in range(1, t)])) if t > 1 else 0.0


def forgetting(r: Sequence[Sequence[float]]) -> float:
    m = _matrix(r)
    t = len(m)
    return float(np.mean([m[:t - 1, j].max() - m[-1, j] for j in range(t - 1)])) if t > 1 else 0.0


def summarize(r: Sequence[Sequence[float]], random_init: Sequence[float]) -> dict[str, Any]:
    """All four summary numbers plus the matrix itself."""
    return {"average_accuracy": average_accuracy(r), "backward_transfer": backward_transfer(r),
            "forward_transfer": forward_transfer(r, random_init), "forgetting": forgetting(r),
            "accuracy_matrix": [[float(v) for v in row] for row in r],
            "random_init_accuracy": [float(v) for v in random_init]}


def multilabel_scores(logits: Tensor, targets: Tensor, threshold: float = 0.8) -> dict[str, float]:
    """mAP, CF1 and OF1 of multi-label ``logits`` [N, C] against 0/1 ``targets`` [N, C].

    mAP: the mean over classes of the average precision of sigmoid scores; CF1: the mean over
    classes of the per-class F1; OF1: the F1 of all (sample, class) decisions pooled; a class is
    predicted when its sigmoid exceeds ``threshold`` (0.8 in MULTI-LANE's code, utils.f1_score_*).
    torchmetrics' MultilabelAveragePrecision and MultilabelF1Score (macro / micro), zero for an
    undefined F1.
    """
    from torchmetrics.classification import (BinaryAveragePrecision, BinaryF1Score, MultilabelAveragePrecision,
                                             MultilabelF1Score)

    if logits.shape != targets.shape or logits.dim() != 2 or len(logits) == 0:
        raise PolytaskError(f"multi-label scores need logits and targets of one shape [N, C], got "
                            f"{tuple(logits.shape)} and {tuple(targets.shape)}")
    n, probs, y = targets.shape[1], logits.float().sigmoid(), targets.long()
    if n == 1:  # torchmetrics' multilabel metrics need two labels; one label's macro and micro F1 coincide
        f1 = float(BinaryF1Score(threshold=threshold, zero_division=0)(probs[:, 0], y[:, 0]))
        return {"mAP": float(BinaryAveragePrecision()(probs[:, 0], y[:, 0])), "CF1": f1, "OF1": f1}
    ap = MultilabelAveragePrecision(num_labels=n, average="macro")(probs, y)
    cf1 = MultilabelF1Score(num_labels=n, threshold=threshold, average="macro", zero_division=0)(probs, y)
    of1 = MultilabelF1Score(num_labels=n, threshold=threshold, average="micro", zero_division=0)(probs, y)
    return {"mAP": float(ap), "CF1": float(cf1), "OF1": float(of1)}


def write_matrix_csv(path: Path, r: Sequence[Sequence[float]], names: Sequence[str]) -> None:
    lines = ["after," + ",".join(f"exp{j}" for j in range(len(names)))]
    lines += [f"exp{i}," + ",".join(f"{v:.6f}" for v in row) for i, row in enumerate(r)]
    write_text(path, "\n".join(lines) + "\n")


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_heatmap(path: Path, r: Sequence[Sequence[float]], title: str) -> None:
    """R as a heatmap: rows = after training on experience i, columns = tested on j."""
    plt = _pyplot()
    m = np.asarray(r, dtype=np.float64)
    t = len(m)
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * t, 0.8 + 0.5 * t))
    im = ax.imshow(m, vmin=0.0, vmax=1.0, cmap="viridis")
    for i in range(t):
        for j in range(t):
            ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if m[i, j] < 0.6 else "black")
    ax.set_xlabel("tested on experience j")
    ax.set_ylabel("after training on i")
    ax.set_xticks(range(t))
    ax.set_yticks(range(t))
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def plot_over_time(path: Path, curves: dict[str, Sequence[Sequence[float]]], title: str) -> None:
    """Average accuracy over the experiences seen so far, after each experience, per run."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    colors = plt.get_cmap("tab20").colors
    for k, (label, r) in enumerate(curves.items()):
        m = np.asarray(r, dtype=np.float64)
        ax.plot(range(1, len(m) + 1), [m[i, :i + 1].mean() for i in range(len(m))], marker="os^Dv"[k % 5],
                color=colors[(2 * k) % 20 + (k // 10) % 2], label=label)
        ax.set_xticks(range(1, len(m) + 1))
    ax.set_xlabel("experiences trained")
    ax.set_ylabel("mean accuracy on experiences seen")
    ax.set_ylim(0, 1.02)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
