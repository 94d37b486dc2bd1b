"""Trainer on real hardware: device, mixed precision, schedules, accumulation, fused optimizers, resume.

Every test runs on the CPU (``device="cpu"`` explicitly); the ``cuda`` cases run where a GPU is
present (fp16 there with a GradScaler) and are skipped otherwise.
"""

import math

import pytest
import torch
from typer.testing import CliRunner

import polytask.data  # noqa: F401
import polytask.models.arch  # noqa: F401
import polytask.weighting  # noqa: F401
from polytask import ARCHITECTURES, SUITES, PolytaskError, TrainConfig, Trainer
from polytask.cli import app
from polytask.joint.config import RunConfig
from polytask.joint.runner import resume_config
from polytask.tasks import Batch
from polytask.trainer import Hook, lr_factor, micro_batch_shares, resolve_device, seed_everything
from polytask.weighting.base import GradContext

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=gpu)]


def suite(n=256, partial=False):
    s = SUITES.create("synthetic-mmoe", num_samples=n, dim=8, seed=0)
    if partial:  # task2 labelled on a random ~half: micro-batches then hold different label counts
        s.train.mask["task2"] = torch.rand(len(s.train), generator=torch.Generator().manual_seed(1)) < 0.5
    return s


def trainer(s, weighting="ew", arch="shared-bottom", out=None, hooks=(), **cfg):
    seed_everything(0)
    model = ARCHITECTURES.create(arch, s.tasks, s.input_spec)
    cfg = {"epochs": 2, "batch_size": 32, "progress": False, **cfg}
    return Trainer(model, s.tasks, weighting, TrainConfig(**cfg), out_dir=out, hooks=hooks)


class LrLog(Hook):
    """Records the learning rate each optimiser step runs with."""

    def __init__(self):
        self.lrs = []

    def after_backward(self, trainer, batch):
        self.lrs.append(trainer.optimizer.param_groups[0]["lr"])


class Grads(Hook):
    """Records the dtypes of the gradients the optimizer is about to apply."""

    def __init__(self):
        self.dtypes = set()

    def after_backward(self, trainer, batch):
        self.dtypes |= {p.grad.dtype for p in trainer.model.parameters() if p.grad is not None}


class Interrupt(Hook):
    """Stops the run (as a kill would) once ``epoch`` epochs are checkpointed."""

    def __init__(self, epoch):
        self.epoch = epoch

    def after_epoch(self, trainer):
        if trainer.epoch == self.epoch:
            raise KeyboardInterrupt


# --------------------------------------------------------------------------- device
@pytest.mark.parametrize("device", DEVICES)
def test_explicit_device_trains_there_and_checkpoints_hold_cpu_tensors(tmp_path, device):
    s = suite()
    t = trainer(s, device=device, out=tmp_path, epochs=1)
    t.fit(s.train, s.val)
    assert all(p.device.type == device for p in t.model.parameters())
    assert all(v.device.type == "cpu" for v in t.best_state.values())
    state = t.state()
    assert all(v.device.type == "cpu" for v in state["optimizer"]["state"][0].values())
    # the checkpoint loads on the CPU whatever device wrote it
    u = trainer(s, device="cpu", out=tmp_path, epochs=2)
    u.fit(s.train, resume=True)
    assert u.epoch == 2 and next(u.model.parameters()).device.type == "cpu"


def test_auto_prefers_cuda_then_mps_then_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto").type == "cuda"


def test_unavailable_or_unknown_device_is_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    s = suite(64)
    with pytest.raises(PolytaskError, match=r"device 'cuda' is not available on this machine.*use device=cpu") as e:
        trainer(s, device="cuda")
    assert "\n" not in str(e.value)
    with pytest.raises(PolytaskError, match="unknown device 'gpu'; choose one of: auto, cpu, cuda"):
        TrainConfig(device="gpu")


@pytest.mark.parametrize("bad, message", [
    ({"precision": "fp8"}, "unknown precision 'fp8'; choose one of: fp32, bf16, fp16"),
    ({"scheduler": "step"}, "unknown scheduler 'step'; choose one of: none, cosine, linear"),
    ({"optimizer_impl": "fast"}, "unknown optimizer_impl 'fast'"),
    ({"accumulate": 0}, "accumulate must be at least 1"),
    ({"warmup_fraction": 1.5}, r"warmup_fraction must be in \[0, 1\)"),
    ({"warmup_steps": 2, "warmup_fraction": 0.1}, "not both"),
    ({"device": 3}, "device must be a string"),
])
def test_bad_hardware_options_are_one_line(bad, message):
    with pytest.raises(PolytaskError, match=message):
        TrainConfig(**bad)


# ------------------------------------------------------------------ mixed precision
@pytest.mark.parametrize("device, precision", [("cpu", "bf16"), ("cpu", "fp16"),
                                               pytest.param("cuda", "bf16", marks=gpu),
                                               pytest.param("cuda", "fp16", marks=gpu)])
def test_autocast_trains(device, precision):
    s = suite(512)
    t = trainer(s, device=device, precision=precision, epochs=4, lr=3e-3)
    t.fit(s.train)
    first, last = t.history[0], t.history[-1]
    assert last["train/task1/loss"] < 0.8 * first["train/task1/loss"]
    assert (t.scaler is not None) == (precision == "fp16")
    assert all(p.dtype == torch.float32 for p in t.model.parameters())


@pytest.mark.parametrize("mode", ["params", "rep"])
@pytest.mark.parametrize("device", DEVICES)
def test_per_task_gradients_under_bf16_are_float32(monkeypatch, device, mode):
    """GradContext gets float32 losses; G (rep mode: the bf16 representation's rows, cast up) is float32;
    the Gramian the weighting combines is float64; the update written into .grad is float32."""
    seen: list = []
    gramian, task_grads = GradContext.gramian, GradContext.task_grads

    def spy_gramian(self, losses, *args, **kwargs):
        m = gramian(self, losses, *args, **kwargs)
        seen.extend([("losses", losses.dtype, torch.float32), ("gramian", m.dtype, torch.float64)])
        return m

    def spy_grads(self, losses):
        g = task_grads(self, losses)
        seen.append(("G", g.dtype, torch.float32))
        return g

    monkeypatch.setattr(GradContext, "gramian", spy_gramian)
    monkeypatch.setattr(GradContext, "task_grads", spy_grads)
    s = suite(128)
    seed_everything(0)
    model = ARCHITECTURES.create("shared-bottom", s.tasks, s.input_spec)
    grads = Grads()
    t = Trainer(model, s.tasks, "pcgrad", TrainConfig(epochs=1, batch_size=32, progress=False, device=device,
                                                      precision="bf16"), weighting_options={"mode": mode},
                hooks=[grads])
    t.fit(s.train)
    assert seen and all(got == want for _, got, want in seen), seen
    assert ("G" in {k for k, *_ in seen}) == (mode == "rep")
    assert grads.dtypes == {torch.float32}


def test_fp16_with_a_gradient_weighting_is_refused_in_one_line():
    with pytest.raises(PolytaskError, match="precision fp16 needs a loss weighting; 'pcgrad'.*use precision bf16"):
        trainer(suite(64), "pcgrad", precision="fp16")


# ------------------------------------------------------------------------ schedules
def test_lr_factor_by_hand():
    # warm-up 2 of 10 steps: 0, 1/2, then p = (s - 2) / 8
    assert [lr_factor(s, 10, 2, "cosine") for s in (0, 1, 2, 6, 10)] == pytest.approx([0, 0.5, 1, 0.5, 0])
    assert [lr_factor(s, 10, 2, "linear") for s in (0, 1, 2, 6, 9)] == pytest.approx([0, 0.5, 1, 0.5, 0.125])
    assert [lr_factor(s, 10, 2, "none") for s in (1, 2, 9)] == pytest.approx([0.5, 1, 1])


@pytest.mark.parametrize("kind, warmup", [("cosine", {"warmup_steps": 3}), ("linear", {"warmup_fraction": 0.25}),
                                          ("none", {"warmup_steps": 2})])
@pytest.mark.parametrize("device", DEVICES)
def test_scheduler_follows_the_formula_per_optimiser_step(device, kind, warmup):
    s = suite(256)
    log = LrLog()
    t = trainer(s, device=device, scheduler=kind, lr=0.01, epochs=2, accumulate=2, hooks=[log], **warmup)
    t.fit(s.train)
    total = 2 * math.ceil(math.ceil(len(s.train) / 32) / 2)  # epochs * optimiser steps per epoch
    w = warmup.get("warmup_steps") or round(warmup.get("warmup_fraction", 0) * total)
    assert len(log.lrs) == total == t.step == t.scheduler.last_epoch
    assert log.lrs == pytest.approx([0.01 * lr_factor(i, total, w, kind) for i in range(total)], abs=1e-12)


def test_warmup_longer_than_the_run_is_one_line():
    s = suite(64)
    with pytest.raises(PolytaskError, match="warm-up .* must be shorter than the run's 2 optimiser steps"):
        trainer(s, warmup_steps=5, epochs=1).fit(s.train)


# ---------------------------------------------------------------------- accumulation
def test_micro_batch_shares_by_hand():
    task = suite(64).tasks
    x = torch.zeros(3, 1)
    y = {t.name: torch.zeros(3) for t in task}
    a = Batch(x, y, {"task1": torch.tensor([1, 1, 1]).bool(), "task2": torch.tensor([1, 0, 0]).bool()}, frozenset())
    b = Batch(x[:1], {k: v[:1] for k, v in y.items()}, {"task1": torch.tensor([True]), "task2": torch.tensor([True])},
              frozenset({"task1"}))
    shares, samples = micro_batch_shares(task, [a, b])
    assert shares.tolist() == [[0.75, 0.5], [0.25, 0.5]] and samples == [0.75, 0.25]


@pytest.mark.parametrize("weighting", ["ew", "dwa", "fixed"])
@pytest.mark.parametrize("device", DEVICES)
def test_accumulation_equals_one_larger_batch(device, weighting):
    s = suite(300, partial=True)
    small = trainer(s, weighting, device=device, batch_size=20, accumulate=3, optimizer="sgd", lr=0.05, epochs=3)
    large = trainer(s, weighting, device=device, batch_size=60, optimizer="sgd", lr=0.05, epochs=3)
    small.fit(s.train)
    large.fit(s.train)
    assert small.step == large.step == 3 * math.ceil(len(s.train) / 60) and small.samples_seen == large.samples_seen
    for (k, a), b in zip(small.model.state_dict().items(), large.model.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=lambda m, k=k: f"{k}: {m}")
    for a, b in zip(small.history, large.history):
        assert a["train/task2/loss"] == pytest.approx(b["train/task2/loss"], abs=1e-6)


def test_mean_of_micro_batch_means_would_differ():
    """The test above can fail: with uneven label counts the naive mean is another loss."""
    s = suite(300, partial=True)
    batches = list(s.train.batches(60))[:1]
    big = batches[0]
    parts = [big.subset(torch.arange(i, i + 20)) for i in (0, 20, 40)]
    m = [float(p.mask["task2"].sum()) for p in parts]
    assert len(set(m)) > 1  # uneven counts, so the weights N_i / N are not 1/3
    shares, _ = micro_batch_shares(s.tasks, parts)
    assert not torch.allclose(shares[:, 1], torch.full((3,), 1 / 3, dtype=torch.float64), atol=1e-3)


@pytest.mark.parametrize("weighting", ["pcgrad", "uw"])
def test_accumulation_with_a_non_linear_weighting_is_refused(weighting):
    with pytest.raises(PolytaskError, match=f"accumulate > 1 equals one larger batch only for .*'{weighting}'"):
        trainer(suite(64), weighting, accumulate=2)


# --------------------------------------------------------------------- optimizers
@pytest.mark.parametrize("impl", ["fused", "foreach"])
def test_fused_and_foreach_optimizers_match_the_loop(impl):
    s = suite(128)
    ref = trainer(s, "uw", optimizer="adamw", optimizer_impl="loop", epochs=1)
    new = trainer(s, "uw", optimizer="adamw", optimizer_impl=impl, epochs=1)
    ref.fit(s.train)
    new.fit(s.train)
    assert new.optimizer.param_groups[0][impl] is True and ref.optimizer.param_groups[0]["foreach"] is False
    for a, b in zip(ref.model.parameters(), new.model.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@gpu
def test_auto_uses_fused_kernels_on_cuda():
    t = trainer(suite(64), device="cuda")
    assert t.optimizer.param_groups[0]["fused"] is True


# -------------------------------------------------------------------------- resume
@pytest.mark.parametrize("device, precision", [("cpu", "fp32"), ("cpu", "fp16"),
                                               pytest.param("cuda", "fp16", marks=gpu)])
def test_resume_restores_schedule_and_scaler_bit_for_bit(tmp_path, device, precision):
    s = suite(192)
    opts = {"device": device, "precision": precision, "scheduler": "cosine", "warmup_steps": 4, "epochs": 4}
    full_log = LrLog()
    full = trainer(s, "uw", hooks=[full_log], **opts)
    full.fit(s.train)
    first_log, resumed_log = LrLog(), LrLog()
    with pytest.raises(KeyboardInterrupt):
        trainer(s, "uw", out=tmp_path, hooks=[first_log, Interrupt(2)], **opts).fit(s.train)
    resumed = trainer(s, "uw", out=tmp_path, hooks=[resumed_log], **opts)
    resumed.fit(s.train, resume=True)
    assert first_log.lrs + resumed_log.lrs == full_log.lrs and len(full_log.lrs) == 4 * math.ceil(len(s.train) / 32)
    assert resumed.scheduler.state_dict() == full.scheduler.state_dict()
    if precision == "fp16":
        assert resumed.scaler.state_dict() == full.scaler.state_dict()
    for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)


def test_resume_may_change_the_device_but_not_the_training():
    stored = RunConfig.from_dict({"suite": "synthetic-mmoe", "train": {"precision": "bf16"}})
    moved = RunConfig.from_dict({"suite": "synthetic-mmoe", "train": {"precision": "bf16", "device": "auto"}})
    assert resume_config(stored, moved).train.device == "auto"
    for change in ({"precision": "fp32"}, {"scheduler": "cosine"}, {"accumulate": 2}, {"warmup_steps": 3}):
        given = RunConfig.from_dict({"suite": "synthetic-mmoe", "train": {"precision": "bf16", **change}})
        with pytest.raises(PolytaskError, match=f"train.{next(iter(change))} cannot change when resuming"):
            resume_config(stored, given)


# ----------------------------------------------------------------------------- CLI
def test_cli_flags_reach_the_run_config(tmp_path):
    out = tmp_path / "run"
    args = ["train", "--suite", "synthetic-mmoe", "--suite-option", "num_samples=200", "--suite-option", "dim=8",
            "--arch", "shared-bottom", "--baseline", "none", "--epochs", "1", "--batch-size", "32",
            "--device", "cpu", "--precision", "bf16", "--scheduler", "cosine", "--warmup-steps", "1",
            "--accumulate", "2", "--optimizer-impl", "foreach", "--no-progress", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    stored = RunConfig.from_yaml(out / "config.yaml").train
    assert (stored.device, stored.precision, stored.scheduler, stored.warmup_steps, stored.accumulate,
            stored.optimizer_impl) == ("cpu", "bf16", "cosine", 1, 2, "foreach")


def test_cli_bad_precision_is_one_line(tmp_path, capsys):
    from polytask.cli import main
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--suite", "synthetic-mmoe", "--precision", "half", "--out", str(tmp_path / "run")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "unknown precision 'half'; choose one of: fp32, bf16, fp16" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("option, message", [({"device": "auto"}, "the continual route trains on the CPU only"),
                                             ({"accumulate": 2}, "one batch per optimiser step")])
def test_continual_route_refuses_devices_and_accumulation_in_one_line(option, message):
    from polytask.continual.runner import run
    with pytest.raises(PolytaskError, match=message):
        run("split-digits", epochs=1, **option)
