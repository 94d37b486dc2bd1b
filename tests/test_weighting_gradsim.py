"""Gradient-similarity auxiliary weighting (Du et al. 2018): gates by hand, the update, options."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import polytask.weighting  # noqa: F401
from polytask.errors import PolytaskError
from polytask.registry import WEIGHTINGS
from polytask.weighting.base import GradContext
from polytask.weighting.gradsim import similarity_gates

G = torch.tensor([[1.0, 0.0], [1.0, 1.0], [-1.0, 0.5]], dtype=torch.float64)  # main, helpful aux, conflicting aux


class Linear(nn.Module):
    """L_t(θ) = g_t · θ + 1: the task gradients are the rows of G."""

    def __init__(self) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(2, dtype=torch.float64))

    def losses(self):
        return G @ self.theta + 1

    def shared_parameters(self):
        return [self.theta]


def test_gates_by_hand():
    torch.testing.assert_close(similarity_gates(G, 0), torch.tensor([1.0, 1 / math.sqrt(2), 0.0], dtype=torch.float64))
    torch.testing.assert_close(similarity_gates(G, 0, "unweighted"), torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64))
    # main = the conflicting task: cos(g_2, g_0) = -2/√5 < 0, cos(g_2, g_1) = -0.5/√2.5 < 0
    torch.testing.assert_close(similarity_gates(G, 2), torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64))


@pytest.mark.parametrize(("variant", "gate"), [("weighted", 1 / math.sqrt(2)), ("unweighted", 1.0)])
def test_update_is_main_gradient_plus_gated_auxiliaries(variant, gate):
    model = Linear()
    w = WEIGHTINGS.create("gradsim", ["main", "aux", "bad"], variant=variant, aux_weight=0.5)
    weights = w.backward(model.losses(), GradContext(model, "params"))
    torch.testing.assert_close(weights, torch.tensor([1.0, 0.5 * gate, 0.0], dtype=torch.float64))
    torch.testing.assert_close(model.theta.grad, G[0] + 0.5 * gate * G[1])  # the conflicting task is blocked


def test_main_option_is_checked_in_one_line():
    assert WEIGHTINGS.create("gradsim", ["a", "b"], main="b").main == 1
    with pytest.raises(PolytaskError, match="main task 'c' is not a task"):
        WEIGHTINGS.create("gradsim", ["a", "b"], main="c")


def test_trains_an_mmoe_through_the_trainer():
    from polytask import ARCHITECTURES, SUITES, TrainConfig, Trainer

    suite = SUITES.create("synthetic-mmoe", num_samples=200, dim=10, seed=0)
    torch.manual_seed(0)
    model = ARCHITECTURES.create("mmoe", suite.tasks, suite.input_spec, num_experts=2, expert=[4], tower=[4])
    before = [p.detach().clone() for p in model.parameters()]
    trainer = Trainer(model, suite.tasks, "gradsim", TrainConfig(epochs=1, batch_size=64, progress=False),
                      weighting_options={"main": suite.task_names[1]})
    history = trainer.fit(suite.train)
    assert len(history) == 1 and all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
