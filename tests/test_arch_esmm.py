"""ESMM and AITM: entire-space chain outputs and losses, the AITM transfer and calibrator."""

from __future__ import annotations

import math
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F

from polytask import ARCHITECTURES, PolytaskError, TrainConfig, Trainer
from polytask.joint.config import RunConfig
from polytask.joint.runner import run
from polytask.metrics import masked_task_losses
from polytask.models.arch._chain import entire_space_batch, product_logit
from polytask.models.arch.aitm import InfoTransfer, calibrator_penalty
from polytask.tasks import Batch, InputSpec, Task
from polytask.weighting.base import GradContext
from arch_helpers import example_inputs, names_of, nonzero

TASKS = [Task("click", "binary"), Task("like", "binary"), Task("conversion", "binary")]
SPEC = InputSpec("recsys", field_vocab=(5, 7, 11), seq_names=("click", "like"), item_vocab=30, seq_len=6, dense_dim=3)
B = 8


def build(name: str, **opts):
    torch.manual_seed(0)
    return ARCHITECTURES.create(name, TASKS, SPEC, **opts)


def chain_batch(clicked: torch.Tensor) -> Batch:
    """Labels as synthetic-recsys gives them: conversion labelled (and possibly 1) on clicks only."""
    g = torch.Generator().manual_seed(3)
    conv = torch.randint(0, 2, (len(clicked),), generator=g).float() * clicked
    y = {"click": clicked, "like": torch.randint(0, 2, (len(clicked),), generator=g).float(), "conversion": conv}
    mask = {"click": torch.ones(len(clicked), dtype=torch.bool), "like": torch.ones(len(clicked), dtype=torch.bool),
            "conversion": clicked.bool()}
    return Batch(example_inputs(SPEC, len(clicked)), y, mask, frozenset({"click", "like"}))


CLICKED = torch.tensor([1.0, 0, 1, 0, 0, 1, 0, 0])


def test_product_logit_by_hand():
    a, b = torch.tensor([[0.0]]), torch.tensor([[math.log(3.0)]])  # σ = 1/2 and 3/4
    assert float(product_logit([a, b]).sigmoid()) == pytest.approx(0.375, abs=1e-6)
    assert float(product_logit([a])) == pytest.approx(0.0, abs=1e-6)


def test_esmm_conversion_output_is_pctr_times_pcvr():
    model = build("esmm").eval()
    x = example_inputs(SPEC, B)
    out, cond = model(x), model.conditional_probabilities(x)
    assert model.chain == ["click", "conversion"]
    torch.testing.assert_close(out["click"].sigmoid(), cond["click"])
    torch.testing.assert_close(out["conversion"].sigmoid(), cond["click"] * cond["conversion"])
    pcvr = model.heads["conversion"](model.bottom(model.backbone(x))).sigmoid()  # the CVR tower by hand
    torch.testing.assert_close(cond["conversion"], pcvr)


def test_entire_space_labels_by_hand():
    y = {"a": torch.tensor([1.0, 1, 0, 1, 1]), "b": torch.tensor([1.0, 0, 0, 0, 1]), "c": torch.tensor([1.0, 0, 0, 0, 0])}
    m = {"a": torch.tensor([1, 1, 1, 1, 0]).bool(), "b": torch.tensor([1, 1, 0, 0, 1]).bool(),
         "c": torch.tensor([1, 1, 0, 1, 1]).bool()}
    out = entire_space_batch(Batch(torch.zeros(5, 1), y, m), ["a", "b", "c"])
    assert out.y["b"].tolist() == [1, 0, 0, 0, 0] and out.mask["b"].tolist() == [True, True, True, False, False]
    assert out.y["c"].tolist() == [1, 0, 0, 0, 0] and out.mask["c"].tolist() == [True, True, True, False, False]
    assert out.y["a"].tolist() == [1, 1, 0, 1, 0] and torch.equal(out.mask["a"], m["a"])


@pytest.mark.parametrize("name", ["esmm", "aitm"])
def test_conversion_loss_covers_non_clicked_impressions(name):
    model = build(name)
    batch = chain_batch(CLICKED)
    tower = model.heads["conversion"] if name == "esmm" else model.towers["conversion"]
    unclicked = batch.subset(torch.nonzero(CLICKED == 0).flatten())
    plain = masked_task_losses(TASKS, model(unclicked.x), unclicked)[2]
    assert float(plain.detach()) == 0.0  # the suite's own mask: no conversion loss off clicks
    loss = masked_task_losses(TASKS, model(unclicked.x), model.loss_batch(unclicked))[2]
    grads = torch.autograd.grad(loss, list(tower.parameters()))
    assert float(loss) > 0 and all(nonzero(g) for g in grads)  # non-clicked samples train the CVR side
    # and that is what the Trainer takes: BCE(pCTCVR, click & conversion) over all impressions
    out = model(batch.x)
    expected = F.binary_cross_entropy(out["conversion"].sigmoid().squeeze(1), batch.y["click"] * batch.y["conversion"])
    trainer = Trainer(model, TASKS, "ew", TrainConfig(progress=False))
    losses, _ = trainer.train_step(model, batch)
    assert float(losses[2]) == pytest.approx(float(expected), rel=1e-5)


def test_aitm_calibrator_penalty_by_hand():
    p1, p2, p3 = torch.tensor([0.5, 0.2, 0.9]), torch.tensor([0.3, 0.4, 0.95]), torch.tensor([0.1, 0.5, 0.5])
    assert float(calibrator_penalty([p1, p2])) == pytest.approx((0 + 0.2 + 0.05) / 3)
    assert float(calibrator_penalty([p1, p2, p3])) == pytest.approx((0 + 0.3 + 0.05) / 3)
    model = build("aitm", alpha=0.6)
    x = example_inputs(SPEC, B)
    out = model(x)
    expected = 0.6 * (out["conversion"].sigmoid() - out["click"].sigmoid()).clamp(min=0).mean()
    torch.testing.assert_close(model.aux_loss, expected)
    model.eval()
    model(x)
    assert model.aux_loss is None


def test_info_transfer_attention_by_hand():
    ait = InfoTransfer(2)
    for lin in (ait.h1, ait.h2, ait.h3):
        torch.nn.init.eye_(lin.weight)
    p, q = torch.tensor([[1.0, 1.0]]), torch.tensor([[2.0, 0.0]])
    w = torch.softmax(torch.tensor([2.0, 4.0]) / math.sqrt(2), 0)  # <u, u>/√k per slot
    torch.testing.assert_close(ait(p, q), w[0] * p + w[1] * q)


def test_aitm_transfer_carries_the_previous_task_representation():
    model = build("aitm").eval()
    x = example_inputs(SPEC, B)
    before = model(x)
    handle = model.transfer["conversion"].register_forward_hook(lambda m, i, o: torch.zeros_like(o))
    after = model(x)
    handle.remove()
    assert not torch.allclose(before["conversion"], after["conversion"])
    torch.testing.assert_close(before["click"], after["click"])
    torch.testing.assert_close(before["like"], after["like"])
    # the conversion loss reaches the click tower through the transfer (no stop-gradient, as in the authors' code)
    grads = torch.autograd.grad(model(x)["conversion"].sum(), list(model.towers["click"].parameters()))
    assert all(nonzero(g) for g in grads)


@pytest.mark.parametrize("name", ["esmm", "aitm"])
def test_chain_keeps_the_architecture_contract(name):
    model = build(name)
    x = example_inputs(SPEC, B)
    shared, specific = {id(p) for p in model.shared_parameters()}, {id(p) for p in model.task_specific_parameters()}
    assert shared and not shared & specific and shared | specific == {id(p) for p in model.parameters()}
    batch = chain_batch(CLICKED)
    loss_batch = model.loss_batch(batch)
    for later, earlier in (("conversion", "like"), ("click", "conversion"), ("like", "click")):
        grads = dict(zip(names_of(model, list(model.parameters())), torch.autograd.grad(
            model(x)[later].sum(), list(model.parameters()), allow_unused=True)))
        assert not any(nonzero(grads[n]) for n in names_of(model, model.task_parameters(earlier))), (later, earlier)
    w = torch.tensor([0.5, 1.0, 2.0])
    model.zero_grad(set_to_none=True)
    (w * masked_task_losses(TASKS, model(x), loss_batch)).sum().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    for mode in ("params", "rep"):
        model.zero_grad(set_to_none=True)
        ctx = GradContext(model, mode)
        with model.representation_cut() if mode == "rep" else nullcontext():
            losses = masked_task_losses(TASKS, model(x), loss_batch)
        ctx.task_grads(losses)
        ctx.apply(losses, w)
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.grad, expected[n], atol=1e-6, rtol=1e-4, msg=f"{mode} {n}")


@pytest.mark.parametrize("name", ["esmm", "aitm"])
def test_chain_option_is_checked_in_one_line(name):
    with pytest.raises(PolytaskError, match="lacks"):
        build(name, chain=["click", "purchase"])
    with pytest.raises(PolytaskError, match="binary tasks only"):
        ARCHITECTURES.create(name, [Task("click", "binary"), Task("conversion", "regression")], SPEC)
    assert build(name, chain=["like", "conversion"]).chain == ["like", "conversion"]


@pytest.mark.parametrize("name", ["esmm", "aitm"])
def test_trains_through_the_joint_route_on_synthetic_recsys(name):
    config = RunConfig(suite="synthetic-recsys", arch=name, baseline="none",
                       suite_options={"num_samples": 600, "num_users": 50, "num_items": 80, "num_tasks": 6},
                       train=TrainConfig(epochs=1, batch_size=128, progress=False))
    result = run(config)
    assert 0.0 <= result.metrics["test"]["conversion"]["auroc"] <= 1.0
