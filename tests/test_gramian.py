"""The Gramian engine: G G^T without forming G, on covered and uncovered layers, and every switched
method's update equal to the one from the explicit [T, D] matrix (today's path)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

import polytask.weighting  # noqa: F401  (registers every method)
from polytask.registry import WEIGHTINGS
from polytask.weighting._gramian import GramianEngine, ghost_cost, layer_grads, linear_gramian
from polytask.weighting.base import GradContext

from test_ddp import assert_two_processes_match_one

SWITCHED = {"mgda": {"mode": "params", "normalization": "loss+"}, "pcgrad": {}, "cagrad": {},
            "imtl": {"mode": "params"}, "nash-mtl": {}, "aligned-mtl": {}, "fairgrad": {}, "upgrad": {},
            "dualproj": {}, "config": {}, "gradvac": {"beta": 0.5}, "gradnorm": {}}


class Net(nn.Module):
    """A shared trunk (Linear layers, optionally a conv, an in-place ReLU, a layer used twice, two
    parallel experts of one shape) and one linear head per task."""

    def __init__(self, tasks: int = 3, conv: bool = False, inplace: bool = False, reuse: bool = False,
                 parallel: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv1d(1, 2, 3, padding=1) if conv else None
        self.inp = nn.Linear(6 * (2 if conv else 1), 8)
        self.mid = nn.Linear(8, 8, bias=False)
        self.act = nn.ReLU(inplace=inplace)
        self.reuse = reuse
        self.experts = nn.ModuleList(nn.Linear(8, 8) for _ in range(2)) if parallel else None
        self.heads = nn.ModuleList(nn.Linear(8, 1) for _ in range(tasks))

    def shared_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if not n.startswith("heads")]

    def forward(self, x: Tensor) -> list[Tensor]:
        if self.conv is not None:
            x = torch.tanh(self.conv(x.unsqueeze(1))).flatten(1)
        h = self.act(self.inp(x))
        h = torch.tanh(self.mid(h))
        if self.reuse:
            h = torch.tanh(self.mid(h))
        if self.experts is not None:
            h = sum(torch.tanh(e(h)) for e in self.experts)
        return [head(h).squeeze(-1) for head in self.heads]


def losses_of(model: Net, x: Tensor, y: Tensor) -> Tensor:
    return torch.stack([((out - y[:, i]) ** 2).mean() for i, out in enumerate(model(x))])


class ExplicitContext(GradContext):
    """Today's path: the Gramian of the explicit [T, D] per-task gradient matrix."""

    def gramian(self, losses: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        g = self.task_grads(losses)
        g = g.to(torch.promote_types(g.dtype, dtype))
        return (g @ g.T).double().cpu()


def data(n: int = 5, t: int = 3) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(n, 6, generator=gen), torch.randn(n, t, generator=gen)


@pytest.mark.parametrize("kind", ["plain", "conv", "inplace", "reuse", "parallel"])
def test_gramian_equals_explicit_gram_matrix(kind: str) -> None:
    model = Net(conv=kind == "conv", inplace=kind == "inplace", reuse=kind == "reuse", parallel=kind == "parallel")
    x, y = data()
    ctx = GradContext(model, "params")
    for _ in range(2):   # the first call installs the hooks and takes the fallback path throughout
        model.zero_grad()
        losses = losses_of(model, x, y)
        ctx.reset()
        m = ctx.gramian(losses)
        g = GradContext(model, "params").task_grads(losses)
        torch.testing.assert_close(m, (g @ g.T).double(), rtol=1e-5, atol=1e-7)
        ctx.apply(losses, shared_weights=torch.tensor([0.5, 1.0, 2.0]))
    engine = ctx.engine
    assert engine is not None
    uncovered = {id(p) for p in engine.uncovered}
    if model.conv is not None:
        assert {id(p) for p in model.conv.parameters()} <= uncovered
    assert id(model.inp.weight) not in uncovered and id(model.mid.weight) not in uncovered
    ctx.close()


def test_inplace_modified_output_falls_back_and_plain_layers_do_not() -> None:
    model = Net(inplace=True)
    x, y = data()
    ctx = GradContext(model, "params")
    for _ in range(2):
        losses = losses_of(model, x, y)
        ctx.reset()
        ctx.gramian(losses)
        step = ctx.engine.step   # type: ignore[union-attr]
        assert step is not None
        ghosted = [layer.module for group in step.groups for layer in group.layers]
        ctx.apply(losses)
    assert model.mid in ghosted and model.inp not in ghosted   # inp's output went through ReLU(inplace)
    ctx.close()


@pytest.mark.parametrize("n", [3, 400])
def test_linear_gramian_ghost_and_direct_branches(n: int) -> None:
    gen = torch.Generator().manual_seed(0)
    a, delta = torch.randn(n, 7, generator=gen, dtype=torch.float64), torch.randn(4, n, 5, generator=gen,
                                                                                 dtype=torch.float64)
    ghost, direct = ghost_cost(n, 7, 5, 4)
    assert (ghost < direct) == (n == 3)
    g = torch.stack([torch.cat([(d.T @ a).reshape(-1), d.sum(0)]) for d in delta])
    torch.testing.assert_close(layer_grads(a[None], delta[None], True), g[None])
    for bias, rows in ((True, g), (False, g[:, :35])):
        m, formed = linear_gramian(a[None], delta[None], bias)
        torch.testing.assert_close(m, rows @ rows.T)
        if n == 3:
            assert formed is None
        else:   # the direct branch hands its rows to the update
            torch.testing.assert_close(formed, rows[None])
        # two layers of one shape together: the sum of their Gramians
        a2, d2 = torch.stack([a, 2 * a]), torch.stack([delta, -delta])
        g2 = torch.stack([torch.cat([(d.T @ (2 * a)).reshape(-1), d.sum(0)]) for d in -delta])
        rows2 = g2 if bias else g2[:, :35]
        torch.testing.assert_close(linear_gramian(a2, d2, bias)[0], rows @ rows.T + rows2 @ rows2.T)


@pytest.mark.parametrize("kind", ["reuse", "parallel", "parallel-direct"])
@pytest.mark.parametrize("name", sorted(SWITCHED))
def test_switched_method_update_equals_explicit_path(name: str, kind: str) -> None:
    """A layer used twice (its calls' rows joined) and two experts of one shape (their products taken
    together: ghost products on 5 samples, per-task gradients on 40)."""
    model = Net(reuse=kind == "reuse", parallel=kind != "reuse")
    ref = copy.deepcopy(model)
    x, y = data(40 if kind == "parallel-direct" else 5)
    names = ["a", "b", "c"]
    w_new, w_old = WEIGHTINGS.create(name, names, **SWITCHED[name]), WEIGHTINGS.create(name, names, **SWITCHED[name])
    new, old = GradContext(model, "params"), ExplicitContext(ref, "params")
    for step in range(2):   # step 0: hooks installed (fallback); step 1: the ghost products
        for net, weighting, ctx in ((model, w_new, new), (ref, w_old, old)):
            net.zero_grad(set_to_none=True)
            losses = losses_of(net, x, y)
            ctx.reset()
            weighting.backward(losses, ctx)
        for (k, p), q in zip(model.named_parameters(), ref.parameters()):
            assert p.grad is not None and q.grad is not None, k
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{step} {k}: {m}")
        for (k, p), q in zip(w_new.named_parameters(), w_old.parameters()):   # learned weights (GradNorm, IMTL)
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{step} {k}: {m}")
    assert new.engine is not None and new.engine.step is None   # apply ended the step


def test_engine_refuses_update_without_gramian() -> None:
    model = Net()
    engine = GramianEngine(model, model.shared_parameters())
    with pytest.raises(RuntimeError, match="gramian"):
        engine.shared_grads(torch.ones(3))


@pytest.mark.parametrize("weighting", [["nash-mtl", "params"]])
def test_ddp_two_processes_match_one_on_the_gramian_path(tmp_path, weighting: list[str]) -> None:
    """1 process: ghost products; 2 processes: per-layer gradients averaged over ranks. Same weights.
    (tests/test_ddp.py runs pcgrad and cagrad, i.e. ``shared_weights``, on this path too; Nash-MTL
    gives every parameter alpha-weighted gradients and clips.)"""
    assert_two_processes_match_one(tmp_path, weighting)


def test_imtl_on_raw_losses_equals_imtl_on_scaled_losses() -> None:
    """IMTL takes D M D (D = diag e^s) from the raw losses' Gramian: the same update as IMTL-G on the
    scaled losses e^s_t L_t - s_t themselves (the former path)."""
    from polytask.weighting.imtl import imtl_g_weights

    model, x, y = Net(), *data()
    ref = copy.deepcopy(model)
    imtl = WEIGHTINGS.create("imtl", ["a", "b", "c"], mode="params")
    with torch.no_grad():
        imtl.log_scale.copy_(torch.tensor([0.3, -0.5, 1.0]))
    ctx = GradContext(model, "params")
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        losses = losses_of(model, x, y)
        ctx.reset()
        alpha = imtl.backward(losses, ctx)
    s = imtl.log_scale.detach()
    scaled = torch.exp(s) * losses_of(ref, x, y) - s
    old = GradContext(ref, "params")
    g = old.task_grads(scaled)
    expected = imtl_g_weights((g @ g.T).double()).to(g)
    old.apply(scaled, None, expected @ g)
    torch.testing.assert_close(alpha, expected)
    for (k, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
