"""TaskExpert: experts per stage, per-task gates over experts + memory, additive memory writes.

The checks every architecture shares (shapes, ownership, rep mode, diagnostics shapes) are in
test_arch_contract.py.
"""

from __future__ import annotations

import pytest
import torch

from polytask import ARCHITECTURES, SUITES, PolytaskError, TrainConfig, Trainer
from polytask.models.arch._experts import mix
from polytask.tasks import InputSpec, Task
from polytask.trainer import seed_everything
import polytask.data  # noqa: F401
import polytask.models.arch  # noqa: F401
from arch_helpers import abc_losses, example_inputs, grads_of, names_of, nonzero

TASKS = [Task("a", "binary"), Task("b", "multiclass", num_classes=3), Task("c", "regression")]
DENSE = InputSpec("dense", dim=10)
RECSYS = InputSpec("recsys", field_vocab=(5, 7), seq_names=("click",), item_vocab=20, seq_len=4, dense_dim=3)
B = 6


def inputs(spec: InputSpec = DENSE, seed: int = 0):
    return example_inputs(spec, B, seed)


def losses(out):
    return abc_losses(TASKS, out, B)


def build(spec: InputSpec = DENSE, **opts):
    torch.manual_seed(0)
    return ARCHITECTURES.create("taskexpert", TASKS, spec, **opts)


@pytest.mark.parametrize("spec", [DENSE, RECSYS], ids=["dense", "recsys"])
def test_every_parameter_learns(spec):
    model = build(spec, num_layers=3)
    g = grads_of(model, sum(losses(model(inputs(spec))).values()))
    assert [n for n, v in g.items() if not nonzero(v)] == []


def test_gates_are_task_owned_and_every_stage_expert_learns_from_each_task():
    model = build(num_layers=3)
    for a in model.task_names:
        g = grads_of(model, losses(model(inputs()))[a])
        assert any(n.startswith("gates.") for n in names_of(model, model.task_parameters(a)))
        assert all(nonzero(g[f"experts.{s}.0.0.weight"]) for s in range(3))


def test_gates_sum_to_one_over_experts_and_memory():
    model = build(num_layers=3, num_experts=4)
    model(inputs())
    for t in model.task_names:
        gates = model.last_stage_gates[t]
        assert [tuple(g.shape) for g in gates] == [(B, 4), (B, 5), (B, 5)]  # stage 1 has no memory yet
        for g in gates:
            assert torch.allclose(g.sum(1), torch.ones(B)) and bool((g > 0).all())
        assert torch.equal(model.last_gates[t], gates[-1])
    assert model.expert_groups() == {"shared": [0, 1, 2, 3], "a": [4], "b": [4], "c": [4]}
    assert build(num_layers=1).expert_groups()["a"] == []


def test_memory_is_written_layer_to_layer_by_hand():
    model = build(num_layers=3, num_experts=2).eval()
    x = inputs()
    out = model(x)
    feats = [x, model.trunk[0](x)]
    feats.append(model.trunk[1](feats[1]))
    for t in model.task_names:
        memory = None
        for s in range(3):
            experts = torch.stack([e(feats[s]) for e in model.experts[s]], 1)
            if memory is not None:
                experts = torch.cat([experts, memory.unsqueeze(1)], 1)  # the memorial expert
            decoded = mix(model.gates[t][s](feats[s]).softmax(-1), experts)
            memory = decoded if memory is None else memory + decoded
            assert torch.allclose(model.last_memory[t][s], memory, atol=1e-6)
        assert not torch.allclose(model.last_memory[t][0], model.last_memory[t][1])
        assert torch.allclose(out[t], model.heads[t](memory), atol=1e-6)  # the final memory predicts


def test_memorial_expert_reads_the_previous_memory():
    model = build(num_layers=2, num_experts=3).eval()
    with torch.no_grad():  # stage-2 gate of task a: all weight on the memorial expert (index 3)
        model.gates["a"][1].weight.zero_()
        model.gates["a"][1].bias.copy_(torch.tensor([-60.0, -60.0, -60.0, 60.0]))
    model(inputs())
    m1, m2 = model.last_memory["a"]
    assert torch.allclose(m2, 2 * m1, atol=1e-5)  # F_2 = M_1, so M_2 = M_1 + M_1


def test_bad_options_are_rejected():
    with pytest.raises(PolytaskError, match="num_layers"):
        build(num_layers=0)
    with pytest.raises(PolytaskError, match="num_experts"):
        build(num_experts=0)
    with pytest.raises(PolytaskError, match="expert layer"):
        build(expert=[])


def test_trains_with_the_trainer():
    suite = SUITES.create("synthetic-mmoe", num_samples=600, dim=10, seed=0)
    seed_everything(0)
    model = ARCHITECTURES.create("taskexpert", suite.tasks, suite.input_spec)
    trainer = Trainer(model, suite.tasks, "ew", TrainConfig(epochs=5, batch_size=64, progress=False,
                                                             restore_best=False, lr=3e-3))
    trainer.fit(suite.train)
    first, last = trainer.history[0], trainer.history[-1]
    assert last["train/task1/loss"] < first["train/task1/loss"]
