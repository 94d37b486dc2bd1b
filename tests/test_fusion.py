"""Fusion at the output: the Dynamic Logits Fusion weight rule on a hand-computed 2-expert, 3-class case,
output ensembles of identical experts, fusers on a tiny merge suite, and one-line errors."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from polytask import PolytaskError
from polytask.merging import evaluate_merger, load_merge_suite
from polytask.merging.fusion import FusedModel, fuse_models
from polytask.merging.fusion.dlf import DynamicLogitsFusion, alpha_grid, dlf_fuse, dlf_objective, dlf_weights
from polytask.merging.fusion.logit_ensemble import mean_logits
from polytask.merging.fusion.prob_ensemble import mean_probabilities
from polytask.registry import FAMILIES, FUSERS

LN4 = math.log(4.0)
TINY = {"tasks": ["parity", "mirror", "invert"], "hidden": 32, "pretrain_epochs": 2, "probe_epochs": 5, "epochs": 8}


def _two_samples() -> tuple[torch.Tensor, torch.Tensor]:
    """Base logits 0 (uniform Q = P over 3 classes) for two samples. Sample 0: expert 0 = (ln 4, 0, 0),
    expert 1 = the base; sample 1: the other way round, on class 1. Experts [T=2, N=2, C=3]."""
    base = torch.zeros(2, 3)
    experts = torch.tensor([[[LN4, 0.0, 0.0], [0.0, 0.0, 0.0]],
                            [[0.0, 0.0, 0.0], [0.0, LN4, 0.0]]])
    return base, experts


def test_dlf_objective_matches_the_hand_computed_value():
    # Q_1 = (4, 1, 1)/6 = (2/3, 1/6, 1/6): KL(Q_1‖Q) = 2/3 ln 2 − 1/3 ln 2 = ln2/3, and KL(Q‖Q_1) = ln2/3 too;
    # the expert equal to the base has both KLs 0. At α_1 = 0.5, P̃ = softmax(0.5 ln 4, 0, 0) = (1/2, 1/4, 1/4):
    # KL(P̃‖P) = ½ ln(9/8), KL(P‖P̃) = ⅓ ln(32/27), so
    # L = (½ ln(9/8) − ln2/3)² + (⅓ ln(32/27) − ln2/3)² + (½ ln(9/8))² + (⅓ ln(32/27))².
    base, experts = _two_samples()
    k, f, g = math.log(2) / 3, 0.5 * math.log(9 / 8), math.log(32 / 27) / 3
    expected = (f - k) ** 2 + (g - k) ** 2 + f ** 2 + g ** 2  # = 0.066734...
    fused = base[:1] + 0.5 * (experts[0, :1] - base[:1])
    got = dlf_objective(fused[None], experts[:, :1], base[:1])
    assert got.shape == (1, 1)
    assert got.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("search", ["single", "joint"])
def test_dlf_weights_put_the_fused_divergence_at_the_centroid_of_the_experts(search):
    # The targets are the mean of the experts' KLs, ln2/6 ≈ 0.1155 in both directions. Along α·(ln 4, 0, 0),
    # P̃ = (4^α, 1, 1)/(4^α + 2): at α = 0.7, KL(P̃‖P) = 0.1161 and KL(P‖P̃) = 0.1124, the grid point nearest
    # the centroid: L(0.6) = 0.0574, L(0.7) = 0.0534, L(0.8) = 0.0579 (and any α on the base-equal expert
    # leaves P̃ = P, L = 2 (ln2/3)² = 0.1067). Sample 1 is the mirror image, so its weight goes to expert 1.
    base, experts = _two_samples()
    w = dlf_weights(experts, base, search=search)
    assert torch.allclose(w, torch.tensor([[0.7, 0.0], [0.0, 0.7]]))
    fused = dlf_fuse(experts, base, w)
    assert torch.allclose(fused, torch.tensor([[0.7 * LN4, 0.0, 0.0], [0.0, 0.7 * LN4, 0.0]]), atol=1e-6)
    p = torch.softmax(fused[0], -1)
    kl_fused = float((p * (p / (1 / 3)).log()).sum())
    assert kl_fused == pytest.approx(0.1161, abs=1e-4)
    losses = [dlf_objective((base[:1] + a * (experts[0, :1] - base[:1]))[None], experts[:, :1], base[:1]).item()
              for a in (0.6, 0.7, 0.8)]
    assert losses == pytest.approx([0.0574, 0.0534, 0.0579], abs=1e-4)


def test_dlf_returns_a_single_expert_exactly_when_the_base_is_the_receiving_model():
    torch.manual_seed(0)
    base, expert = torch.randn(5, 4), torch.randn(1, 5, 4)
    w = dlf_weights(expert, base)
    assert torch.equal(w, torch.ones(5, 1))                  # α = 1 makes the objective zero (P = Q)
    assert torch.allclose(dlf_fuse(expert, base, w), expert[0], atol=1e-6)


def test_dlf_weights_are_set_per_token_of_a_sequence():
    torch.manual_seed(1)
    base, experts = torch.randn(2, 3, 5), torch.randn(3, 2, 3, 5)     # [B, L, C] and [T, B, L, C]
    w = dlf_weights(experts, base)
    assert w.shape == (2, 3, 3)
    flat = dlf_weights(experts.reshape(3, 6, 5), base.reshape(6, 5))
    assert torch.equal(w.reshape(6, 3), flat)
    assert ((w > 0).sum(-1) <= 1).all()                      # search="single": one expert active per step


def test_probability_and_logit_means_differ_as_computed_by_hand():
    experts = torch.tensor([[[math.log(3.0), 0.0]], [[0.0, 0.0]]])    # probabilities (3/4, 1/4) and (1/2, 1/2)
    assert torch.allclose(mean_probabilities(experts).exp(), torch.tensor([[0.625, 0.375]]))
    s3 = math.sqrt(3.0)                                      # mean logits (ln3/2, 0): softmax = (√3, 1)/(√3 + 1)
    assert torch.allclose(torch.softmax(mean_logits(experts), -1), torch.tensor([[s3 / (s3 + 1), 1 / (s3 + 1)]]))


@pytest.mark.parametrize("method", ["prob-ensemble", "logit-ensemble", "dlf"])
def test_fusing_identical_experts_gives_the_expert(method):
    torch.manual_seed(2)
    expert, base = nn.Linear(4, 3), nn.Linear(4, 3)
    fused = fuse_models(method, base, [expert, copy.deepcopy(expert), copy.deepcopy(expert)])
    x = torch.randn(7, 4)
    with torch.no_grad():
        assert torch.allclose(torch.log_softmax(fused(x), -1), torch.log_softmax(expert(x), -1), atol=1e-5)


@pytest.fixture(scope="module")
def suite():
    return load_merge_suite("digits-merge", progress=False, **TINY)   # the tiny suite of test_merge_suites


def test_fusers_on_a_tiny_merge_suite_beat_the_base_and_record_what_they_keep(suite):
    base = sum(suite.meta["base_accuracy"][t] for t in suite.tasks) / len(suite.tasks)
    for method in FUSERS.names():
        run = evaluate_merger(suite, method)
        assert run["family"] == "fusion" and set(run["test"]) == set(suite.tasks)
        assert run["average_accuracy"] >= base, method
        assert run["models_kept"] == len(suite.tasks) + int(FUSERS.get(method).needs_base)
        assert run["parameters_kept"] > (run["models_kept"] - 1) * suite.meta["merged_parameters"]
        for task, w in run["expert_weights"].items():
            assert set(w) == set(suite.tasks)
            if method != "dlf":
                assert all(v == pytest.approx(1 / 3, abs=1e-4) for v in w.values())


def test_bad_input_is_one_line():
    cases = [
        lambda: FusedModel(FUSERS.create("prob-ensemble"), []),
        lambda: fuse_models("logit-ensemble", None, [nn.Linear(4, 3), nn.Linear(4, 5)])(torch.randn(2, 4)),
        lambda: fuse_models("dlf", None, [nn.Linear(4, 3)]),
        lambda: DynamicLogitsFusion().fuse(torch.zeros(2, 3), torch.zeros(2, 2, 4)),
        lambda: FUSERS.create("prob-ensemble").fuse(None, torch.zeros(0, 2, 3)),
        lambda: dlf_weights(torch.zeros(6, 2, 3), torch.zeros(2, 3), search="joint"),
        lambda: FUSERS.create("dlf", alpha_step=0.0),
        lambda: FUSERS.create("dlf", search="sometimes"),
        lambda: FUSERS.create("mean"),
    ]
    for case in cases:
        with pytest.raises(PolytaskError) as err:
            case()
        assert "\n" not in str(err.value) and str(err.value)
    assert len(alpha_grid()) == 21 and FAMILIES["fuser"] is FUSERS


def test_compare_reports_a_fuser_in_the_merge_route_with_every_expert_kept(suite):
    from polytask.comparison.cells import run_cell
    from polytask.comparison.runner import CompareConfig, check_config
    from polytask.comparison.suite import comparison_suite

    check_config(CompareConfig(suite="digits-merge", routes=["merge"], methods={"merge": ["dlf", "prob-ensemble"]}))
    cmp = comparison_suite(suite)
    fused = run_cell(cmp, "merge", "prob-ensemble", 0)
    individual = run_cell(cmp, "reference", "individual", 0)
    assert fused["data_access"] == "none" and set(fused["accuracy"]) == set(suite.tasks)
    assert fused["stored_parameters"] == individual["stored_parameters"]   # T bodies and heads, like the ceiling
    dlf = run_cell(cmp, "merge", "dlf", 0)
    assert dlf["stored_parameters"] == fused["stored_parameters"] + suite.meta["merged_parameters"]  # + the base
