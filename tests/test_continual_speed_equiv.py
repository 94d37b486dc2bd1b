"""The fast continual paths equal the plain ones: consolidated EWC, closed-form and batched Fisher, the
reservoir, memory rows in the trainer's forward, masked losses, the der++ alias."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from polytask.continual._buffer import ReservoirBuffer
from polytask.continual.base import samplewise
from polytask.continual.ewc import EWC, _sq_grad_sums_linear, diagonal_fisher, quadratic_penalty
from polytask.errors import PolytaskError
from polytask.registry import STRATEGIES, DeprecatedName
from polytask.tasks import MultiTaskData, Task


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(5, 8), nn.Linear(8, 3)

    def forward(self, x):
        return {"t": self.b(torch.relu(self.a(x)))}


def test_consolidated_ewc_penalty_and_gradient_equal_the_per_experience_sum():
    torch.manual_seed(0)
    model = Net().double()
    names = [n for n, _ in model.named_parameters()]
    quads = [({n: torch.rand_like(p) * (k != 1 or i % 2) for i, (n, p) in enumerate(model.named_parameters())},
              {n: torch.randn_like(p) for n, p in model.named_parameters()}) for k in range(4)]
    ewc = EWC(lam=3.0)
    for f, a in quads:
        ewc.consolidate(f, a)
    assert len(ewc.anchors) == 1  # one quadratic whatever the number of experiences
    direct = 1.5 * sum(quadratic_penalty(model, f, a) for f, a in quads)
    assert float(ewc.penalty(model).detach()) == pytest.approx(float(direct.detach()), rel=1e-6, abs=1e-6)
    expected = torch.autograd.grad(direct, list(model.parameters()))
    ewc.before_fit(type("T", (), {"model": model})())
    ewc.after_backward(None, None)  # adds λ S (θ − m) to the (empty) .grad
    for n, p, g in zip(names, model.parameters(), expected):
        assert torch.allclose(p.grad, g, atol=1e-6), n


@pytest.mark.parametrize("mode", ["true", "empirical"])
def test_closed_form_and_batched_fisher_equal_the_per_sample_loop(mode):
    torch.manual_seed(1)
    model = Net().double()
    task = Task("t", "multiclass", num_classes=3)
    data = MultiTaskData(torch.randn(40, 5, dtype=torch.float64), {"t": torch.randint(0, 3, (40,))},
                         {"t": torch.arange(40) % 7 != 3})  # some samples unlabelled: they add nothing
    gens = [torch.Generator().manual_seed(2) for _ in range(3)]
    fishers = [diagonal_fisher(model, [task], data, 30, g, mode, method) for g, method in zip(gens, ["auto", "vmap", "loop"])]
    closed, batched, looped = fishers
    for k in looped:
        assert looped[k].abs().sum() > 0
        assert torch.allclose(closed[k], looped[k], atol=1e-10), k
        assert torch.allclose(batched[k], looped[k], atol=1e-10), k
    assert all(torch.equal(g.get_state(), gens[2].get_state()) for g in gens)  # the same label draws


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 5)

    def forward(self, x):
        return {"t": self.a(torch.relu(self.a(x)))[:, :3]}


class Normed(Net):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(8)

    def forward(self, x):
        return {"t": self.b(self.norm(self.a(x)))}


@pytest.mark.parametrize("cls", [Shared, Normed])
def test_fisher_without_the_closed_form_falls_back_to_the_same_numbers(cls):
    torch.manual_seed(3)
    model = cls().double()
    task = Task("t", "multiclass", num_classes=3)
    data = MultiTaskData(torch.randn(20, 5, dtype=torch.float64), {"t": torch.randint(0, 3, (20,))})
    params = [(n, p) for n, p in model.named_parameters()]
    batch = next(data.batches(20))
    assert _sq_grad_sums_linear(model, params, [task], batch, batch.y) is None  # shared weights / a LayerNorm
    auto = diagonal_fisher(model, [task], data, 20, torch.Generator().manual_seed(4), "empirical")
    looped = diagonal_fisher(model, [task], data, 20, torch.Generator().manual_seed(4), "empirical", "loop")
    for k in looped:
        assert torch.allclose(auto[k], looped[k], atol=1e-10), k


def test_unknown_fisher_method_is_a_one_line_error():
    task = Task("t", "multiclass", num_classes=3)
    data = MultiTaskData(torch.randn(4, 5), {"t": torch.randint(0, 3, (4,))})
    with pytest.raises(PolytaskError, match="unknown Fisher method 'fast'; choose one of: auto, vmap, loop"):
        diagonal_fisher(Net(), [task], data, 4, torch.Generator(), method="fast")


def test_der_is_an_alias_of_der_plus_plus_that_warns():
    assert "der++" in STRATEGIES.names() and "der" not in STRATEGIES.names() and "der" in STRATEGIES
    with pytest.warns(DeprecatedName, match="use 'der\\+\\+'"):
        old = STRATEGIES.create("der", memory=10)
    assert type(old) is STRATEGIES.get("der++")


@pytest.mark.parametrize("capacity,sizes", [(7, [3, 3, 3, 5, 9, 1, 20]), (50, [32] * 12), (5, [40, 2])])
def test_batched_reservoir_slots_fill_the_memory_as_one_item_at_a_time(capacity, sizes):
    buf = ReservoirBuffer(capacity, seed=5)
    reference = torch.full((capacity,), -1)
    gen, seen = torch.Generator().manual_seed(5), 0
    for count in sizes:
        x = torch.arange(seen, seen + count, dtype=torch.float32).unsqueeze(1)
        buf.add(x, {})
        n = seen + torch.arange(1, count + 1)
        draws = (torch.rand(count, generator=gen, dtype=torch.float64) * n).long()
        for i, (k, d) in enumerate(zip(n.tolist(), draws.tolist())):
            slot = k - 1 if k <= capacity else d
            if slot < capacity:
                reference[slot] = seen + i  # a later item overwrites an earlier one in the same slot
        seen += count
    assert len(buf) == min(seen, capacity) and buf.seen == seen
    assert torch.equal(buf.all_rows()["x"].reshape(-1).long(), reference[:len(buf)])


def _filled_der(joint):
    from polytask.continual.der import DERPlusPlus

    torch.manual_seed(6)
    task = Task("t", "multiclass", num_classes=3)
    der = DERPlusPlus(memory=12, alpha=0.3, beta=0.5)
    der.scenario = SimpleNamespace(tasks=[task])  # all_tasks
    der.buffer = ReservoirBuffer(12, seed=7)
    der.buffer.add(torch.randn(20, 5, dtype=torch.float64),
                   {"y/t": torch.randint(0, 3, (20,)), "mask/t": torch.arange(20) % 5 != 0,
                    "z/t": torch.randn(20, 3, dtype=torch.float64)})
    der._joint = joint
    return der


def test_der_memory_batches_in_one_forward_equal_two_forwards():
    model = Net().double()
    values, grads = [], []
    for joint in (True, False):
        der = _filled_der(joint)
        loss = der.memory_loss(model, der._draw(5))
        values.append(float(loss.detach()))
        grads.append(torch.autograd.grad(loss, list(model.parameters())))
    assert values[0] == pytest.approx(values[1], rel=1e-12)
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-12)
    assert samplewise(model) and not samplewise(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)))
    assert not samplewise(nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5)))  # a training-mode dropout draws per batch


@pytest.mark.parametrize("strategy", ["replay", "der++"])
def test_memory_rows_in_the_trainers_forward_train_like_forwards_of_their_own(strategy, monkeypatch):
    import importlib

    from polytask.continual.runner import ContinualConfig, run_continual
    from polytask.continual.scenario import Scenario

    g = torch.Generator().manual_seed(8)
    x, y = torch.randn(120, 6, generator=g), torch.arange(120) % 4
    module = importlib.import_module("polytask.continual." + ("replay" if strategy == "replay" else "der"))
    finals = []
    for joint in (True, False):
        monkeypatch.setattr(module, "samplewise", lambda model, joint=joint: joint)
        cfg = ContinualConfig(scenario="custom", strategy=strategy, strategy_options={"memory": 20},
                              arch_options={"bottom": [8], "tower": []},
                              train={"epochs": 2, "batch_size": 16, "lr": 0.05, "optimizer": "sgd", "seed": 0})
        scen = Scenario.from_tensors(x, y, classes_per_experience=2)
        result = run_continual(cfg, scenario=scen)
        finals.append((result.model.state_dict(), result.strategy.buffer.all_rows()))
    (w1, b1), (w2, b2) = finals
    for k in w1:
        assert torch.allclose(w1[k], w2[k], atol=1e-5), k
    for k in b1:
        assert torch.allclose(b1[k].float(), b2[k].float(), atol=1e-5), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_masked_task_losses_equal_the_float_mask_formula_bit_for_bit(dtype):
    from polytask.metrics import masked_task_losses
    from polytask.tasks import Batch

    tasks = [Task("a", "multiclass", num_classes=3), Task("b", "binary"), Task("c", "regression")]
    g = torch.Generator().manual_seed(9)
    out = {"a": torch.randn(7, 3, generator=g, dtype=dtype), "b": torch.randn(7, generator=g, dtype=dtype),
           "c": torch.randn(7, generator=g, dtype=dtype)}
    y = {"a": torch.randint(0, 3, (7,), generator=g), "b": torch.randint(0, 2, (7,), generator=g).to(dtype),
         "c": torch.randn(7, generator=g, dtype=dtype)}
    mask = {"a": torch.rand(7, generator=g) > 0.5, "b": torch.zeros(7, dtype=torch.bool), "c": torch.ones(7, dtype=torch.bool)}
    reference = []
    for t in tasks:
        per_sample, m = t.loss(out[t.name], y[t.name]), mask[t.name].to(dtype)
        reference.append((per_sample * m).sum() / m.sum().clamp(min=1.0))
    assert torch.equal(masked_task_losses(tasks, out, Batch(torch.zeros(7, 1), y, mask)), torch.stack(reference))


def test_lwf_targets_stored_once_per_experience_train_like_the_per_batch_forward(monkeypatch):
    from polytask.continual import lwf
    from polytask.continual.runner import ContinualConfig, run_continual
    from polytask.continual.scenario import Scenario

    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(120, 6, generator=g), torch.arange(120) % 6
    finals, stored = [], []
    real_train_data = lwf.LwF.train_data

    def spy(self, index):
        tasks, data = real_train_data(self, index)
        stored.append(sorted(k for k in data.y if k.startswith(lwf.TARGETS)))
        return tasks, data

    monkeypatch.setattr(lwf.LwF, "train_data", spy)
    for once in (True, False):
        monkeypatch.setattr(lwf, "samplewise", lambda model, once=once: once)
        cfg = ContinualConfig(scenario="custom", strategy="lwf", arch_options={"bottom": [8], "tower": []},
                              train={"epochs": 2, "batch_size": 16, "lr": 0.05, "optimizer": "sgd", "seed": 0})
        finals.append(run_continual(cfg, scenario=Scenario.from_tensors(x, y, classes_per_experience=2)).model.state_dict())
    assert stored[0] == [] and stored[1] and stored[2]  # experiences 2 and 3 carry the old outputs as labels
    assert all(s == [] for s in stored[3:])  # the per-batch path adds none
    for k in finals[0]:
        assert torch.allclose(finals[0][k], finals[1][k], atol=1e-6), k


def test_buffer_full_keeps_only_the_tasks_labelled_on_every_stored_item():
    buf = ReservoirBuffer(capacity=6, seed=0)
    buf.add(torch.randn(4, 2), {"y/a": torch.zeros(4)}, full=frozenset({"a", "b"}))
    assert buf.full == {"a", "b"}
    buf.add(torch.randn(4, 2), {"y/a": torch.zeros(4)}, full=frozenset({"a"}))  # a batch where b is partly labelled
    assert buf.full == {"a"} and buf.size == 6
    restored = ReservoirBuffer(capacity=6, seed=0)
    restored.load({"_rng": buf.generator.get_state()}, buf.state_meta(), "")
    assert restored.full == {"a"}
