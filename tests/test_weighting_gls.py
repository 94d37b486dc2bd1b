"""GLS: the update is the gradient of the geometric mean of the task losses."""

from __future__ import annotations

import pytest
import torch

from polytask import WEIGHTINGS, PolytaskError


def test_gls_gradient_is_the_geometric_mean_gradient_computed_by_hand():
    theta = torch.tensor([1.0, 2.0], requires_grad=True)
    losses = torch.stack([theta[0] ** 2, 3 * theta[1]])  # L = (1, 6)
    weights = WEIGHTINGS.create("gls", ["a", "b"]).backward(losses)
    gls = (1.0 * 6.0) ** 0.5
    # dL_GLS/dθ = (L_GLS / T) (∇L_a / L_a + ∇L_b / L_b) = (√6 / 2) ((2θ_0, 0) / 1 + (0, 3) / 6)
    expected = torch.tensor([gls / 2 * 2.0, gls / 2 * 0.5])
    assert torch.allclose(theta.grad, expected)
    assert torch.allclose(weights, torch.tensor([gls / 2 / 1.0, gls / 2 / 6.0]))


def test_gls_direction_ignores_a_constant_rescaling_of_one_task():
    grads = []
    for scale in (1.0, 100.0):
        theta = torch.tensor([0.5, -1.5], requires_grad=True)
        WEIGHTINGS.create("gls", ["a", "b"]).backward(torch.stack([(theta ** 2).sum(), scale * theta.exp().sum()]))
        grads.append(theta.grad / theta.grad.norm())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_gls_refuses_a_zero_loss():
    with pytest.raises(PolytaskError, match="positive task losses"):
        WEIGHTINGS.create("gls", ["a", "b"]).backward(torch.tensor([0.0, 1.0], requires_grad=True))
