"""Dynamic Logits Fusion: Fan, Lu, Wei, Tian, Qu, Chen and Cheng, "On Giant's Shoulders: Effortless
Weak to Strong by Dynamic Logits Fusion", NeurIPS 2024 (arXiv:2406.15480).

Notation of the paper (Sec. 3): M^L the logits of the model that receives the experts' knowledge
(P = softmax M^L), M^S those of the pretrained model the experts were fine-tuned from
(Q = softmax M^S), M^S_t those of the expert fine-tuned on task t (Q_t). The fused distribution
of logit arithmetic with one weight per expert (Eq. 2 extended to T experts, Sec. "Extending to the
Fusion of Multiple SLMs") is

    P̃(α) = softmax( M^L + Σ_t α_t (M^S_t − M^S) ),

and the weights are chosen anew for every decoding step (here: for every sample, or every token
of a ``[..., C]`` logit tensor) as the minimiser of the multi-expert distance-matching objective
(Eq. 3 for one expert; its multi-expert form in the same section and in Algorithm 1)

    L(α) = Σ_t [ (KL(P̃ ‖ P) − KL(Q_t ‖ Q))² + (KL(P ‖ P̃) − KL(Q ‖ Q_t))² ],

i.e. P̃ sits at the centroid of the experts' divergences from the base, in both KL directions.
As in Algorithm 1 the minimiser is found by grid search, α_t ∈ {0, 0.1, …, 2.0} (``alpha_step``,
``alpha_max``), keeping the first candidate with the smallest L (the ``If L < m`` update). The
paper's multi-task setting searches one expert at a time (Sec. 5.2 "Efficiency Analysis":
O(nTBV) instead of O(n^T BV); Algorithm 1: "perform α search only for one task, for a total of T
times"), so the candidates are α·e_t, one expert active per step: ``search="single"`` (default).
``search="joint"`` searches the full grid over α ∈ R^T (the objective's exact grid minimiser;
refused above 10,000 weight vectors).

On a merge suite the receiving model and the pretrained model are the same network (no
weak-to-strong size gap), so M^L = M^S = the base's logits and P = Q. With one expert the
objective is then zero at α = 1, so DLF returns that expert's prediction exactly.

Reference code: the authors' repository (github.com/Facico/Dynamic-Logit-Fusion) holds only a
README ("Coming Soon"), so this follows the paper's Algorithm 1 and the stored paper text; the
hand-computed test in tests/test_fusion.py checks the objective and the chosen weights.
Deviations: none in the rule. The step is one classification sample here, not one generated token
(a ``[B, L, C]`` tensor of token logits gets one weight vector per token); the paper tests generative
models only and names discriminative ones as untested (its "Limitations" section).
"""

from __future__ import annotations

import torch
from torch import Tensor

from polytask.errors import PolytaskError
from polytask.merging.fusion.base import Fuser
from polytask.registry import FUSERS

SEARCHES = ("single", "joint")
#: Weight vectors per sample ``search="joint"`` may try (grid size ** T).
MAX_JOINT = 10_000


def kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p ‖ q) over the last dimension, from log-probabilities."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def alpha_grid(alpha_max: float = 2.0, alpha_step: float = 0.1) -> Tensor:
    """The candidate values of each α_t: 0, step, 2·step, …, alpha_max."""
    if not alpha_step > 0 or not alpha_max >= alpha_step:
        raise PolytaskError(f"DLF needs 0 < alpha_step <= alpha_max (got alpha_step={alpha_step}, "
                            f"alpha_max={alpha_max}); the paper uses alpha_step=0.1, alpha_max=2.0")
    return torch.linspace(0.0, alpha_max, round(alpha_max / alpha_step) + 1)


def dlf_objective(fused: Tensor, experts: Tensor, small: Tensor, large: Tensor | None = None) -> Tensor:
    """L = Σ_t (KL(P̃‖P) − KL(Q_t‖Q))² + (KL(P‖P̃) − KL(Q‖Q_t))² for candidate fused logits ``fused``
    ``[K, N, C]`` (K candidates), experts ``[T, N, C]``, small/large ``[N, C]``; returns ``[K, N]``."""
    log_p = torch.log_softmax(small if large is None else large, -1)
    log_q = torch.log_softmax(small, -1)
    log_qt = torch.log_softmax(experts, -1)
    k, r = kl(log_qt, log_q), kl(log_q, log_qt)                       # [T, N]
    log_f = torch.log_softmax(fused, -1)
    f, g = kl(log_f, log_p), kl(log_p, log_f)                         # [K, N]
    return ((f[:, None] - k[None]) ** 2 + (g[:, None] - r[None]) ** 2).sum(1)


def dlf_weights(experts: Tensor, small: Tensor, large: Tensor | None = None, *, grid: Tensor | None = None,
                search: str = "single") -> Tensor:
    """Per-step weights α ``[..., T]`` minimising :func:`dlf_objective` over the grid (first minimum wins).

    ``experts`` ``[T, ..., C]`` are the fine-tuned models' logits, ``small`` ``[..., C]`` the logits of the
    model they were fine-tuned from, ``large`` those of the receiving model (default: ``small``).
    """
    if search not in SEARCHES:
        raise PolytaskError(f"DLF search must be one of {', '.join(SEARCHES)}, not {search!r}")
    grid = alpha_grid() if grid is None else grid
    lead, n_cls, n_exp = small.shape[:-1], small.shape[-1], experts.shape[0]
    e = experts.reshape(n_exp, -1, n_cls)
    s = small.reshape(-1, n_cls)
    big = s if large is None else large.reshape(-1, n_cls)
    delta = e - s
    if search == "single":  # α·e_t: one expert active per step, each searched over the grid in turn
        cands = [torch.eye(n_exp, dtype=grid.dtype)[t] * grid[:, None] for t in range(n_exp)]
    else:
        if len(grid) ** n_exp > MAX_JOINT:
            raise PolytaskError(f"DLF search='joint' would try {len(grid)}^{n_exp} weight vectors per sample; "
                                f"use search='single' (the paper's multi-task setting) or a larger alpha_step")
        full = torch.cartesian_prod(*[grid] * n_exp).reshape(-1, n_exp)
        cands = list(full.split(256))
    best = torch.full((s.shape[0],), float("inf"), dtype=s.dtype)
    weights = torch.zeros(s.shape[0], n_exp, dtype=s.dtype)
    for w in cands:                                                   # w: [K, T] weight vectors, in search order
        w = w.to(s.dtype)
        fused = big + torch.einsum("kt,tnc->knc", w, delta)
        loss = dlf_objective(fused, e, s, big)                        # [K, N]
        low, idx = loss.min(0)                                        # first minimum within the chunk
        better = low < best
        best = torch.where(better, low, best)
        weights[better] = w[idx[better]]
    return weights.reshape(*lead, n_exp)


def dlf_fuse(experts: Tensor, small: Tensor, weights: Tensor, large: Tensor | None = None) -> Tensor:
    """M^L + Σ_t α_t (M^S_t − M^S) with weights ``[..., T]``."""
    big = small if large is None else large
    return big + torch.einsum("...t,t...c->...c", weights, experts - small)


@FUSERS.register("dlf")
class DynamicLogitsFusion(Fuser):
    """Dynamic Logits Fusion (Fan et al., NeurIPS 2024): per-sample expert weights matching the experts' KL to the base."""

    needs_base = True

    def __init__(self, *, alpha_max: float = 2.0, alpha_step: float = 0.1, search: str = "single") -> None:
        self.grid = alpha_grid(alpha_max, alpha_step)
        if search not in SEARCHES:
            raise PolytaskError(f"DLF search must be one of {', '.join(SEARCHES)}, not {search!r}")
        self.alpha_max, self.alpha_step, self.search = float(alpha_max), float(alpha_step), search

    def weights(self, base: Tensor | None, experts: Tensor) -> Tensor:
        return dlf_weights(experts, self._base(base, experts), grid=self.grid, search=self.search)

    def combine(self, base: Tensor | None, experts: Tensor, weights: Tensor) -> Tensor:
        return dlf_fuse(experts, self._base(base, experts), weights)

    def _base(self, base: Tensor | None, experts: Tensor) -> Tensor:
        if base is None:
            raise PolytaskError("DLF reads the base model's logits (the model the experts were fine-tuned from); "
                                "pass base=")
        self.check(base, experts)
        return base
