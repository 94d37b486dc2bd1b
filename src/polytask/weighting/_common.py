"""Helpers shared by the gradient-balancing methods: mode checks, Gram matrices, the
min-norm solver of Sener & Koltun (2018) and a seeded, checkpointed random generator."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from polytask.errors import PolytaskError
from polytask.weighting.base import GradContext


def check_choice(method: str, option: str, value: str, allowed: tuple[str, ...]) -> str:
    """Validate a string option against its allowed values and return it."""
    if value not in allowed:
        raise PolytaskError(f"weighting {method!r} takes {option} {' or '.join(map(repr, allowed))}, not {value!r}")
    return value


def check_mode(method: str, mode: str) -> str:
    """Validate a ``mode`` option (the gradient source: shared parameters or representation)."""
    return check_choice(method, "mode", mode, ("params", "rep"))


def need_ctx(method: str, ctx: GradContext | None) -> GradContext:
    """Gradient methods cannot run without per-task gradients."""
    if ctx is None:
        raise RuntimeError(f"weighting {method!r} needs a GradContext; build one with GradContext(model, weighting.mode)")
    return ctx


def gram(grads: Tensor) -> Tensor:
    """The [T, T] Gram matrix G G^T in float64 (for the small solvers)."""
    return (grads @ grads.T).double().cpu()


def min_norm_2(m11: float, m12: float, m22: float) -> float:
    """Sener & Koltun, Algorithm 1: the gamma in [0, 1] minimising ||gamma a + (1 - gamma) b||^2
    given m11 = a.a, m12 = a.b, m22 = b.b."""
    if m12 >= m11:
        return 1.0
    if m12 >= m22:
        return 0.0
    return (m22 - m12) / (m11 + m22 - 2.0 * m12)


def min_norm_element(m: np.ndarray, max_iter: int = 250, tol: float = 1e-5) -> np.ndarray:
    """Sener & Koltun, Algorithm 2 (Frank-Wolfe with the exact line search of Algorithm 1):
    alpha on the simplex minimising ||sum_t alpha_t g_t||^2 given the Gram matrix ``m``.

    Starts from uniform weights and stops when a step moves alpha by less than ``tol``
    (250 iterations and 1e-5 are the limits of the official MinNormSolver). For two tasks
    the first step already lands on the exact minimiser.
    """
    t = m.shape[0]
    alpha = np.full(t, 1.0 / t)
    if t == 1:
        return alpha
    for _ in range(max_iter):
        m_alpha = m @ alpha
        k = int(np.argmin(m_alpha))
        gamma = min_norm_2(float(m[k, k]), float(m_alpha[k]), float(alpha @ m_alpha))
        new = (1.0 - gamma) * alpha
        new[k] += gamma
        done = np.abs(new - alpha).sum() < tol
        alpha = new
        if done:
            break
    return alpha


class SeededRandom:
    """Mixin for a Weighting that draws random numbers: a private ``torch.Generator``
    seeded by the ``seed`` option (so the model's own random stream is untouched) whose
    state is saved with the weighting's ``state_dict`` (resume gives the same draws)."""

    generator: torch.Generator

    def _seed(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(int(seed))

    def get_extra_state(self) -> Any:
        return {"rng": self.generator.get_state()}

    def set_extra_state(self, state: Any) -> None:
        self.generator.set_state(state["rng"])

    def permutation(self, n: int) -> list[int]:
        return torch.randperm(n, generator=self.generator).tolist()
