"""Seed methods against their authors' code and their defining equations.

The fixtures under tests/fixtures/ were written by the reference-derived scripts next to them
(make_<method>_fixture.py, each naming the repository and file it adapts); polytask must agree
with them to 1e-5. The hand cases check the defining equation of AdaMerging, aTLAS and RLW.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from polytask import MERGERS, WEIGHTINGS
from polytask.merging import MergeData
from polytask.merging._learned import TaskVectorStack
from polytask.weighting._common import gram
from polytask.weighting.cagrad import cagrad_weights

FIXTURES = Path(__file__).parent / "fixtures"
TOL = 1e-5


def _load(name: str) -> dict:
    return json.loads((FIXTURES / f"{name}.json").read_text())


def _close(a: torch.Tensor, b: list | torch.Tensor) -> bool:
    b = torch.as_tensor(b, dtype=torch.float64)
    return a.shape == b.shape and float((a.double() - b).abs().max()) <= TOL


# --- CAGrad: the authors' SLSQP solve on fixed gradients ------------------------------------------

def test_cagrad_shared_gradient_matches_the_authors_solver():
    for case in _load("cagrad")["cases"]:
        grads = torch.tensor(case["grads"], dtype=torch.float64)
        w = torch.from_numpy(cagrad_weights(gram(grads).numpy(), case["c"])) * grads.shape[0]
        assert _close(w @ grads, case["shared_grad"]), case["c"]


# --- RLW: softmax of the seeded N(0, 1) draw ---------------------------------------------------------

def _rlw_weights(seed: int, tasks: int, steps: int) -> list[torch.Tensor]:
    rlw = WEIGHTINGS.create("rlw", [f"t{i}" for i in range(tasks)], seed=seed)
    out = []
    for _ in range(steps):
        losses = torch.ones(tasks, requires_grad=True)
        w = rlw.backward(losses)
        assert torch.allclose(losses.grad, w)  # L = Σ_t w_t L_t, so ∂L/∂L_t = w_t
        out.append(w)
    return out


def test_rlw_matches_libmtl_draws():
    for case in _load("rlw")["cases"]:
        got = _rlw_weights(case["seed"], case["tasks"], len(case["weights"]))
        assert all(_close(w, ref) for w, ref in zip(got, case["weights"]))


def test_rlw_weights_are_softmax_of_the_generators_normal_draw():
    gen = torch.Generator().manual_seed(7)
    expect = [torch.softmax(torch.randn(3, generator=gen), 0) for _ in range(5)]
    got = _rlw_weights(7, 3, 5)
    assert all(torch.equal(w, e) for w, e in zip(got, expect))
    assert not torch.allclose(got[0], got[1])  # a fresh draw every step


# --- aTLAS: θ^b = θ_0^b + Σ_t λ_t^b τ_t^b --------------------------------------------------------------

def _atlas_net() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))


def test_atlas_composition_matches_the_authors_encoder():
    fx = _load("atlas")
    base = {k: torch.tensor(v) for k, v in zip(fx["names"], fx["base"])}
    fts = [{k: base[k] + torch.tensor(p) for k, p in zip(fx["names"], tv)} for tv in fx["task_vectors"]]
    stack = TaskVectorStack(base, fts, _atlas_net())
    assert stack.keys == fx["names"]
    coef = torch.tensor(fx["coef"])
    blockwise, taskwise = stack.params(coef), stack.params(coef[:, :1])
    assert all(_close(blockwise[k], ref) for k, ref in zip(fx["names"], fx["blockwise"]))
    assert all(_close(taskwise[k], ref) for k, ref in zip(fx["names"], fx["taskwise"]))


def test_atlas_merged_weight_is_base_plus_block_scaled_task_vectors_by_hand():
    base = {"weight": torch.tensor([[1.0, 2.0]]), "bias": torch.tensor([0.5])}
    fts = [{"weight": torch.tensor([[2.0, 2.0]]), "bias": torch.tensor([2.5])},    # τ_1 = ([1, 0], 2)
           {"weight": torch.tensor([[1.0, 1.0]]), "bias": torch.tensor([-0.5])}]   # τ_2 = ([0, -1], -1)
    stack = TaskVectorStack(base, fts, nn.Linear(2, 1))
    merged = stack.params(torch.tensor([[0.5, 2.0], [1.0, -1.0]]))  # rows: tasks; columns: weight, bias
    assert torch.allclose(merged["weight"], torch.tensor([[1.5, 1.0]]))  # [1, 2] + 0.5·[1, 0] + 1·[0, -1]
    assert torch.allclose(merged["bias"], torch.tensor([5.5]))           # 0.5 + 2·2 + (−1)·(−1)

    torch.manual_seed(0)
    x = torch.randn(16, 2)
    y = (x[:, 0] > 0).long()
    model = nn.Linear(2, 2)
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    fts = [{k: v + torch.randn_like(v) for k, v in base.items()} for _ in range(2)]
    merger = MERGERS.create("atlas", steps=20, lr=0.05)
    out = merger.merge(base, fts, MergeData(model=model, batches=[[(x, y)]]))
    lam = merger.coefficients  # (tasks, blocks) in the order of merger.keys
    for b, k in enumerate(merger.keys):
        by_hand = base[k] + sum(lam[t, b] * (fts[t][k] - base[k]) for t in range(2))
        assert torch.allclose(out[k], by_hand, atol=1e-6)
    assert not torch.allclose(lam, torch.zeros(()))  # the coefficients left their init θ = θ_0


# --- AdaMerging: entropy objective, clamp in the forward ---------------------------------------------

def _adamerging_inputs(fx: dict) -> tuple[nn.Module, dict, list[dict], list[torch.Tensor]]:
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    base = {k: torch.tensor(v) for k, v in zip(fx["names"], fx["base"])}
    fts = [{k: torch.tensor(v) for k, v in zip(fx["names"], ft)} for ft in fx["finetuned"]]
    return model, base, fts, [torch.tensor(x) for x in fx["inputs"]]


def test_adamerging_matches_the_authors_loop():
    fx = _load("adamerging")
    model, base, fts, xs = _adamerging_inputs(fx)
    for granularity in ("layer", "task"):
        ref = fx[granularity]
        merger = MERGERS.create("adamerging", granularity=granularity, steps=fx["steps"], lr=fx["lr"])
        merged = merger.merge(base, fts, MergeData(model=model, batches=[[x] for x in xs]))
        assert _close(merger.coefficients, ref["coefficients"]), granularity
        assert _close(torch.tensor(merger.history), ref["history"]), granularity
        assert all(_close(merged[k], ref["merged"][i]) for i, k in enumerate(fx["names"])), granularity


def test_adamerging_objective_is_the_summed_mean_entropy_by_hand():
    # Zero weights: the logits are the bias, θ_0 + 0.3 τ_1 + 0.3 τ_2 = [ln 3, 0] at the init λ = 0.3,
    # so every prediction is (3/4, 1/4) with entropy H = −(¾ ln ¾ + ¼ ln ¼); two tasks give 2H.
    model = nn.Linear(3, 2)
    base = {"weight": torch.zeros(2, 3), "bias": torch.zeros(2)}
    fts = [{"weight": torch.zeros(2, 3), "bias": torch.tensor([math.log(3) / 0.6, 0.0])}] * 2
    xs = [[torch.randn(5, 3)], [torch.randn(7, 3)]]
    merger = MERGERS.create("adamerging", steps=1, lr=1e-3)
    merger.merge(base, fts, MergeData(model=model, batches=xs))
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert abs(merger.history[0] - 2 * h) < 1e-6


def test_adamerging_clamps_in_the_forward_not_the_parameter():
    # Logit of class 0: 3λx + 4λ − 2. Twenty batches x = +1 (entropy falls as λ grows) drive the raw
    # λ past 1; twenty batches x = −1 (entropy falls as λ shrinks) follow. With the clamp in the
    # forward (the authors' ``lambdas()``) the raw λ sits above 1 where the gradient is zero, so the
    # effective λ stays 1; a projection after each step (clamp_ on the parameter) would end near 0.8.
    model = nn.Linear(1, 2)
    base = {"weight": torch.zeros(2, 1), "bias": torch.tensor([-2.0, 0.0])}
    ft = {"weight": torch.tensor([[3.0], [0.0]]), "bias": torch.tensor([2.0, 0.0])}
    batches = [torch.ones(4, 1)] * 20 + [-torch.ones(4, 1)] * 20
    merger = MERGERS.create("adamerging", granularity="task", steps=40, lr=0.1)
    merged = merger.merge(base, [ft], MergeData(model=model, batches=[batches]))
    assert torch.equal(merger.coefficients, torch.ones(1, 1))
    assert torch.allclose(merged["bias"], torch.tensor([2.0, 0.0])) and torch.allclose(merged["weight"], ft["weight"])


# --- Twin-Merging: shared / exclusive split and the router's combination -----------------------------

def test_twin_merging_split_and_combination_match_the_authors_code():
    fx = _load("twin_merging")
    names = fx["names"]
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 5))
    base = {k: torch.tensor(fx["base"][k], dtype=torch.float32) for k in names}
    fts = [{k: torch.tensor(ft[k], dtype=torch.float32) for k in names} for ft in fx["finetuned"]]
    batches = [[torch.randn(4, 5)] for _ in fts]
    merged = MERGERS.create("twin-merging", shared="task-arithmetic", shared_options={"lam": fx["scaling"]},
                            rank=fx["rank"], steps=1).merge(base, fts, MergeData(model=model, batches=batches))
    for k in names:
        assert _close(merged.shared[k], fx["shared"][k]), k
        for t, ref in enumerate(fx["exclusive"]):
            assert _close(merged.exclusive[k][t], ref[k]), (k, t)
    for logits, ref in zip(fx["router_logits"], fx["combined"]):
        params = merged.params_for(F.softmax(torch.tensor(logits), 0))
        assert all(_close(params[k], ref[k]) for k in names)
