"""Helpers shared by the gradient-balancing methods: mode checks, Gram matrices, exact solvers of
the small quadratic programs on the Gram matrix (MGDA's min-norm point, the dual-cone projection
of UPGrad and DualProj) and a seeded, checkpointed random generator."""

from __future__ import annotations

from typing import Any, ClassVar, Sequence

import numpy as np
import torch
from torch import Tensor

from polytask.errors import PolytaskError
from polytask.weighting.base import GradContext, Weighting


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


def _solve(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a x = b by LU, or the least-squares solution where ``a`` is singular to rounding."""
    try:
        return np.linalg.solve(a, b)
    except np.linalg.LinAlgError:
        return np.linalg.lstsq(a, b, rcond=None)[0]


def nonneg_qp(q: np.ndarray, c: np.ndarray, tol: float = 1e-12) -> np.ndarray:
    """The exact minimiser of 1/2 z^T q z - c^T z over z >= 0, for a PSD ``q`` (Lawson & Hanson's
    active-set NNLS, Ch. 23 of "Solving Least Squares Problems" (1974), on the normal equations
    as in Bro & de Jong's FNNLS (1997)).

    Each step solves the unconstrained problem on the current free set exactly (a k x k
    solve), so the answer satisfies the KKT conditions -- z >= 0, w = c - q z <= tol, w = 0
    where z > 0 -- to rounding, not to an iteration budget. A coordinate joins the free set
    only while its w is positive, which keeps the free block of ``q`` non-singular even when
    ``q`` itself is (linearly dependent gradients). ``tol`` is relative to the largest |c|.
    """
    t = len(c)
    z = np.zeros(t)
    free = np.zeros(t, dtype=bool)
    tol = tol * max(float(np.abs(c).max()), 1e-300)
    w = c.astype(np.float64).copy()
    for _ in range(10 * t + 50):
        if free.all() or float(w[~free].max()) <= tol:
            break
        free[int(np.argmax(np.where(free, -np.inf, w)))] = True
        while True:   # each pass takes at least one coordinate out of the free set, so this ends
            s = np.zeros(t)
            f = np.flatnonzero(free)
            s[f] = _solve(q[np.ix_(f, f)], c[f])
            if (s[f] > 0).all():
                break
            neg = f[s[f] <= 0]
            ratios = z[neg] / np.maximum(z[neg] - s[neg], 1e-300)
            z = z + float(ratios.min()) * (s - z)
            z[neg[int(np.argmin(ratios))]] = 0.0
            free &= z > 0
            z[~free] = 0.0
        z = s
        w = c - q @ z
    return z


def min_norm_element(m: np.ndarray) -> np.ndarray:
    """alpha on the simplex minimising ||sum_t alpha_t g_t||^2 = alpha^T m alpha, exactly, given
    the Gram matrix ``m`` (the subproblem of Sener & Koltun 2018, Eq. 3).

    Exact reduction to a non-negative least-squares problem (Lawson & Hanson 1974, Ch. 23):
    with z = s alpha, min_{z >= 0} ||G^T z||^2 + (1^T z - 1)^2 = min_s s^2 rho + (s - 1)^2
    where rho is the min-norm value, so its solution is z* = alpha*/(1 + rho) and
    alpha* = z*/sum(z*). On the Gram matrix that is :func:`nonneg_qp` with q = m + 1 1^T and
    c = 1. The result meets the optimality conditions (m alpha)_t >= alpha^T m alpha for all t,
    with equality where alpha_t > 0, to rounding. ``m`` is scaled to unit mean diagonal first
    (alpha does not depend on the scale); all-zero gradients give uniform weights.
    """
    t = m.shape[0]
    scale = float(np.trace(m)) / t
    if t == 1 or scale <= 0:
        return np.full(t, 1.0 / t)
    z = nonneg_qp(m / scale + 1.0, np.ones(t))
    return z / z.sum()


def project_to_dual_cone(m: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Weights v with G^T v the projection of G^T u onto the dual cone {x : G x >= 0} of the rows
    of G, given the Gram matrix ``m`` = G G^T (Quinton & Rey 2024, Prop. 1: v minimises
    v^T m v subject to v >= u). Solved exactly as :func:`nonneg_qp` in z = v - u >= 0, so
    (m v)_t >= 0 for every t, with equality where v_t > u_t."""
    scale = float(np.trace(m)) / m.shape[0]
    if scale <= 0:
        return u.astype(np.float64).copy()
    q = m / scale
    return u + nonneg_qp(q, -(q @ u))


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


class GramianWeighting(Weighting):
    """A gradient method whose update is ``w @ G`` with ``w`` computed from the Gram matrix G G^T of the
    per-task gradients alone: it asks the context for the Gramian (:meth:`GradContext.gramian`, which
    never forms G in ``params`` mode) and hands back the weights. Subclasses name themselves and give
    :meth:`weights`; ``gram_dtype`` is the precision the Gramian's products are taken in."""

    grad_source = "params"
    method: ClassVar[str]
    gram_dtype: ClassVar[torch.dtype] = torch.float32

    def __init__(self, task_names: Sequence[str], *, mode: str = "params") -> None:
        super().__init__(task_names)
        self.mode = check_mode(self.method, mode)  # type: ignore[assignment]

    def weights(self, m: np.ndarray, ctx: GradContext) -> np.ndarray:
        """The [T] combination weights of the task gradients, from their Gram matrix ``m``."""
        raise NotImplementedError

    def backward(self, losses: Tensor, ctx: GradContext | None = None) -> Tensor:
        ctx = need_ctx(self.method, ctx)
        w = torch.from_numpy(self.weights(ctx.gramian(losses, self.gram_dtype).numpy(), ctx)).to(losses)
        ctx.apply(losses, shared_weights=w)
        return w
