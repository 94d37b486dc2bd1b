"""Loss and gradient balancing methods: hand-computed cases and the papers' stated properties."""

from __future__ import annotations

import io
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
from polytask.weighting.base import GradContext
from polytask.weighting.aligned_mtl import alignment_matrix
from polytask.weighting.fairgrad import fairgrad_weights
from polytask.weighting.graddrop import graddrop_gradient
from polytask.weighting.gradvac import gradvac_coefficients
from polytask.weighting.imtl import imtl_g_weights
from polytask.weighting.nash_mtl import nash_weights

ALL = ["aligned-mtl", "cagrad", "db-mtl", "dwa", "ew", "fairgrad", "famo", "graddrop", "gradnorm", "gradvac",
       "imtl", "mgda", "nash-mtl", "pcgrad", "rlw", "stch", "uw"]
LOSS_ONLY = ["dwa", "ew", "famo", "rlw", "stch", "uw"]
ONE_MODE = {"db-mtl": "params", "graddrop": "rep"}
BOTH_MODES = [n for n in ALL if n not in LOSS_ONLY and n not in ONE_MODE]


class Linear(nn.Module):
    """L_t(theta) = g_t . theta + b_t: the task gradients are exactly the rows of G."""

    def __init__(self, grads: Tensor, offsets: Tensor | None = None) -> None:
        super().__init__()
        self.g = grads.double()
        self.b = torch.ones(len(grads), dtype=torch.float64) if offsets is None else offsets.double()
        self.theta = nn.Parameter(torch.zeros(grads.shape[1], dtype=torch.float64))

    def losses(self) -> Tensor:
        return self.g @ self.theta + self.b

    def shared_parameters(self) -> list[nn.Parameter]:
        return [self.theta]


def step(name: str, grads: Tensor, offsets: Tensor | None = None, **options: object) -> tuple[Tensor, Tensor, object]:
    """One backward of weighting ``name`` on the linear model: (shared gradient, weights, weighting)."""
    model = Linear(torch.as_tensor(grads, dtype=torch.float64),
                   None if offsets is None else torch.as_tensor(offsets, dtype=torch.float64))
    if name in BOTH_MODES:
        options = {"mode": "params", **options}
    w = WEIGHTINGS.create(name, [f"t{i}" for i in range(len(grads))], **options)
    weights = w.backward(model.losses(), GradContext(model, "params"))
    return model.theta.grad, weights, w


def test_registry_lists_the_17_foundation_methods_each_from_its_own_module() -> None:
    assert set(ALL) <= set(WEIGHTINGS.names())
    modules = [WEIGHTINGS.get(n).__module__ for n in WEIGHTINGS.names()]
    assert all(m.startswith("polytask.weighting.") for m in modules) and len(set(modules)) == len(modules)


def test_pcgrad_projects_conflicting_pair_and_leaves_agreeing_pair() -> None:
    g, _, _ = step("pcgrad", torch.tensor([[1.0, 0.0], [-1.0, 1.0]]))
    # g1 . g2 = -1: g1' = g1 + 1/2 g2 = (0.5, 0.5);  g2' = g2 + g1 = (0, 1)
    torch.testing.assert_close(g, torch.tensor([0.5, 1.5], dtype=torch.float64))
    g, w, _ = step("pcgrad", torch.tensor([[1.0, 0.0], [1.0, 1.0]]))
    torch.testing.assert_close(g, torch.tensor([2.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(w, torch.ones(2, dtype=torch.float64))


def test_mgda_two_tasks_is_closed_form_min_norm_point() -> None:
    g1, g2 = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.3, 2.0, 0.0])
    g, alpha, _ = step("mgda", torch.stack([g1, g2]), normalization="none")
    m11, m12, m22 = g1 @ g1, g1 @ g2, g2 @ g2
    gamma = (m22 - m12) / (m11 + m22 - 2 * m12)   # unclipped: lies in (0, 1) here
    expected = gamma * g1 + (1 - gamma) * g2
    torch.testing.assert_close(g, expected.double())
    assert float(alpha.sum()) == pytest.approx(1.0)
    assert float(g @ (g1 - g2).double()) == pytest.approx(0.0, abs=1e-9)  # min-norm: orthogonal to the edge


def test_mgda_loss_plus_normalisation_changes_the_weights() -> None:
    grads = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    _, alpha, _ = step("mgda", grads, offsets=torch.tensor([1.0, 4.0]), normalization="loss+")
    # normalised gradients e1/1 and e2/4: min of a^2 + (1-a)^2/16 at a = 1/17
    torch.testing.assert_close(alpha, torch.tensor([1 / 17, 16 / 17], dtype=torch.float64))


def test_mgda_orthogonal_gradients_weigh_inversely_to_squared_norm() -> None:
    _, alpha, _ = step("mgda", torch.tensor([[2.0, 0.0], [0.0, 1.0]]), normalization="none")
    # min 4a^2 + (1 - a)^2 at a = 1/5: alpha_t proportional to 1/||g_t||^2
    torch.testing.assert_close(alpha, torch.tensor([0.2, 0.8], dtype=torch.float64), rtol=0, atol=1e-12)


def test_mgda_dominated_pair_puts_all_weight_on_the_short_gradient() -> None:
    # g1 . g2 = 2 >= ||g1||^2 = 1: the min-norm point of the segment is g1 itself
    g, alpha, _ = step("mgda", torch.tensor([[1.0, 0.0], [2.0, 1.0]]), normalization="none")
    torch.testing.assert_close(alpha, torch.tensor([1.0, 0.0], dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(g, torch.tensor([1.0, 0.0], dtype=torch.float64))


def test_mgda_three_gradients_min_norm_on_an_edge() -> None:
    # edge g1-g2: min 4a^2 + (1 - a)^2 at a = 1/5, d = (0.4, 0.8), ||d||^2 = 0.8 <= g3 . d = 3.6
    grads = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 3.0]])
    g, alpha, _ = step("mgda", grads, normalization="none")
    torch.testing.assert_close(alpha, torch.tensor([0.2, 0.8, 0.0], dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(g, torch.tensor([0.4, 0.8], dtype=torch.float64))


@pytest.mark.parametrize("seed", range(4))
def test_mgda_weights_meet_the_kkt_conditions_exactly(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    grads = torch.randn(3 + seed, 4, generator=gen, dtype=torch.float64)
    g, alpha, _ = step("mgda", grads, normalization="none")
    m = grads @ grads.T
    value = alpha @ m @ alpha
    assert float(alpha.min()) >= 0 and float(alpha.sum()) == pytest.approx(1.0, abs=1e-12)
    assert float((m @ alpha - value).min()) >= -1e-12                       # no vertex lowers the norm
    support = alpha > 1e-9
    torch.testing.assert_close((m @ alpha)[support], value.expand(int(support.sum())), rtol=0, atol=1e-12)
    torch.testing.assert_close(g, alpha @ grads)


def test_cagrad_with_c_zero_is_the_mean_gradient_times_t() -> None:
    grads = torch.tensor([[1.0, -2.0, 0.5], [-1.0, 0.0, 2.0], [0.5, 1.0, 1.0]])
    g, _, _ = step("cagrad", grads, c=0.0)
    torch.testing.assert_close(g, 3 * grads.mean(0).double(), rtol=1e-5, atol=1e-6)


def test_cagrad_improves_the_worst_task_over_the_mean() -> None:
    grads = torch.tensor([[1.0, 0.0], [-0.8, 0.3]])
    g, _, _ = step("cagrad", grads, c=0.5)
    mean = grads.mean(0).double()
    assert (grads.double() @ g).min() / g.norm() > (grads.double() @ mean).min() / mean.norm()


def test_imtl_aggregated_gradient_has_equal_projections() -> None:
    torch.manual_seed(0)
    grads = torch.randn(4, 7)
    g, alpha, _ = step("imtl", grads, loss_scale=False)
    proj = grads.double() @ g / grads.double().norm(dim=1)
    torch.testing.assert_close(proj, proj[0].expand(4), rtol=1e-6, atol=1e-9)
    assert float(alpha.sum()) == pytest.approx(1.0)
    alpha_direct = imtl_g_weights(grads.double() @ grads.double().T)
    torch.testing.assert_close(alpha, alpha_direct)


def test_imtl_loss_scale_gets_its_gradient() -> None:
    _, _, w = step("imtl", torch.eye(2), offsets=torch.tensor([2.0, 0.5]))
    torch.testing.assert_close(w.log_scale.grad, torch.tensor([1.0, -0.5]))  # e^0 L - 1


def test_nash_mtl_weights_solve_the_bargaining_equation() -> None:
    torch.manual_seed(1)
    grads = 7.0 * torch.randn(3, 6)   # ||M||_F far from 1: the raw Eq. 5, not the normalised one
    _, alpha, _ = step("nash-mtl", grads, max_norm=0.0)
    m = grads.double() @ grads.double().T
    torch.testing.assert_close(m @ alpha, 1 / alpha, rtol=1e-7, atol=1e-9)
    assert nash_weights(np.array([[1.0, -1.0], [-1.0, 1.0]]), np.ones(2)) is None  # opposite gradients: no solution


def test_nash_mtl_orthogonal_gradients_get_inverse_norm_weights() -> None:
    # M = diag(4, 1): alpha_t^2 ||g_t||^2 = 1, so alpha = (1/2, 1) and each task improves by 1/alpha_t
    g, alpha, _ = step("nash-mtl", torch.tensor([[2.0, 0.0], [0.0, 1.0]]), max_norm=0.0)
    torch.testing.assert_close(alpha, torch.tensor([0.5, 1.0], dtype=torch.float64))
    torch.testing.assert_close(g, torch.tensor([1.0, 1.0], dtype=torch.float64))


def test_nash_mtl_weights_scale_inversely_with_the_gradients_and_warm_start_keeps_them() -> None:
    torch.manual_seed(2)
    grads = torch.randn(3, 5, dtype=torch.float64)
    model = Linear(grads)
    w = WEIGHTINGS.create("nash-mtl", ["a", "b", "c"], max_norm=0.0)
    ctx = GradContext(model, "params")
    first = w.backward(model.losses(), ctx)
    model.theta.grad, ctx.grads = None, None
    torch.testing.assert_close(w.backward(model.losses(), ctx), first, rtol=1e-12, atol=0)
    m = (grads @ grads.T).numpy()
    np.testing.assert_allclose(nash_weights(m, first.numpy()), first.numpy(), rtol=1e-14)  # warm start: a fixed point
    scaled = nash_weights(100.0 * (grads @ grads.T).numpy(), first.numpy())   # M -> c^2 M: alpha -> alpha / c
    np.testing.assert_allclose(scaled, first.numpy() / 10.0, rtol=1e-9)


def test_nash_mtl_reuses_weights_between_updates() -> None:
    model = Linear(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
    w = WEIGHTINGS.create("nash-mtl", ["a", "b"], update_weights_every=2, max_norm=0.0)
    ctx = GradContext(model, "params")
    first = w.backward(model.losses(), ctx)
    model.theta.grad = None
    ctx.grads = None
    second = w.backward(model.losses(), ctx)   # no per-task gradients this step
    assert ctx.grads is None
    torch.testing.assert_close(second, first)
    torch.testing.assert_close(model.theta.grad, first @ model.g)


def test_uw_log_variances_move_to_log_loss_scales() -> None:
    w = WEIGHTINGS.create("uw", ["a", "b"])
    opt = torch.optim.SGD(w.parameters(), lr=0.1)
    losses = torch.tensor([0.5, 4.0])
    for _ in range(400):
        opt.zero_grad()
        w.backward(losses)
        opt.step()
    torch.testing.assert_close(w.log_vars.detach(), losses.log(), atol=1e-2, rtol=0)


def test_dwa_follows_its_rule_on_scripted_epoch_losses() -> None:
    w = WEIGHTINGS.create("dwa", ["a", "b"], temperature=2.0)
    losses = torch.tensor([1.0, 2.0], requires_grad=True)
    torch.testing.assert_close(w.backward(losses), torch.ones(2))
    w.end_epoch(0, torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(w.backward(losses), torch.ones(2))   # still uniform in epoch 2
    w.end_epoch(1, torch.tensor([0.5, 1.8]))
    losses.grad = None
    weights = w.backward(losses)
    r = torch.tensor([0.5, 0.9])
    expected = 2 * torch.exp(r / 2) / torch.exp(r / 2).sum()
    torch.testing.assert_close(weights, expected)
    torch.testing.assert_close(losses.grad, expected)
    assert weights[1] > weights[0]   # the slower task gets more weight


def test_famo_follows_its_update_rule_on_scripted_losses() -> None:
    w = WEIGHTINGS.create("famo", ["a", "b"], lr=0.025, gamma=0.0)
    first = torch.tensor([1.0, 1.0], requires_grad=True)
    weights = w.backward(first)
    torch.testing.assert_close(weights, torch.tensor([0.5, 0.5]) / (0.5 / 1 + 0.5 / 1))
    torch.testing.assert_close(w.logits, torch.zeros(2))          # nothing to compare with yet
    second = torch.tensor([0.5, 0.9], requires_grad=True)
    weights = w.backward(second)
    # delta = log(1/0.5), log(1/0.9): task a improved more, so its logit falls; first Adam step moves by lr*sign
    torch.testing.assert_close(w.logits, torch.tensor([-0.025, 0.025]), atol=1e-6, rtol=0)
    z = torch.softmax(torch.tensor([-0.025, 0.025]), 0)
    c = (z / second.detach()).sum()
    torch.testing.assert_close(weights, z / (c * second.detach()))
    torch.testing.assert_close(second.grad, z / (c * second.detach()))


def test_gradnorm_weights_move_as_its_rule_says() -> None:
    model = Linear(torch.tensor([[1.0, 0.0], [0.0, 3.0]]))   # equal losses, gradient norms 1 and 3
    w = WEIGHTINGS.create("gradnorm", ["a", "b"], alpha=1.5)
    opt = torch.optim.SGD(w.parameters(), lr=0.1)
    ctx = GradContext(model, "params")
    w.backward(model.losses(), ctx)
    # equal training rates -> common target mean(w_i ||g_i||) = 2: dL_grad/dw = sign(w||g|| - 2) ||g|| = (-1, +3)
    torch.testing.assert_close(w.weights.grad, torch.tensor([-1.0, 3.0]))
    opt.step()
    ctx.grads = None
    weights = w.backward(model.losses(), ctx)
    assert weights[0] > 1.0 > weights[1]
    assert float(weights.sum()) == pytest.approx(2.0)    # renormalised to T


def test_aligned_mtl_gram_matrix_is_aligned() -> None:
    torch.manual_seed(2)
    grads = torch.randn(3, 8, dtype=torch.float64) * torch.tensor([[1.0], [5.0], [0.2]], dtype=torch.float64)
    m = grads @ grads.T
    b = alignment_matrix(m)
    aligned = b @ grads
    singular = torch.linalg.svdvals(aligned)
    torch.testing.assert_close(singular, singular[0].expand(3))
    torch.testing.assert_close(singular[0] ** 2, torch.linalg.eigvalsh(m).min())   # scale: smallest singular value
    g, w, _ = step("aligned-mtl", grads)
    torch.testing.assert_close(g, aligned.sum(0))


def test_db_mtl_scaled_gradients_have_equal_norms_and_ema_rule() -> None:
    grads = torch.tensor([[1.0, 0.0], [0.0, 10.0]], dtype=torch.float64)
    offsets = torch.tensor([2.0, 1.0])
    model = Linear(grads, offsets)
    w = WEIGHTINGS.create("db-mtl", ["a", "b"], beta=0.9)
    ctx = GradContext(model, "params")
    alpha = w.backward(model.losses(), ctx)
    log_grads = grads / offsets[:, None].double()         # grad log L_t = g_t / L_t
    torch.testing.assert_close(w.grad_ema, 0.1 * log_grads)
    scaled = alpha[:, None] * w.grad_ema
    torch.testing.assert_close(scaled.norm(dim=1), scaled.norm(dim=1).max().expand(2))
    torch.testing.assert_close(model.theta.grad, scaled.sum(0))
    ctx.grads = None
    w.backward(model.losses(), ctx)
    torch.testing.assert_close(w.grad_ema, log_grads + 0.9 * (0.1 * log_grads - log_grads))


def test_gradvac_adjusted_similarity_reaches_target() -> None:
    g1 = torch.tensor([1.0, 0.0], dtype=torch.float64)
    g2 = torch.tensor([-0.2, math.sqrt(1 - 0.04)], dtype=torch.float64)   # cos = -0.2
    grads = torch.stack([g1, g2 * 3])
    targets = torch.full((2, 2), 0.5, dtype=torch.float64)
    c = gradvac_coefficients(grads @ grads.T, targets, [[1], [0]], beta=0.01)
    adjusted = c[0] @ grads
    cos = adjusted @ grads[1] / (adjusted.norm() * grads[1].norm())
    assert float(cos) == pytest.approx(0.5)
    assert float(targets[0, 1]) == pytest.approx(0.99 * 0.5 + 0.01 * -0.2)
    agreeing = torch.stack([g1, g1 + g2])
    c = gradvac_coefficients(agreeing @ agreeing.T, torch.zeros(2, 2, dtype=torch.float64), [[1], [0]], 0.01)
    torch.testing.assert_close(c, torch.eye(2, dtype=torch.float64))   # above target: untouched


def test_graddrop_keeps_everything_when_all_gradients_agree() -> None:
    torch.manual_seed(3)
    per_task = torch.rand(3, 4, 5) + 0.1
    rep = torch.rand(4, 5) + 0.1
    out = graddrop_gradient(per_task, rep, torch.rand(5))
    torch.testing.assert_close(out, per_task.sum(0))
    mixed = torch.tensor([[[1.0]], [[-3.0]]])           # P = 1/2 (1 - 2/4) = 1/4
    keep_neg = graddrop_gradient(mixed, torch.ones(1, 1), torch.tensor([0.5]))
    keep_pos = graddrop_gradient(mixed, torch.ones(1, 1), torch.tensor([0.1]))
    assert float(keep_neg) == -3.0 and float(keep_pos) == 1.0


def test_fairgrad_weights_satisfy_its_equation() -> None:
    torch.manual_seed(4)
    grads = torch.randn(3, 6, dtype=torch.float64)
    m = (grads @ grads.T).numpy()
    for alpha in (1.0, 2.0):
        w = fairgrad_weights(m, alpha)
        np.testing.assert_allclose(m @ w, np.power(w, -1.0 / alpha), rtol=1e-5)
    g, w, _ = step("fairgrad", grads, alpha=2.0, max_norm=0.0)
    torch.testing.assert_close(g, 3 * (w @ grads))


def test_stch_weights_are_softmax_of_gaps_to_running_minimum() -> None:
    w = WEIGHTINGS.create("stch", ["a", "b", "c"], mu=0.5, warmup_epochs=1, log=False)
    losses = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    torch.testing.assert_close(w.backward(losses), torch.ones(3))   # warm-up: plain sum
    torch.testing.assert_close(losses.grad, torch.ones(3))
    w.end_epoch(0, torch.tensor([1.0, 2.0, 3.0]))
    losses = torch.tensor([1.5, 1.0, 3.5], requires_grad=True)
    weights = w.backward(losses)
    z = torch.tensor([1.0, 1.0, 3.0])
    expected = 3 * torch.softmax((losses.detach() - z) / 0.5, 0)
    torch.testing.assert_close(weights, expected)
    torch.testing.assert_close(losses.grad, expected)


def test_stch_warmup_reference_uses_last_warmup_epoch_mean() -> None:
    w = WEIGHTINGS.create("stch", ["a", "b"], warmup_epochs=2, reference="warmup")
    w.end_epoch(0, torch.tensor([5.0, 5.0]))
    w.end_epoch(1, torch.tensor([2.0, 4.0]))
    torch.testing.assert_close(w.ideal, torch.tensor([2.0, 4.0]).log())
    with pytest.raises(PolytaskError, match="warmup_epochs"):
        WEIGHTINGS.create("stch", ["a"], warmup_epochs=0, reference="warmup")


def test_rlw_is_reproducible_with_its_seed() -> None:
    def draws(seed: int) -> Tensor:
        w = WEIGHTINGS.create("rlw", ["a", "b", "c"], seed=seed)
        return torch.stack([w.backward(torch.ones(3, requires_grad=True)) for _ in range(3)])

    torch.testing.assert_close(draws(7), draws(7))
    assert not torch.allclose(draws(7), draws(8))
    assert torch.allclose(draws(7).sum(1), torch.ones(3))


def test_weighting_state_round_trips_with_extra_state() -> None:
    grads = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
    _, _, w = step("db-mtl", grads)
    buf = io.BytesIO()
    torch.save(w.state_dict(), buf)
    buf.seek(0)
    fresh = WEIGHTINGS.create("db-mtl", ["t0", "t1"])
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    torch.testing.assert_close(fresh.grad_ema, w.grad_ema)
    assert int(fresh.step) == 1


def test_bad_options_give_one_line_errors() -> None:
    with pytest.raises(PolytaskError, match="mode"):
        WEIGHTINGS.create("pcgrad", ["a", "b"], mode="weights")
    with pytest.raises(PolytaskError, match="normalization"):
        WEIGHTINGS.create("mgda", ["a", "b"], normalization="max")
    with pytest.raises(PolytaskError, match="no option"):
        WEIGHTINGS.create("graddrop", ["a", "b"], mode="params")


# ----------------------------------------------------------------- end to end on a tiny MMoE
TASKS = [Task("reg", "regression"), Task("bin", "binary"), Task("cls", "multiclass", num_classes=3)]
SPEC = InputSpec("dense", dim=6)


def _mmoe_batch() -> tuple[nn.Module, Batch]:
    torch.manual_seed(0)
    model = ARCHITECTURES.create("mmoe", TASKS, SPEC, num_experts=3, expert=[5], tower=[4])
    x = torch.randn(16, 6)
    y = {"reg": torch.randn(16), "bin": torch.randint(0, 2, (16,)).float(), "cls": torch.randint(0, 3, (16,))}
    mask = {n: torch.ones(16, dtype=torch.bool) for n in y}
    mask["bin"][:5] = False
    return model, Batch(x, y, mask)


CASES = ([(n, "none") for n in LOSS_ONLY] + list(ONE_MODE.items())
         + [(n, m) for n in BOTH_MODES for m in ("params", "rep")])


@pytest.mark.parametrize(("name", "mode"), CASES)
def test_one_step_on_mmoe_fills_every_gradient(name: str, mode: str) -> None:
    model, batch = _mmoe_batch()
    options = {"mode": mode} if name in BOTH_MODES else {}
    weighting = WEIGHTINGS.create(name, [t.name for t in TASKS], **options)
    ctx = GradContext(model, weighting.mode) if weighting.mode != "none" else None
    cut = model.representation_cut if weighting.mode == "rep" else nullcontext
    params = list(model.parameters()) + list(weighting.parameters())
    opt = torch.optim.SGD(params, lr=0.01)
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(2):   # two steps: stateful methods (FAMO, DB-MTL, GradNorm) use their state
        opt.zero_grad(set_to_none=True)
        if ctx is not None:
            ctx.grads = None
        with cut():
            losses = masked_task_losses(TASKS, model(batch.x), batch)
        weights = weighting.backward(losses, ctx)
        assert weights.shape == (3,) and torch.isfinite(weights).all()
        for p in params:
            assert p.grad is not None and torch.isfinite(p.grad).all()
        opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("mode", ["params", "rep"])
def test_grad_context_batched_rows_match_one_pass_per_task(mode: str) -> None:
    model, batch = _mmoe_batch()
    with model.representation_cut() if mode == "rep" else nullcontext():
        losses = masked_task_losses(TASKS, model(batch.x), batch)
    batched = GradContext(model, mode).task_grads(losses)
    looped = GradContext(model, mode, task_chunk=1).task_grads(losses)
    chunked = GradContext(model, mode, task_chunk=2).task_grads(losses)
    targets = [model.rep_leaf] if mode == "rep" else GradContext(model, mode).shared
    manual = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(l, targets, retain_graph=True)])
                          for l in losses])
    for got in (batched, looped, chunked):
        torch.testing.assert_close(got, manual)


def test_grad_context_apply_matches_weighted_backward() -> None:
    model, batch = _mmoe_batch()
    w = torch.tensor([0.2, 1.0, 3.0])
    losses = masked_task_losses(TASKS, model(batch.x), batch)
    (w * losses).sum().backward()
    expected = [p.grad.clone() for p in model.parameters()]
    for mode, with_grads in [("params", True), ("rep", True), ("params", False), ("rep", False)]:
        model.zero_grad(set_to_none=True)
        ctx = GradContext(model, mode)
        with model.representation_cut() if mode == "rep" else nullcontext():
            losses = masked_task_losses(TASKS, model(batch.x), batch)
        if with_grads:   # without: apply back-propagates the weighted sum itself
            ctx.task_grads(losses)
        ctx.apply(losses, w)
        for p, e in zip(model.parameters(), expected):
            torch.testing.assert_close(p.grad, e)
