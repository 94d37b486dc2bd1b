"""UPGrad, DualProj, ConFIG and MoCo, and the exact dual-cone solver they share: hand-computed
cases and each method's defining property."""

from __future__ import annotations

import math
from contextlib import nullcontext

import numpy as np
import pytest
import torch
from torch import Tensor, nn

import polytask.weighting  # noqa: F401  (registers every method)
from polytask.errors import PolytaskError
from polytask.metrics import masked_task_losses
from polytask.registry import ARCHITECTURES, WEIGHTINGS
from polytask.tasks import Batch, InputSpec, Task
from polytask.weighting._common import project_to_dual_cone
from polytask.weighting.base import GradContext
from polytask.weighting.config_grad import config_weights
from polytask.weighting.moco import project_to_simplex


class Linear(nn.Module):
    """L_t(theta) = g_t . theta + b_t: the task gradients are exactly the rows of G."""

    def __init__(self, grads: Tensor, offsets: Tensor | None = None) -> None:
        super().__init__()
        self.g = torch.as_tensor(grads, dtype=torch.float64)
        self.b = torch.ones(len(grads), dtype=torch.float64) if offsets is None else offsets.double()
        self.theta = nn.Parameter(torch.zeros(self.g.shape[1], dtype=torch.float64))

    def losses(self) -> Tensor:
        return self.g @ self.theta + self.b

    def shared_parameters(self) -> list[nn.Parameter]:
        return [self.theta]


def step(name: str, grads: Tensor, **options: object) -> tuple[Tensor, Tensor]:
    """One backward of weighting ``name`` on the linear model: (shared gradient, weights)."""
    model = Linear(grads)
    w = WEIGHTINGS.create(name, [f"t{i}" for i in range(len(grads))], **options)
    weights = w.backward(model.losses(), GradContext(model, "params"))
    return model.theta.grad, weights


def conflicting(seed: int, t: int = 4, d: int = 6) -> Tensor:
    """Random gradients with at least one conflicting pair."""
    gen = torch.Generator().manual_seed(seed)
    grads = torch.randn(t, d, generator=gen, dtype=torch.float64)
    assert float((grads @ grads.T).min()) < 0
    return grads


# ----------------------------------------------------------------------------- dual cone / UPGrad
def test_dual_cone_projection_meets_its_kkt_conditions() -> None:
    grads = conflicting(0, t=5, d=8)
    m = (grads @ grads.T).numpy()
    for u in [np.full(5, 0.2), np.eye(5)[1], np.array([0.5, 0.0, 2.0, 0.1, 0.3])]:
        v = project_to_dual_cone(m, u)
        mv = m @ v
        assert (v >= u).all() and mv.min() >= -1e-12        # feasible: J^T v is in the dual cone
        np.testing.assert_allclose(mv[v > u + 1e-12], 0.0, atol=1e-12)  # complementary slackness


def test_upgrad_hand_computed_two_dimensional_case() -> None:
    # dual cone of g1 = (1, 0), g2 = (-1, 1): {0 <= y1 <= y2}; pi(g1/2) = (1/4, 1/4), pi(g2/2) = (0, 1/2)
    g, w = step("upgrad", torch.tensor([[1.0, 0.0], [-1.0, 1.0]]))
    torch.testing.assert_close(g, torch.tensor([0.25, 0.75], dtype=torch.float64))
    torch.testing.assert_close(w, torch.tensor([1.0, 0.75], dtype=torch.float64))


def test_upgrad_is_the_mean_when_gradients_do_not_conflict() -> None:
    grads = torch.tensor([[1.0, 0.0, 2.0], [1.0, 1.0, 0.0], [0.0, 3.0, 1.0]])
    g, w = step("upgrad", grads)
    torch.testing.assert_close(g, grads.double().mean(0))
    torch.testing.assert_close(w, torch.full((3,), 1 / 3, dtype=torch.float64))


@pytest.mark.parametrize("seed", range(3))
def test_upgrad_update_does_not_conflict_with_any_task(seed: int) -> None:
    grads = conflicting(seed)
    g, _ = step("upgrad", grads)
    assert float((grads @ g).min()) >= -1e-12
    assert float(g.norm()) > 0


# ----------------------------------------------------------------------------- DualProj
def test_dualproj_hand_computed_two_dimensional_case() -> None:
    # dual cone of g1 = (1, 0), g2 = (-2, 1): {y1 >= 0, y2 >= 2 y1}; the mean (-1/2, 1/2) projects to (0, 1/2)
    g, w = step("dualproj", torch.tensor([[1.0, 0.0], [-2.0, 1.0]]))
    torch.testing.assert_close(g, torch.tensor([0.0, 0.5], dtype=torch.float64))
    torch.testing.assert_close(w, torch.tensor([1.0, 0.5], dtype=torch.float64))


def test_dualproj_keeps_a_non_conflicting_mean_and_projects_a_conflicting_one() -> None:
    grads = torch.tensor([[1.0, 0.0], [-0.5, 1.0]])          # they conflict, their mean does not
    g, _ = step("dualproj", grads)
    torch.testing.assert_close(g, grads.double().mean(0))
    grads = conflicting(1)
    g, _ = step("dualproj", grads)
    assert float((grads @ grads.mean(0)).min()) < 0 and float((grads @ g).min()) >= -1e-12


# ----------------------------------------------------------------------------- ConFIG
def test_config_hand_computed_orthogonal_case() -> None:
    # U = I, U^+ 1 = (1, 1), g_u = (1, 1)/sqrt 2, length = (2 + 1)/sqrt 2: update (3/2, 3/2)
    g, _ = step("config", torch.tensor([[2.0, 0.0], [0.0, 1.0]]))
    torch.testing.assert_close(g, torch.tensor([1.5, 1.5], dtype=torch.float64))


def test_config_matches_the_pseudo_inverse_formula_and_makes_equal_angles() -> None:
    grads = conflicting(2, t=3, d=5)
    g, _ = step("config", grads)
    units = grads / grads.norm(dim=1, keepdim=True)
    direction = torch.linalg.pinv(units) @ torch.ones(3, dtype=torch.float64)
    unit = direction / direction.norm()
    torch.testing.assert_close(g, (grads @ unit).sum() * unit, rtol=1e-10, atol=1e-12)
    cosines = units @ g / g.norm()
    torch.testing.assert_close(cosines, cosines[0].expand(3), rtol=1e-10, atol=1e-12)
    assert float(cosines[0]) > 0


def test_config_ignores_a_zero_gradient_and_is_zero_without_gradients() -> None:
    m = np.array([[4.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])  # g3 = 0: a zero unit row
    np.testing.assert_allclose(config_weights(m, 1e-12), [0.75, 1.5, 0.0])  # (3/2, 3/2) = 0.75 g1 + 1.5 g2
    np.testing.assert_array_equal(config_weights(np.zeros((2, 2)), 1e-12), np.zeros(2))


# ----------------------------------------------------------------------------- MoCo
def test_simplex_projection_hand_computed() -> None:
    torch.testing.assert_close(project_to_simplex(torch.tensor([0.4875, 0.45], dtype=torch.float64)),
                               torch.tensor([0.51875, 0.48125], dtype=torch.float64))
    torch.testing.assert_close(project_to_simplex(torch.tensor([1.5, 0.2, -1.0])), torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(project_to_simplex(torch.tensor([0.3, 0.6, 0.1])), torch.tensor([0.3, 0.6, 0.1]))


def test_moco_first_step_by_hand() -> None:
    # Y1 = 0.5 G = diag(0.5, 1); lambda = Proj(1/2 - 0.1 diag(0.25, 1) 1/2) = Proj(0.4875, 0.45) = (0.51875, 0.48125)
    g, lam = step("moco", torch.tensor([[1.0, 0.0], [0.0, 2.0]]), normalize=False)
    torch.testing.assert_close(lam, torch.tensor([0.51875, 0.48125], dtype=torch.float64))
    torch.testing.assert_close(g, torch.tensor([0.5 * 0.51875, 0.48125], dtype=torch.float64))


def test_moco_normalises_each_gradient_to_its_loss_by_default() -> None:
    model = Linear(torch.tensor([[3.0, 4.0], [0.0, 2.0]]), offsets=torch.tensor([2.0, 1.0]))
    w = WEIGHTINGS.create("moco", ["a", "b"])
    w.backward(model.losses(), GradContext(model, "params"))
    # g_t / ||g_t|| * L_t = (1.2, 1.6) and (0, 1); Y1 = beta_1 of that with beta_1 = 0.5
    torch.testing.assert_close(w.y, 0.5 * torch.tensor([[1.2, 1.6], [0.0, 1.0]], dtype=torch.float64), rtol=1e-7, atol=0)


def test_moco_tracked_estimate_converges_on_a_fixed_gradient_sequence() -> None:
    grads = conflicting(3, t=3, d=4)
    model = Linear(grads)
    w = WEIGHTINGS.create("moco", ["a", "b", "c"], normalize=False)
    ctx = GradContext(model, "params")
    errors = []
    for _ in range(60):
        model.theta.grad = None   # theta stays 0: the same gradients every step
        w.backward(model.losses(), ctx)
        errors.append(float((w.y - grads).norm() / grads.norm()))
    remaining = math.prod(1 - 0.5 / math.sqrt(k) for k in range(1, 61))   # Y_k - G = prod_j (1 - beta_j)(-G)
    assert errors[-1] == pytest.approx(remaining, rel=1e-9) and errors[-1] < 1e-3
    assert all(b < a for a, b in zip(errors, errors[1:]))


def test_moco_state_round_trips_and_continues_identically() -> None:
    grads = conflicting(4, t=3, d=4)
    first, second = Linear(grads), Linear(grads)
    a = WEIGHTINGS.create("moco", ["a", "b", "c"])
    a.backward(first.losses(), GradContext(first, "params"))
    b = WEIGHTINGS.create("moco", ["a", "b", "c"])
    b.load_state_dict(a.state_dict())
    first.theta.grad = None
    torch.testing.assert_close(b.backward(second.losses(), GradContext(second, "params")),
                               a.backward(first.losses(), GradContext(first, "params")))
    torch.testing.assert_close(second.theta.grad, first.theta.grad)


# ----------------------------------------------------------------------------- options and end to end
def test_bad_options_give_one_line_errors() -> None:
    for name, options, match in [("upgrad", {"mode": "weights"}, "mode"), ("dualproj", {"mode": "x"}, "mode"),
                                 ("config", {"mode": "x"}, "mode"), ("moco", {"beta": 0.0}, "beta"),
                                 ("moco", {"gamma": -1.0}, "gamma"), ("moco", {"rho": -0.1}, "rho"),
                                 ("moco", {"beta_sigma": -1.0}, "sigma")]:
        with pytest.raises(PolytaskError, match=match) as err:
            WEIGHTINGS.create(name, ["a", "b"], **options)
        assert "\n" not in str(err.value)


TASKS = [Task("reg", "regression"), Task("bin", "binary"), Task("cls", "multiclass", num_classes=3)]


@pytest.mark.parametrize(("name", "mode"), [("upgrad", "params"), ("upgrad", "rep"), ("dualproj", "params"),
                                            ("dualproj", "rep"), ("config", "params"), ("config", "rep"),
                                            ("moco", "params")])
def test_two_steps_on_mmoe_fill_every_gradient(name: str, mode: str) -> None:
    torch.manual_seed(0)
    model = ARCHITECTURES.create("mmoe", TASKS, InputSpec("dense", dim=6), num_experts=3, expert=[5], tower=[4])
    x = torch.randn(16, 6)
    y = {"reg": torch.randn(16), "bin": torch.randint(0, 2, (16,)).float(), "cls": torch.randint(0, 3, (16,))}
    batch = Batch(x, y, {n: torch.ones(16, dtype=torch.bool) for n in y})
    weighting = WEIGHTINGS.create(name, [t.name for t in TASKS], **({} if name == "moco" else {"mode": mode}))
    assert weighting.mode == mode
    ctx = GradContext(model, mode)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(2):
        opt.zero_grad(set_to_none=True)
        ctx.reset()
        with model.representation_cut() if mode == "rep" else nullcontext():
            losses = masked_task_losses(TASKS, model(batch.x), batch)
        weights = weighting.backward(losses, ctx)
        assert weights.shape == (3,) and torch.isfinite(weights).all()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
        opt.step()
