"""Growing-network continual learners: DER (``expandable-der``), FOSTER (``foster``) and TAME's uncapped pool."""

import copy
import json
import math

import pytest
import torch
from typer.testing import CliRunner

from polytask.cli import app
from polytask.continual import Scenario, run
from polytask.continual._growing import Extractor, GrowingNet, HerdingMemory, effective_number_weights, herding
from polytask.continual.expandable_der import aux_targets
from polytask.continual.foster import agreement, compress, kd_loss
from polytask.continual.runner import ContinualConfig, build_default_model, run_continual
from polytask.continual.tame import global_magnitude_masks
from polytask.registry import ARCHITECTURES, SCENARIOS, STRATEGIES
from polytask.tasks import InputSpec, MultiTaskData, Task
from polytask.trainer import TrainConfig, Trainer

SMALL = {"arch_options": {"bottom": [16], "tower": []}, "epochs": 5, "batch_size": 32}


def blobs(n_classes: int = 6, per_class: int = 40, dim: int = 8, seed: int = 0, setting: str = "class") -> Scenario:
    """Well separated Gaussian classes, two per experience (class-incremental by default)."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(n_classes, dim, generator=g) * 4
    y = torch.arange(n_classes).repeat_interleave(per_class)
    x = centers[y] + torch.randn(len(y), dim, generator=g)
    return Scenario.from_tensors(x, y, classes_per_experience=2, seed=seed, setting=setting)


def fit_by_hand(strategy_name: str, scen: Scenario, **options):
    """The runner's loop without evaluation: begin / fit / end per experience; yields after each."""
    strategy = STRATEGIES.create(strategy_name, **options)
    strategy.setup(scen, 0)
    torch.manual_seed(0)
    cfg = ContinualConfig(scenario="custom", arch_options={"bottom": [16], "tower": []})
    model = strategy.build_model(lambda: build_default_model(cfg, scen))
    train = TrainConfig(epochs=2, batch_size=32, progress=False)
    for i in range(len(scen)):
        strategy.begin(i, scen.experience_tasks(i))
        yield i, strategy, model, "begun"
        tasks, data = strategy.train_data(i)
        Trainer(model, tasks, "ew", train, hooks=[strategy]).fit(data)
        strategy.end(i)
        yield i, strategy, model, "ended"


# ---------------------------------------------------------------------- DER
def test_der_aux_targets_map_old_classes_to_zero_and_new_ones_to_their_position():
    y = torch.tensor([0, 5, 4, 1, 4])
    assert aux_targets(y, torch.tensor([4, 5])).tolist() == [0, 2, 1, 0, 1]


def test_der_grows_one_frozen_extractor_per_experience_and_aux_has_new_classes_plus_one():
    scen = blobs()
    frozen_first = None
    for i, strategy, model, when in fit_by_hand("expandable-der", scen, balanced_epochs=2):
        if when == "begun":
            assert len(model.extractors) == i + 1
            if i > 0:
                assert model.aux["class"].out_features == len(scen[i].classes) + 1 == 3
                assert not any(p.requires_grad for e in model.extractors[:i] for p in e.parameters())
                assert all(p.requires_grad for p in model.extractors[-1].parameters())
                assert model.heads["class"].in_features == 16 * (i + 1)  # the classifier reads the concatenation
        elif i == 0:
            frozen_first = copy.deepcopy(model.extractors[0].state_dict())
            assert model.aux is None
    # extractor 0, frozen since experience 1, is bit for bit what experience 0 left
    after = model.extractors[0].state_dict()
    assert all(torch.equal(frozen_first[k], after[k]) for k in frozen_first)
    assert len(strategy.memory) <= 500 and {g[2] for g in strategy.memory.groups} == set(range(6))


def test_herding_picks_the_sample_closest_to_the_mean_first_and_memory_shrinks_evenly():
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    assert herding(f, 3).tolist()[0] == 2  # the normalised (1,1)/√2 lies on the class mean's direction
    memory = HerdingMemory(6)
    data = MultiTaskData(torch.randn(12, 3), {"class": torch.arange(12) % 2})
    memory.update(0, data, ["class"], lambda x, t: x)
    assert [len(s) for s in memory.sets] == [3, 3]
    data2 = MultiTaskData(torch.randn(12, 3), {"class": 2 + torch.arange(12) % 4})
    memory.update(1, data2, ["class"], lambda x, t: x)
    assert [len(s) for s in memory.sets] == [1] * 6  # 6 slots over 6 classes; the herding order keeps the first


def test_der_beats_finetune_class_incrementally():
    der = run(blobs(per_class=60), "expandable-der", seed=0, **SMALL)
    fine = run(blobs(per_class=60), "finetune", seed=0, **SMALL)
    assert der.metrics["average_accuracy"] > fine.metrics["average_accuracy"] + 0.2
    assert len(der.model.extractors) == 3


# ------------------------------------------------------------------- FOSTER
def test_balanced_kd_and_effective_number_weights_by_hand():
    student = torch.tensor([[math.log(3.0), 0.0]])
    teacher = torch.zeros(1, 2)
    plain = kd_loss(student, teacher, 1.0)
    assert float(plain) == pytest.approx(-(0.5 * math.log(0.75) + 0.5 * math.log(0.25)))
    # weights (3, 1) turn the teacher's (1/2, 1/2) into (3/4, 1/4): the loss is then that distribution's entropy
    balanced = kd_loss(student, teacher, 1.0, torch.tensor([3.0, 1.0]))
    assert float(balanced) == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    w = effective_number_weights(torch.tensor([100.0, 10.0, 0.0]), 0.9)
    raw = [0.1 / (1 - 0.9 ** 100), 0.1 / (1 - 0.9 ** 10)]
    assert w.tolist() == pytest.approx([2 * raw[0] / sum(raw), 2 * raw[1] / sum(raw), 1.0])


def test_foster_compression_yields_one_extractor_that_tracks_the_two_extractor_teacher():
    torch.manual_seed(0)
    task = Task("class", "multiclass", num_classes=4)
    spec = InputSpec("dense", dim=8)

    def extractor():
        return Extractor(ARCHITECTURES.create("shared-bottom", [task], spec, bottom=[16], tower=[]), "test")

    teacher = GrowingNet(extractor(), [task])
    teacher.extractors.append(extractor())
    teacher.heads = teacher.new_heads()
    with torch.no_grad():
        teacher.heads["class"].weight *= 5  # a confident teacher
    x = torch.randn(256, 8)
    data = MultiTaskData(x, {"class": teacher.eval()(x)["class"].argmax(1)})
    student = GrowingNet(extractor(), [task])
    before = agreement(student, teacher, data, [task])
    losses = compress(student, teacher, data, [task], {"class": torch.ones(4)}, temperature=2.0, epochs=100,
                      lr=1e-2, batch_size=64, generator=torch.Generator().manual_seed(0))
    assert len(student.extractors) == 1 and losses[-1] < losses[0]
    assert agreement(student, teacher, data, [task]) > max(0.9, before)


def test_foster_keeps_one_extractor_after_every_step():
    result = run(blobs(per_class=60), "foster", seed=0, **{**SMALL, "epochs": 10})
    strategy = result.strategy
    assert len(result.model.extractors) == 1 and result.model.aux is None
    assert [c["experience"] for c in strategy.compressions] == [1, 2]
    assert all(c["agreement"] > 0.8 for c in strategy.compressions)
    assert result.metrics["average_accuracy"] > 0.6  # finetune: about 0.4 here


def test_foster_boosting_adds_a_frozen_old_extractor_and_copies_the_old_classifier():
    scen = blobs()
    for i, strategy, model, when in fit_by_hand("foster", scen, memory=20, compression_epochs=1):
        if when == "begun" and i == 1:
            assert len(model.extractors) == 2 and model.frozen == 1
            old = strategy.old_heads["class"]
            assert torch.equal(model.heads["class"].weight[:, :16], old.weight)  # W = [W_old, new columns]
            assert model.aux["class"].in_features == 16  # W_fe reads the new features alone
            w = model.divisor["class"]
            assert float(w[[2, 3]].mean()) < float(w[[0, 1]].mean())  # new classes (more samples) weigh less
            break


@pytest.mark.parametrize("strategy, options", [("expandable-der", {"balanced_epochs": 2}),
                                               ("foster", {"compression_epochs": 1})])
def test_interrupted_growing_run_resumes_to_the_same_matrix(tmp_path, strategy, options, monkeypatch):
    config = ContinualConfig(scenario="blobs", strategy=strategy, strategy_options=options,
                             arch_options={"bottom": [16], "tower": []}, train={"epochs": 2, "batch_size": 32})
    full = run_continual(config, tmp_path / "full", scenario=blobs()).metrics
    cls = type(STRATEGIES.create(strategy))
    original = cls.end

    def crash(self, index):
        if index == 2:
            raise KeyboardInterrupt
        original(self, index)

    monkeypatch.setattr(cls, "end", crash)
    with pytest.raises(KeyboardInterrupt):
        run_continual(config, tmp_path / "killed", scenario=blobs())
    monkeypatch.setattr(cls, "end", original)
    assert (tmp_path / "killed" / "checkpoints" / "exp-001").is_dir()  # two extractors (DER) saved, one to go
    resumed = run_continual(config, tmp_path / "killed", resume=True, scenario=blobs()).metrics
    assert resumed["accuracy_matrix"] == full["accuracy_matrix"]


@pytest.mark.parametrize("strategy", ["expandable-der", "foster"])
def test_growing_learners_also_run_task_incrementally(strategy):
    result = run(blobs(setting="task"), strategy, seed=0, **SMALL)  # the memory holds the old tasks' heads' samples
    assert len(result.strategy.memory.data(["task0", "task1", "task2"]).y) == 3
    assert result.metrics["average_accuracy"] > 0.8


# --------------------------------------------------------------------- TAME
def test_global_magnitude_pruning_masks_the_smallest_weights_over_all_layers():
    a = torch.tensor([[0.1, -3.0], [2.0, 0.05]])
    b = torch.tensor([[-0.5, 1.0]])
    masks = global_magnitude_masks([a, b], 0.5)  # 3 of 6: |0.05|, |0.1|, |-0.5|
    assert masks[0].tolist() == [[0.0, 1.0], [1.0, 0.0]] and masks[1].tolist() == [[0.0, 1.0]]


def test_tame_pool_grows_past_the_old_cap_and_its_selector_is_pruned():
    scen = SCENARIOS.create("task-free-digits", passes=1)
    tame = STRATEGIES.create("tame", min_jump=0.1, selector_steps=30, selector_finetune_steps=10)
    tame.setup(scen, 0)
    cfg = ContinualConfig(scenario="task-free-digits", arch_options={"bottom": [16], "tower": []})
    pool = tame.build_model(lambda: build_default_model(cfg, scen))
    trainer = Trainer(pool, scen.tasks, "ew", TrainConfig(progress=False))
    batch = next(scen[0].train.batches(32))
    for _ in range(9):  # nine shifts to data no expert knows: every one adds an expert
        tame.losses = [0.0] * tame.window
        tame._switch(trainer, batch, 5.0)
    assert pool.used == 10 > 8 and pool.active == 9  # the old default cap was 8
    assert all(s["new_expert"] for s in tame.shifts)
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert all(id(p) in optimised for p in pool.experts[-1].parameters())  # the new expert trains
    for e in range(10):
        tame.buffer.add(batch.x, {"expert": torch.full((len(batch),), e, dtype=torch.long)})
    tame.before_eval(pool)
    assert pool.selector[2].out_features == 10
    weights = torch.cat([(m.weight_orig * m.weight_mask).reshape(-1) for m in (pool.selector[0], pool.selector[2])])
    masks = torch.cat([m.weight_mask.reshape(-1) for m in (pool.selector[0], pool.selector[2])])
    assert float((masks == 0).float().mean()) == pytest.approx(0.5, abs=1e-3)  # half of all selector weights
    assert bool((weights[masks == 0] == 0).all())  # and they stay zero through the fine-tuning


# ---------------------------------------------------------------------- CLI
@pytest.mark.parametrize("strategy, options", [("expandable-der", ["balanced_epochs=2"]),
                                               ("foster", ["compression_epochs=1"]),
                                               ("tame", ["selector_steps=20", "selector_finetune_steps=5"])])
def test_growing_strategies_run_from_the_command_line(tmp_path, strategy, options):
    out = tmp_path / "run"
    args = ["continual", "--scenario", "split-digits", "--strategy", strategy, "--epochs", "1", "--no-progress",
            "--arch-option", "bottom=[16]", "--out", str(out)]
    for opt in options:
        args += ["--strategy-option", opt]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["strategy"] == strategy and len(metrics["accuracy_matrix"]) == 5
    assert 0.0 <= metrics["average_accuracy"] <= 1.0
