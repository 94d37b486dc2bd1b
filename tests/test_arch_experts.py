"""Expert architectures: cross-stitch, CGC, PLE, HoME (and the mmoe diagnostics).

The checks every architecture shares (shapes, ownership, rep mode, diagnostics shapes) are in
test_arch_contract.py; these are the ones specific to each architecture.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from polytask import ARCHITECTURES, SUITES, TrainConfig, Trainer
from polytask.models.arch._experts import ExpertBatchNorm, FeatureGate, mix
from polytask.tasks import InputSpec, Task
from polytask.trainer import seed_everything
import polytask.data  # noqa: F401
import polytask.models.arch  # noqa: F401
from arch_helpers import abc_losses, example_inputs, grads_of, names_of, nonzero, open_feature_gates

ARCHS = ["cross-stitch", "cgc", "ple", "home"]
TASKS = [Task("a", "binary"), Task("b", "multiclass", num_classes=3), Task("c", "regression")]
DENSE = InputSpec("dense", dim=10)
RECSYS = InputSpec("recsys", field_vocab=(5, 7), seq_names=("click",), item_vocab=20, seq_len=4, dense_dim=3)
IMAGE = InputSpec("image", shape=(1, 8, 8))
B = 6


def inputs(spec: InputSpec, seed: int = 0):
    return example_inputs(spec, B, seed)


def losses(out):
    return abc_losses(TASKS, out, B)


def build(name: str, spec: InputSpec = DENSE, tasks=TASKS, **opts):
    torch.manual_seed(0)
    if spec.kind == "image":
        opts.setdefault("backbone_options", {"channels": (4,)})
    return open_feature_gates(ARCHITECTURES.create(name, tasks, spec, **opts))


def test_registered():
    assert {"cross-stitch", "cgc", "ple", "home"} <= set(ARCHITECTURES.names())


@pytest.mark.parametrize("spec", [DENSE, RECSYS], ids=["dense", "recsys"])
@pytest.mark.parametrize("name", ARCHS)
def test_every_parameter_learns(name, spec):
    model = build(name, spec)
    g = grads_of(model, sum(losses(model(inputs(spec))).values()))
    assert [n for n, v in g.items() if not nonzero(v)] == []


@pytest.mark.parametrize("name", ["cross-stitch", "cgc", "home"])
def test_image_inputs(name):
    out = build(name, IMAGE)(inputs(IMAGE))
    assert {k: tuple(v.shape) for k, v in out.items()} == {"a": (B, 1), "b": (B, 3), "c": (B, 1)}


@pytest.mark.parametrize("name", ["cgc", "ple", "home"])
def test_shared_experts_learn_from_every_task(name):
    model = build(name)
    shared = [n for n in names_of(model, model.shared_parameters()) if "global_experts" in n or "levels.1.shared." in n
              or (name == "cgc" and "levels.0.shared." in n)]
    assert shared
    for t in model.task_names:
        g = grads_of(model, losses(model(inputs(DENSE)))[t])
        assert all(nonzero(g[n]) for n in shared), t


def test_cross_stitch_alpha_init_and_learning():
    two = build("cross-stitch", tasks=TASKS[:2])
    assert torch.allclose(two.alphas[0].detach(), torch.tensor([[0.9, 0.1], [0.1, 0.9]]))
    three = build("cross-stitch", alpha_self=0.8, column=[8, 8, 4])
    assert len(three.alphas) == 3
    for alpha in three.alphas:
        assert torch.allclose(alpha.detach(), torch.tensor([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8]]))
    shared = names_of(three, three.shared_parameters())
    assert shared == ["alphas.0", "alphas.1", "alphas.2"]
    before = three.alphas[0].detach().clone()
    opt = torch.optim.SGD(three.parameters(), lr=0.5)
    g = grads_of(three, losses(three(inputs(DENSE)))["a"])
    opt.step()
    assert nonzero(g["alphas.0"]) and not torch.equal(three.alphas[0].detach(), before)
    # task a's loss reaches b's column through alpha_ab (the point of the units) but never b's head
    assert nonzero(g["columns.b.0.0.weight"])
    assert not any(nonzero(g[n]) for n in g if n.startswith("heads.b."))


def test_cross_stitch_eq1_mixes_columns():
    model = build("cross-stitch", tasks=TASKS[:2], column=[5])
    with torch.no_grad():
        model.alphas[0].copy_(torch.tensor([[0.25, 0.75], [1.0, 0.0]]))
    x = inputs(DENSE)
    out = model(x)
    xa, xb = model.columns["a"][0](x), model.columns["b"][0](x)
    assert torch.allclose(out["a"], model.heads["a"](0.25 * xa + 0.75 * xb), atol=1e-6)
    assert torch.allclose(out["b"], model.heads["b"](xa), atol=1e-6)
    assert torch.equal(model.last_gates["a"], torch.tensor([[0.25, 0.75]]).expand(B, 2))


def test_ple_one_level_is_cgc():
    cgc, ple = build("cgc"), build("ple", num_levels=1)
    assert {k: v.shape for k, v in cgc.state_dict().items()} == {k: v.shape for k, v in ple.state_dict().items()}
    ple.load_state_dict(cgc.state_dict())
    x = inputs(DENSE)
    a, b = cgc(x), ple(x)
    assert all(torch.equal(a[t], b[t]) for t in a)
    for t in cgc.task_names:
        assert names_of(cgc, cgc.task_parameters(t)) == names_of(ple, ple.task_parameters(t))
    assert ple.levels[0].shared_gate is None


def test_ple_levels_and_shared_gate():
    model = build("ple", num_levels=3, num_shared_experts=2, num_task_experts=2)
    assert [lvl.shared_gate is None for lvl in model.levels] == [False, False, True]
    assert model.levels[0].shared_gate.out_features == 3 * 2 + 2  # all tasks' experts + shared experts
    g = grads_of(model, losses(model(inputs(DENSE)))["a"])
    # earlier levels' task-b experts feed the shared gate, so task a's loss reaches them ...
    assert nonzero(g["levels.1.task.b.0.0.weight"])
    # ... but the last level's task-b experts, b's gates of the last two levels and b's head never
    for n in ["levels.2.task.b.0.0.weight", "levels.2.gates.b.weight", "levels.1.gates.b.weight", "heads.b.0.weight"]:
        assert not nonzero(g[n]), n
    assert model.expert_groups() == {"shared": [2, 3], "a": [0, 1], "b": [0, 1], "c": [0, 1]}
    assert model.last_gates["a"].shape == (B, 4)


def test_home_hierarchy_mask():
    model = build("home", task_groups=[["a", "b"], ["c"]], num_shared_experts=2, num_group_experts=1,
                  num_task_experts=1)
    g = grads_of(model, losses(model(inputs(DENSE)))["a"])
    # layout [global 0-1, group0 2, group1 3, a 4, b 5, c 6]
    assert model.expert_groups() == {"shared": [0, 1, 2, 3], "a": [4], "b": [5], "c": [6]}
    ga, gc = model.last_gates["a"], model.last_gates["c"]
    assert torch.all(ga[:, [3, 5, 6]] == 0) and torch.all(ga[:, [0, 1, 2, 4]] > 0)
    assert torch.all(gc[:, [2, 4, 5]] == 0) and torch.all(gc[:, [0, 1, 3, 6]] > 0)
    assert torch.allclose(ga.sum(1), torch.ones(B))
    # the other category's level-2 experts get nothing from task a; its own category's do
    assert not nonzero(g["group_experts.1.0.1.0.weight"])
    assert nonzero(g["group_experts.0.0.1.0.weight"])


def test_home_default_groups_follow_task_kind_and_bad_groups_are_rejected():
    tasks = [Task("click", "binary"), Task("watch", "regression"), Task("like", "binary")]
    model = ARCHITECTURES.create("home", tasks, DENSE)
    assert model.task_groups == [["click", "like"], ["watch"]]
    from polytask import PolytaskError

    with pytest.raises(PolytaskError, match="exactly one"):
        ARCHITECTURES.create("home", tasks, DENSE, task_groups=[["click"], ["watch"]])
    with pytest.raises(PolytaskError, match="unknown task 'share'"):
        ARCHITECTURES.create("home", tasks, DENSE, task_groups=[["click", "share"], ["watch", "like"]])


def test_feature_gate_by_hand():
    fg = FeatureGate(2, 1)
    x = torch.tensor([[1.0, 3.0]])
    assert torch.equal(fg(x), x)  # W_up starts at zero: 2·sigmoid(0) = 1
    with torch.no_grad():
        fg.down.weight.copy_(torch.tensor([[1.0, -1.0]]))  # W_down x = 1 - 3 = -2
        fg.up.weight.copy_(torch.tensor([[2.0], [0.0]]))  # W_up (-2) = [-4, 0]
    expected = torch.tensor([[2.0 / (1.0 + math.exp(4.0)) * 1.0, 1.0 * 3.0]])
    assert torch.allclose(fg(x), expected)


def test_home_feature_gate_privatises_every_expert_input():
    on, off = build("home"), build("home", feature_gate=False)
    on(inputs(DENSE))
    gates = [m for m in on.modules() if isinstance(m, FeatureGate)]
    assert len(gates) == len(on.last_expert_activations)  # one private gate per expert
    assert not any(isinstance(m, FeatureGate) for m in off.modules())
    expert = on.task_experts["a"][0]
    u = torch.randn(B, expert[0].up.out_features)
    assert torch.allclose(expert(u), expert[1](2 * torch.sigmoid(expert[0].up(expert[0].down(u))) * u))


def test_home_forward_equations_flat():
    model = build("home", hierarchy=False, num_shared_experts=2, num_task_experts=2).eval()
    x = inputs(DENSE)
    out = model(x)
    shared = torch.stack([e(x) for e in model.global_experts], 1)
    for t in model.task_names:
        own = torch.stack([e(x) for e in model.task_experts[t]], 1)
        o = mix(model.gates[t](x).softmax(-1), torch.cat([shared, own], 1))
        o = o + mix(torch.sigmoid(model.self_gates[t](x)), own)
        assert torch.allclose(out[t], model.heads[t](o), atol=1e-6)
    assert model.last_gates["a"].shape == (B, 2 + 3 * 2)


def test_home_forward_equations_hierarchy():
    model = build("home", task_groups=[["a", "b"], ["c"]], self_gate=False).eval()
    x = inputs(DENSE)
    out = model(x)
    g1 = torch.stack([e(x) for e in model.meta_global], 1)
    c1 = [torch.stack([e(x) for e in ex], 1) for ex in model.meta_groups]
    z = [mix(model.meta_gates[c](x).softmax(-1), torch.cat([g1, c1[c]], 1)) for c in range(2)]
    zg = mix(model.meta_shared_gate(x).softmax(-1), torch.cat([g1, *c1], 1))
    g2 = torch.stack([e(zg) for e in model.global_experts], 1)
    for t, c in [("a", 0), ("b", 0), ("c", 1)]:
        c2 = torch.stack([e(z[c]) for e in model.group_experts[c]], 1)
        own = torch.stack([e(z[c]) for e in model.task_experts[t]], 1)
        o = mix(model.gates[t](z[c]).softmax(-1), torch.cat([g2, c2, own], 1))
        assert torch.allclose(out[t], model.heads[t](o), atol=1e-6)


def test_home_expert_norm_avoids_dead_activations():
    x = torch.randn(64, 10, generator=torch.Generator().manual_seed(3))
    relu = build("home", expert_norm=False)
    relu(x)
    swish = build("home")
    swish(x)
    zero = {k: float((v == 0).float().mean()) for k, v in relu.last_expert_activations.items()}
    assert min(zero.values()) > 0.1  # ReLU experts: many exact zeros
    assert max(float((v == 0).float().mean()) for v in swish.last_expert_activations.values()) == 0.0
    assert any(isinstance(m, nn.BatchNorm1d) for m in swish.modules())
    assert not any(isinstance(m, nn.ReLU) for m in swish.global_experts.modules())
    # BatchNorm + Swish: every expert's pre-activation has batch mean 0, std 1 in training mode
    pre = swish.global_experts[0][1][1](swish.global_experts[0][1][0](swish.global_experts[0][0](
        torch.randn(64, 16))))
    assert torch.allclose(pre.mean(0), torch.zeros(16), atol=1e-5)


def test_home_self_gate_keeps_task_experts_learning():
    grads = {}
    for self_gate in (True, False):
        model = build("home", hierarchy=False, self_gate=self_gate)
        with torch.no_grad():  # the softmax gate ignores a's own expert (index 2 of [global 0-1, a])
            model.gates["a"].weight.zero_()
            model.gates["a"].bias.copy_(torch.tensor([50.0, 50.0, -50.0]))
        g = grads_of(model, losses(model(inputs(DENSE)))["a"])
        grads[self_gate] = float(g["task_experts.a.0.1.0.weight"].abs().sum())
    assert grads[False] < 1e-12 < grads[True]


def test_expert_batchnorm_accepts_a_batch_of_one():
    bn = ExpertBatchNorm(3)
    bn(torch.randn(8, 3))
    one = torch.randn(1, 3)
    got = bn(one)
    bn.eval()
    assert torch.allclose(got, bn(one))


def test_mmoe_diagnostics():
    model = build("mmoe", num_experts=3)
    model(inputs(DENSE))
    assert model.expert_groups() == {"shared": [0, 1, 2], "a": [], "b": [], "c": []}
    assert sorted(model.last_expert_activations) == ["shared/0", "shared/1", "shared/2"]
    assert model.last_expert_activations["shared/0"].shape == (B, 16)
    assert not model.last_expert_activations["shared/0"].requires_grad


@pytest.mark.parametrize("name,weighting", [("home", "ew"), ("ple", "mgda"), ("cross-stitch", "pcgrad")])
def test_trains_with_the_trainer(name, weighting):
    suite = SUITES.create("synthetic-mmoe", num_samples=600, dim=10, seed=0)
    seed_everything(0)
    model = ARCHITECTURES.create(name, suite.tasks, suite.input_spec)
    trainer = Trainer(model, suite.tasks, weighting, TrainConfig(epochs=5, batch_size=64, progress=False,
                                                                  restore_best=False, lr=3e-3))
    trainer.fit(suite.train.subset(range(7 * 64 + 1)))  # the last batch of every epoch holds one sample
    first, last = trainer.history[0], trainer.history[-1]
    assert last["train/task1/loss"] < first["train/task1/loss"]
