"""The fast continual paths equal the plain ones: consolidated EWC, batched Fisher, the der++ alias."""

import pytest
import torch
from torch import nn

from polytask.continual.ewc import EWC, diagonal_fisher, quadratic_penalty
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
def test_batched_fisher_equals_the_per_sample_loop(mode):
    torch.manual_seed(1)
    model = Net().double()
    task = Task("t", "multiclass", num_classes=3)
    data = MultiTaskData(torch.randn(40, 5, dtype=torch.float64), {"t": torch.randint(0, 3, (40,))})
    g1, g2 = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
    batched = diagonal_fisher(model, [task], data, 30, g1, mode, batched=True)
    looped = diagonal_fisher(model, [task], data, 30, g2, mode, batched=False)
    for k in looped:
        assert looped[k].abs().sum() > 0
        assert torch.allclose(batched[k], looped[k], atol=1e-6), k
    assert torch.equal(g1.get_state(), g2.get_state())  # the same label draws


def test_der_is_an_alias_of_der_plus_plus_that_warns():
    assert "der++" in STRATEGIES.names() and "der" not in STRATEGIES.names() and "der" in STRATEGIES
    with pytest.warns(DeprecatedName, match="use 'der\\+\\+'"):
        old = STRATEGIES.create("der", memory=10)
    assert type(old) is STRATEGIES.get("der++")
