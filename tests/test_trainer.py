
import pytest
import torch

from polytask import ARCHITECTURES, SUITES, PolytaskError, TrainConfig, Trainer
from polytask.trainer import seed_everything
import polytask.data  # noqa: F401
import polytask.models.arch  # noqa: F401


def small_suite():
    return SUITES.create("synthetic-mmoe", num_samples=600, dim=10, seed=0)


def fit(epochs: int, out=None, resume=False, weighting="ew", arch="mmoe", **cfg):
    suite = small_suite()
    seed_everything(0)
    model = ARCHITECTURES.create(arch, suite.tasks, suite.input_spec, num_experts=3)
    trainer = Trainer(model, suite.tasks, weighting, TrainConfig(epochs=epochs, batch_size=64, progress=False, **cfg),
                      out_dir=out)
    trainer.fit(suite.train, suite.val, resume=resume)
    return trainer, trainer.evaluate(suite.test)


def test_same_seed_same_numbers():
    _, a = fit(2)
    _, b = fit(2)
    assert a == b


def test_training_reduces_loss():
    trainer, _ = fit(6, restore_best=False)
    first, last = trainer.history[0], trainer.history[-1]
    assert last["train/task1/loss"] < first["train/task1/loss"]


def test_resume_matches_uninterrupted(tmp_path):
    _, full = fit(4, weighting="uw")
    fit(2, out=tmp_path, weighting="uw")  # "killed" after epoch 2
    assert (tmp_path / "checkpoints" / "LATEST").read_text().strip() == "epoch-0002"
    trainer, resumed = fit(4, out=tmp_path, resume=True, weighting="uw")
    assert [h["epoch"] for h in trainer.history] == [1, 2, 3, 4]
    assert resumed == full


def test_early_stopping_and_best_restore():
    trainer, _ = fit(30, patience=1, lr=0.5, optimizer="sgd")
    assert len(trainer.history) < 30


def test_nan_loss_is_reported_in_one_line():
    suite = small_suite()
    suite.train.y["task1"][0] = float("nan")
    model = ARCHITECTURES.create("shared-bottom", suite.tasks, suite.input_spec)
    trainer = Trainer(model, suite.tasks, "ew", TrainConfig(epochs=1, progress=False))
    with pytest.raises(PolytaskError, match="task 'task1' became NaN"):
        trainer.fit(suite.train)


def test_bad_monitor_lists_choices():
    with pytest.raises(PolytaskError, match="task1/mse"):
        fit(1, monitor="task1/auroc")


def test_partial_labels_train_only_on_labelled_samples():
    suite = small_suite()
    suite.train.mask["task2"][:] = False  # task2 never labelled in training
    seed_everything(0)
    model = ARCHITECTURES.create("shared-bottom", suite.tasks, suite.input_spec)
    before = [p.clone() for p in model.heads["task2"].parameters()]
    Trainer(model, suite.tasks, "ew", TrainConfig(epochs=1, progress=False)).fit(suite.train)
    assert all(torch.equal(a, b) for a, b in zip(before, model.heads["task2"].parameters()))


def test_log_csv_written(tmp_path):
    fit(2, out=tmp_path)
    lines = (tmp_path / "log.csv").read_text().splitlines()
    assert lines[0].startswith("epoch,") and len(lines) == 3
