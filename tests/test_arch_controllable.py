"""Controllable MTL: slimmable layers, CI-KD + output distillation, FLOPs, the width search."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from polytask import ARCHITECTURES, SUITES, PolytaskError, TrainConfig, Trainer
from polytask.models.arch._slimmable import SlimmableLinear, SlimmableMLP, active_units
from polytask.models.arch.controllable import output_distillation
from polytask.tasks import InputSpec, Task
from polytask.trainer import evaluate_model, seed_everything
import polytask.data  # noqa: F401
import polytask.models.arch  # noqa: F401
from arch_helpers import abc_losses, nonzero

TASKS = [Task("a", "binary"), Task("b", "multiclass", num_classes=3), Task("c", "regression")]
DENSE = InputSpec("dense", dim=10)
B = 6


def inputs(seed: int = 0):
    return torch.randn(B, 10, generator=torch.Generator().manual_seed(seed))


def losses(out):
    return abc_losses(TASKS, out, B)


def build(**opts):
    torch.manual_seed(0)
    return ARCHITECTURES.create("controllable", TASKS, DENSE, **opts)


def test_active_units_is_ceil():
    assert [active_units(64, m) for m in (0.25, 0.5, 0.75, 1.0)] == [16, 32, 48, 64]
    assert active_units(5, 0.5) == 3 and active_units(10, 0.3) == 3 and active_units(3, 0.1) == 1


def test_slimmable_linear_at_half_width_is_the_weight_slice():
    torch.manual_seed(0)
    layer = SlimmableLinear(4, 6)
    x = torch.randn(3, 2)  # the previous layer ran at half width: 2 of 4 inputs
    k = active_units(6, 0.5)
    expected = x @ layer.weight[:3, :2].T + layer.bias[:3]
    assert k == 3 and torch.allclose(layer(x, k), expected)
    full = torch.randn(3, 4)
    assert torch.allclose(layer(full), F.linear(full, layer.weight, layer.bias))


def test_slimmable_mlp_by_hand():
    torch.manual_seed(0)
    net = SlimmableMLP(5, [4, 6], 2)
    x = torch.randn(3, 5)
    w0, w1, w2 = (layer.weight for layer in net.layers)
    b0, b1, b2 = (layer.bias for layer in net.layers)
    h = F.relu(x @ w0[:2].T + b0[:2])
    h = F.relu(h @ w1[:3, :2].T + b1[:3])
    assert torch.allclose(net(x, 0.5), h @ w2[:, :3].T + b2, atol=1e-6)
    assert net.macs(0.5) == 5 * 2 + 2 * 3 + 3 * 2 and net.macs() == 5 * 4 + 4 * 6 + 6 * 2


def test_flops_by_hand_and_monotone_in_widths():
    model = build(encoder=[4], rep_dim=3, decoder=[2])
    # encoder 10->4->3, decoders 3->2->{1, 3, 1}
    assert model.flops(model.full_config()) == 10 * 4 + 4 * 3 + (3 * 2 + 2 * 1) + (3 * 2 + 2 * 3) + (3 * 2 + 2 * 1)
    half = {"encoder": 0.5, "decoders": {"a": 0.5, "b": 0.5, "c": 0.5}}
    assert model.flops(half) == 10 * 2 + 2 * 3 + (3 + 1) + (3 + 3) + (3 + 1)
    big = build()
    grid = big.widths
    for e in grid:
        for d in grid:
            base = {"encoder": e, "decoders": {"a": d, "b": d, "c": d}}
            for w in grid:
                if w > e:
                    assert big.flops({**base, "encoder": w}) > big.flops(base)
                if w > d:
                    assert big.flops({**base, "decoders": {**base["decoders"], "b": w}}) > big.flops(base)


def test_output_distillation_by_hand():
    s, t = torch.tensor([[0.0, 1.0, 2.0]]), torch.tensor([[1.0, 0.0, 0.0]])
    p, q = t.softmax(-1), s.softmax(-1)
    assert torch.allclose(output_distillation(TASKS[1], s, t), (p * (p.log() - q.log())).sum())
    sb, tb = torch.tensor([[0.5], [-1.0]]), torch.tensor([[2.0], [0.0]])
    pb, qb = torch.sigmoid(tb), torch.sigmoid(sb)
    kl = pb * (pb / qb).log() + (1 - pb) * ((1 - pb) / (1 - qb)).log()
    assert torch.allclose(output_distillation(TASKS[0], sb, tb), kl.mean())
    assert torch.allclose(output_distillation(TASKS[2], sb, tb), ((sb - tb) ** 2).mean())
    for task, out in [(TASKS[0], sb), (TASKS[1], s), (TASKS[2], sb)]:
        assert float(output_distillation(task, out, out.clone())) == pytest.approx(0.0, abs=1e-7)


def test_distillation_is_zero_at_the_full_config_and_positive_below():
    model = build()
    x = inputs()
    assert float(model.distillation_loss(x, [model.full_config()]).detach()) == pytest.approx(0.0, abs=1e-7)
    small = {"encoder": 0.25, "decoders": {"a": 0.25, "b": 0.25, "c": 0.25}}
    assert float(model.distillation_loss(x, [small]).detach()) > 1e-4


def test_training_forward_sets_aux_loss_with_a_detached_teacher():
    model = build(encoder=[16], num_sampled=1).train()  # sandwich rule with one SubNet: the smallest only
    out = model(inputs())
    assert model.aux_loss is not None and model.aux_loss.requires_grad
    assert [c["encoder"] for c in model.sample_configs()] == [0.25]
    model.zero_grad(set_to_none=True)
    model.aux_loss.backward()
    g = model.encoder.layers[0].weight.grad
    # the student uses the first 4 of 16 hidden units; the teacher's other units get no gradient
    assert nonzero(g[:4]) and not nonzero(g[4:])
    assert not nonzero(model.heads["b"].layers[0].weight.grad[8:])
    # train-mode outputs are the full-width network's
    model.eval()
    full = model(inputs())
    assert model.aux_loss is None and all(torch.allclose(out[t], full[t]) for t in out)
    plain = build(num_sampled=0).train()
    plain(inputs())
    assert plain.aux_loss is None


def test_eval_forward_uses_the_configured_widths():
    model = build().eval()
    x = inputs()
    cfg = {"encoder": 0.5, "decoders": {"a": 1.0, "b": 0.25, "c": 0.75}}
    model.set_config(cfg)
    out = model(x)
    z = model.encoder(x, 0.5)
    for t, m in cfg["decoders"].items():
        assert torch.allclose(out[t], model.heads[t](z, m))
    assert model.flops() == model.flops(cfg) < model.flops(model.full_config())
    with pytest.raises(PolytaskError, match="covering every task"):
        model.set_config({"encoder": 0.5, "decoders": {"a": 1.0}})
    with pytest.raises(PolytaskError, match=r"\(0, 1\]"):
        model.set_config({"encoder": 0.0, "decoders": {"a": 1.0, "b": 1.0, "c": 1.0}})


def test_the_encoder_learns_from_every_task():
    model = build().train()
    for a in model.task_names:
        model.zero_grad(set_to_none=True)
        losses(model(inputs()))[a].backward()
        assert all(nonzero(p.grad) for p in model.encoder.parameters()), a


def _check_choice(model, imp, budget, choice):
    full = model.flops(model.full_config())
    assert choice["flops"] == model.flops(choice) <= budget * full + 1e-9
    assert choice["full_flops"] == full and math.isclose(choice["fraction"], choice["flops"] / full)
    d = choice["decoders"]
    for a in imp:
        for b in imp:
            if imp[a] > imp[b]:
                assert d[a] >= d[b], (imp, budget, choice)
    assert model.active == {"encoder": choice["encoder"], "decoders": d}


@pytest.mark.parametrize("search", ["exhaustive", "greedy"])
def test_configure_respects_budget_and_importance_order(search):
    model = build()
    g = torch.Generator().manual_seed(0)
    tables = [model.quality.clone(), torch.rand(model.quality.shape, generator=g)]  # proxy and an arbitrary table
    for table in tables:
        model.quality.copy_(table)
        for imp in [{"a": 1.0, "b": 0.0, "c": 0.0}, {"a": 0.1, "b": 0.6, "c": 0.3}, {"a": 1, "b": 1, "c": 2}]:
            for budget in (0.3, 0.5, 0.75, 1.0):
                _check_choice(model, imp, budget, model.configure(imp, budget, search=search))


def test_exhaustive_search_finds_the_best_utility():
    model = build()
    model.quality.copy_(torch.rand(model.quality.shape, generator=torch.Generator().manual_seed(1)))
    imp, budget = {"a": 0.5, "b": 0.3, "c": 0.2}, 0.6
    best = model.configure(imp, budget, search="exhaustive")
    greedy = model.configure(imp, budget, search="greedy")
    w, q, limit = model.widths, model.quality.tolist(), budget * model.flops(model.full_config())
    brute = max(
        sum(p * q[k][e][d] for k, (p, d) in enumerate(zip(imp.values(), ds)))
        for e in range(len(w)) for ds in itertools.product(range(len(w)), repeat=3)
        if ds[0] >= ds[1] >= ds[2] and model.flops({"encoder": w[e], "decoders": dict(zip("abc", (w[d] for d in ds)))}) <= limit)
    assert best["utility"] == pytest.approx(brute) and greedy["utility"] <= brute + 1e-9


def test_more_budget_never_lowers_utility_and_full_budget_is_full_width():
    model = build()
    utilities = [model.configure({"a": 1, "b": 1, "c": 1}, b)["utility"] for b in (0.3, 0.5, 0.75, 1.0)]
    assert utilities == sorted(utilities)
    assert model.configure({"a": 1, "b": 1, "c": 1}, 1.0)["fraction"] == 1.0


def test_configure_rejects_bad_input():
    model = build()
    with pytest.raises(PolytaskError, match="at least 0.2"):
        model.configure({"a": 1.0}, 0.05)
    with pytest.raises(PolytaskError, match="no task 'z'"):
        model.configure({"z": 1.0}, 0.5)
    with pytest.raises(PolytaskError, match="positive sum"):
        model.configure({"a": 0.0}, 0.5)
    with pytest.raises(PolytaskError, match="unknown search"):
        model.configure({"a": 1.0}, 0.5, search="random")
    with pytest.raises(PolytaskError, match="include 1.0"):
        build(widths=[0.25, 0.5])


def test_training_with_distillation_makes_subnets_work():
    suite = SUITES.create("synthetic-mmoe", num_samples=1000, dim=10, seed=0)
    small = {"encoder": 0.25, "decoders": {t: 0.25 for t in suite.task_names}}
    result = {}
    for sampled in (0, 2):
        seed_everything(0)
        model = ARCHITECTURES.create("controllable", suite.tasks, suite.input_spec, num_sampled=sampled)
        Trainer(model, suite.tasks, "ew", TrainConfig(epochs=8, batch_size=64, lr=3e-3, progress=False,
                                                      restore_best=False)).fit(suite.train)
        model.set_config(small)
        result[sampled] = sum(r["loss"] for r in evaluate_model(model, suite.tasks, suite.val).values())
        quality = model.calibrate(suite.val)
        assert torch.allclose(quality[:, -1, -1], torch.ones(len(suite.tasks)))
        assert model.active == small  # calibration restores the active widths
    assert result[2] < 0.6 * result[0]  # slicing a network never trained narrow fails; the SuperNet's SubNet works
