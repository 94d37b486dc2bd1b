"""Per-task data: one dataset per task, the samplers, and the joint Trainer on such a suite."""

from __future__ import annotations

import pytest
import torch

from polytask import ARCHITECTURES, PolytaskError, Task, TaskSuite, TrainConfig, Trainer
from polytask.continual import Scenario
from polytask.metrics import delta_m, masked_task_losses
from polytask.sampling import batches, concat_task_data, steps_per_epoch
from polytask.tasks import InputSpec, MultiTaskData


def _data(n_a: int = 10, n_b: int = 4, seed: int = 0) -> MultiTaskData:
    g = torch.Generator().manual_seed(seed)
    a = MultiTaskData(torch.randn(n_a, 3, generator=g), {"a": torch.arange(n_a) % 2})
    b = MultiTaskData(torch.randn(n_b, 3, generator=g) + 5, {"b": torch.arange(n_b) % 3})
    return concat_task_data({"a": a, "b": b})


def test_each_sample_is_labelled_for_its_own_task_only():
    d = _data()
    assert len(d) == 14
    assert d.mask["a"].tolist() == [True] * 10 + [False] * 4
    assert d.mask["b"].tolist() == [False] * 10 + [True] * 4
    assert d.y["b"][10:].tolist() == [0, 1, 2, 0]


def test_token_inputs_of_different_lengths_are_right_padded():
    a = MultiTaskData(torch.ones(2, 2, 3, dtype=torch.long), {"a": torch.zeros(2)})
    b = MultiTaskData(torch.ones(3, 2, 5, dtype=torch.long), {"b": torch.zeros(3)})
    d = concat_task_data({"a": a, "b": b})
    assert d.x.shape == (5, 2, 5)
    assert d.x[:2, :, 3:].abs().sum() == 0 and d.x[2:].min() == 1


def test_inputs_of_different_shapes_are_refused():
    a = MultiTaskData(torch.zeros(2, 3), {"a": torch.zeros(2)})
    b = MultiTaskData(torch.zeros(2, 4), {"b": torch.zeros(2)})
    with pytest.raises(PolytaskError, match="different shapes"):
        concat_task_data({"a": a, "b": b})


@pytest.mark.parametrize("sampling, steps, per_step", [
    ("per-task", 4, [(3, 3)] * 4),                                   # ceil(10/3) steps, 3 of each task
    ("round-robin", 6, [(3, 0), (0, 3), (3, 0), (0, 1), (3, 0), (1, 0)]),
])
def test_samplers_draw_each_task_as_documented(sampling, steps, per_step):
    d = _data()
    out = list(batches(d, ["a", "b"], 3, sampling, True, torch.Generator().manual_seed(0)))
    assert steps_per_epoch(d, ["a", "b"], 3, sampling) == steps == len(out)
    assert [(int(b.mask["a"].sum()), int(b.mask["b"].sum())) for b in out] == per_step
    for b in out:  # a batch's samples of task a are labelled for a only
        assert not (b.mask["a"] & b.mask["b"]).any()


def test_round_robin_sees_every_sample_once():
    d = _data()
    seen = torch.cat([b.x[:, 0] for b in batches(d, ["a", "b"], 3, "round-robin", True, torch.Generator())])
    assert sorted(seen.tolist()) == sorted(d.x[:, 0].tolist())


def _suite() -> TaskSuite:
    g = torch.Generator().manual_seed(1)
    parts = {}
    for name, shift in (("a", 0.0), ("b", 4.0)):
        x = torch.randn(60, 4, generator=g) + shift
        parts[name] = MultiTaskData(x, {name: (x[:, 0] > shift).long()})
    tasks = [Task("a", "binary"), Task("b", "binary")]
    data = concat_task_data(parts)
    return TaskSuite("per-task", tasks, InputSpec("dense", dim=4), data, data, data)


def test_a_tasks_gradient_comes_from_its_own_batch_only():
    """Moving task b's samples leaves task a's loss and its gradient untouched (masks, not inputs, decide)."""
    suite = _suite()
    torch.manual_seed(0)
    model = ARCHITECTURES.create("shared-bottom", suite.tasks, suite.input_spec, bottom=[8], tower=[])
    trainer = Trainer(model, suite.tasks, "ew", TrainConfig(epochs=1, batch_size=8, sampling="per-task",
                                                             progress=False))
    batch = next(iter(trainer._batches(suite.train)))
    moved = batch.subset(torch.arange(len(batch)))
    moved.x = moved.x.clone()
    moved.x[moved.mask["b"]] += 100.0
    grads = []
    for b in (batch, moved):
        loss_a = masked_task_losses(suite.tasks, model(b.x), b)[0]
        grads.append(torch.autograd.grad(loss_a, list(model.parameters()), allow_unused=True))
    for g1, g2 in zip(*grads):
        assert (g1 is None and g2 is None) or torch.allclose(g1, g2)


@pytest.mark.parametrize("weighting", ["ew", "pcgrad", "mgda"])
def test_joint_trainer_learns_per_task_suite_and_reports_delta_m(weighting):
    suite = _suite()
    torch.manual_seed(0)
    model = ARCHITECTURES.create("shared-bottom", suite.tasks, suite.input_spec, bottom=[16], tower=[])
    trainer = Trainer(model, suite.tasks, weighting, TrainConfig(epochs=30, batch_size=16, lr=1e-2,
                                                                  sampling="per-task", progress=False))
    trainer.fit(suite.train, suite.val)
    res = trainer.evaluate(suite.test)
    assert res["a"]["accuracy"] > 0.85 and res["b"]["accuracy"] > 0.85
    baselines = {t: {m: 1.0 if m != "loss" else 0.0 for m in r} for t, r in res.items()}
    assert delta_m(res, baselines, suite.tasks) < 0  # below perfect single-task scores


def test_unknown_sampling_is_one_line():
    with pytest.raises(PolytaskError, match="unknown sampling 'uniform'; choose one of: proportional"):
        TrainConfig(sampling="uniform")


def test_scenario_from_suite_makes_one_task_incremental_experience_per_task():
    suite = _suite()
    scen = Scenario.from_suite(suite)
    assert scen.kind == "task-incremental" and [e.tasks for e in scen] == [["a"], ["b"]]
    assert len(scen[0].train) == 60 and set(scen[1].train.y) == {"b"}
    assert scen[1].train.x.min() > 0  # task b's samples only (shifted by 4)


def test_per_task_training_resumes_from_a_checkpoint_to_the_same_weights(tmp_path):
    suite = _suite()

    def trainer(epochs: int, out: object) -> Trainer:
        torch.manual_seed(0)
        model = ARCHITECTURES.create("shared-bottom", suite.tasks, suite.input_spec, bottom=[8], tower=[])
        return Trainer(model, suite.tasks, "uw", TrainConfig(epochs=epochs, batch_size=16, sampling="per-task",
                                                             progress=False), out_dir=out)

    full = trainer(3, tmp_path / "full")
    full.fit(suite.train, suite.val)
    trainer(1, tmp_path / "cut").fit(suite.train, suite.val)  # stops after epoch 1, as a killed run would
    resumed = trainer(3, tmp_path / "cut")
    resumed.fit(suite.train, suite.val, resume=True)
    assert resumed.step == full.step
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k
