"""Prompt-based continual learners (L2P, DualPrompt, CODA-Prompt): hand cases of their defining steps,
the frozen encoder, and short end-to-end runs."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import polytask.continual  # noqa: F401  (registers the strategies)
from polytask.continual._prompting import frozen_encoder, prefix_attention, split_prefix
from polytask.continual.coda_prompt import CodaPromptModel, component_weights, gram_schmidt_rows, ortho_penalty
from polytask.continual.dualprompt import DualPromptModel, match_task
from polytask.continual.runner import ContinualConfig, run_continual
from polytask.continual.scenario import Scenario
from polytask.errors import PolytaskError
from polytask.registry import STRATEGIES
from polytask.tasks import InputSpec, Task

TASKS = [Task("class", "multiclass", num_classes=4)]


class Identity(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.out_dim = dim

    def forward(self, x):
        return x


class StandIn(nn.Module):
    """A small 'pretrained' encoder with weights and dropout (so frozen means weights and eval mode)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.5), nn.Tanh())
        self.out_dim = 8

    def forward(self, x):
        return self.net(x)


def test_prefix_attention_by_hand():
    h = torch.tensor([[1.0, 0.0]])
    k, v = torch.tensor([[0.0, 1.0]]), torch.tensor([[2.0, 2.0]])
    w = torch.softmax(torch.tensor([0.0, 1.0]) / math.sqrt(2), 0)  # <h, k> = 0, <h, h> = 1
    torch.testing.assert_close(prefix_attention(h, k, v), w[0] * v + w[1] * h)
    torch.testing.assert_close(prefix_attention(h, k[:0], v[:0]), h)  # no prompt: the frozen feature itself
    keys, values = split_prefix(torch.arange(8.0).reshape(4, 2))
    assert keys.tolist() == [[0, 1], [2, 3]] and values.tolist() == [[4, 5], [6, 7]]


def test_dualprompt_key_matching_picks_the_right_e_prompt():
    model = DualPromptModel(Identity(3), TASKS, 3, g_length=2, e_length=2)
    with torch.no_grad():
        for key, direction in zip(model.keys, torch.eye(3)):
            key.copy_(direction)
    q = torch.tensor([[0.1, 2.0, 0.3], [0.0, -1.0, 0.2], [3.0, 0.0, 0.1]])
    assert match_task(q, torch.stack(list(model.keys))).tolist() == [1, 2, 0]
    for t in range(3):
        model.start_task(t)
    model.eval()
    out = model(q)["class"]
    assert model.last_selection.tolist() == [1, 2, 0]
    # the selected E-prompt is the one applied, after the shared G-prompt
    h = prefix_attention(q, *split_prefix(model.g))
    e = torch.stack([model.e[1], model.e[2], model.e[0]])
    torch.testing.assert_close(out, model.heads["class"](prefix_attention(h, *split_prefix(e))))


def test_dualprompt_trains_the_current_tasks_prompt_and_key_only():
    model = DualPromptModel(Identity(3), TASKS, 3, g_length=2, e_length=2, pull=1.0)
    model.start_task(1)
    model.train()
    q = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    loss = model(q)["class"].sum() + model.aux_loss
    loss.backward()
    assert model.last_selection.tolist() == [1, 1]  # training uses the task's own E-prompt
    key = model.keys[1].detach()
    pull = (1 - torch.nn.functional.cosine_similarity(q, key[None], dim=-1)).mean()
    torch.testing.assert_close(model.aux_loss, pull)
    assert model.e[1].grad is not None and model.keys[1].grad is not None and model.g.grad is not None
    assert all(p.grad is None and not p.requires_grad for i in (0, 2) for p in (model.e[i], model.keys[i]))
    model.eval()
    model(q)
    assert model.last_selection.max() <= 1  # only the tasks trained so far are matched


def test_coda_component_weights_are_cosine_of_query_times_attention_and_keys():
    q = torch.tensor([[1.0, 2.0]])
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    k = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # q ⊙ A_0 = [1, 0] against K_0 = [1, 0]: 1;  q ⊙ A_1 = [1, 2] against K_1 = [0, 1]: 2/√5
    torch.testing.assert_close(component_weights(q, k, a), torch.tensor([[1.0, 2 / math.sqrt(5)]]))
    model = CodaPromptModel(Identity(2), TASKS, 1, pool_size=2, prompt_length=2)
    model.start_task(0)
    with torch.no_grad():
        model.keys[0].copy_(k)
        model.attention[0].copy_(a)
    model.eval()
    out = model(q)["class"]
    alpha = torch.tensor([[1.0, 2 / math.sqrt(5)]])
    torch.testing.assert_close(model.last_weights, alpha)
    p = torch.einsum("bm,mld->bld", alpha, model.prompts[0])
    torch.testing.assert_close(out, model.heads["class"](prefix_attention(q, p[:, :1], p[:, 1:])))


def test_coda_new_components_are_orthonormal_to_all_earlier_ones():
    model = CodaPromptModel(Identity(16), TASKS, 3, pool_size=6, prompt_length=2)
    model.start_task(0)
    with torch.no_grad():  # training moves task 0's components off the orthonormal start
        for blocks in (model.prompts, model.keys, model.attention):
            blocks[0].add_(0.3 * torch.randn_like(blocks[0]))
    model.start_task(1)
    for blocks in (model.prompts, model.keys, model.attention):
        old, new = blocks[0].detach().flatten(1), blocks[1].detach().flatten(1)
        torch.testing.assert_close(new @ new.T, torch.eye(2), atol=1e-5, rtol=0)
        torch.testing.assert_close(new @ old.T, torch.zeros(2, 2), atol=1e-5, rtol=0)
        assert not blocks[0].requires_grad and blocks[1].requires_grad and not blocks[2].requires_grad
    before = model.keys[1].detach().clone()
    model.start_task(1)  # resuming the same task does not redraw its components
    assert torch.equal(model.keys[1].detach(), before)
    rows = gram_schmidt_rows(torch.zeros(0, 3), 2, torch.Generator().manual_seed(0))
    torch.testing.assert_close(rows @ rows.T, torch.eye(2), atol=1e-6, rtol=0)


def test_coda_orthogonality_penalty_by_hand():
    t = torch.tensor([[1.0, 0.0], [1.0, 1.0]])  # t tᵀ - I = [[0, 1], [1, 1]]
    assert float(ortho_penalty(t)) == pytest.approx(3 / 4)
    model = CodaPromptModel(Identity(4), TASKS, 2, pool_size=4, prompt_length=2, ortho=0.5)
    model.start_task(0)
    model.train()
    model(torch.randn(3, 4))
    k, a, p = model.keys[0], model.attention[0], model.prompts[0].flatten(1)
    expected = 0.5 * (ortho_penalty(k) + ortho_penalty(a) + ortho_penalty(p))
    torch.testing.assert_close(model.aux_loss, expected)


def test_named_encoder_path_is_frozen_and_reshapes_flat_images():
    spec = InputSpec("dense", dim=16)
    enc = frozen_encoder(lambda: None, spec, "cnn", {"channels": [4]}, [1, 4, 4], "dualprompt")
    assert enc.out_dim == 4 and not enc.training and not any(p.requires_grad for p in enc.parameters())
    assert enc(torch.randn(5, 16)).shape == (5, 4)
    with pytest.raises(PolytaskError, match="image_shape"):
        frozen_encoder(lambda: None, spec, "cnn", None, [1, 5, 5], "dualprompt")


def _scenario() -> Scenario:
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 6, generator=g) * 3
    y = torch.arange(320) % 4
    x = centers[y] + 0.5 * torch.randn(320, 6, generator=g)
    return Scenario.from_tensors(x, y, classes_per_experience=2, setting="task")


@pytest.mark.parametrize("strategy", ["l2p", "dualprompt", "coda-prompt"])
def test_two_experience_run_keeps_the_encoder_frozen(strategy):
    torch.manual_seed(0)
    encoder = StandIn()
    frozen = {k: v.clone() for k, v in encoder.state_dict().items()}
    config = ContinualConfig(scenario="custom", strategy=strategy, train={"epochs": 5, "batch_size": 32, "lr": 0.01})
    result = run_continual(config, scenario=_scenario(),
                           model=lambda: type("Base", (), {"backbone": encoder})())
    assert result.model.backbone is encoder and not encoder.training
    assert all(torch.equal(v, frozen[k]) for k, v in encoder.state_dict().items())  # bit for bit
    matrix = result.metrics["accuracy_matrix"]
    assert len(matrix) == 2 and matrix[0][0] > 0.8  # the first experience is learned ...
    assert sum(matrix[-1]) / 2 > 0.75  # ... and both are, on the frozen features, at the end


def test_prompt_strategies_are_registered_and_refuse_task_free_streams():
    assert {"l2p", "dualprompt", "coda-prompt"} <= set(STRATEGIES.names())
    assert STRATEGIES.get("dualprompt").needs_boundaries and STRATEGIES.get("coda-prompt").needs_boundaries
    with pytest.raises(PolytaskError, match="prompt lengths must be even"):
        DualPromptModel(Identity(3), TASKS, 2, e_length=3)
    with pytest.raises(PolytaskError, match="pool_size"):
        CodaPromptModel(Identity(3), TASKS, 5, pool_size=4)


def test_multilabel_heads_mask_unseen_classes_with_a_constant_not_minus_infinity():
    tasks = [Task("genres", "multilabel", num_classes=3)]
    model = DualPromptModel(Identity(3), tasks, 3, g_length=2, e_length=2)
    model.train_classes = {"genres": [0, 2]}
    model.train()
    logits = model.read_out(torch.randn(4, 3))["genres"]
    assert torch.equal(logits[:, 1], torch.zeros(4))  # the unseen class: 0, so its loss stays finite
    loss = tasks[0].loss(logits, torch.ones(4, 3)).mean()
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.heads.parameters())
