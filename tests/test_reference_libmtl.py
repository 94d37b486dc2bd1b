"""Weighting methods, MMoE and CGC against LibMTL's own implementations, run on fixed tiny inputs.

tests/fixtures/libmtl.json was written by tests/fixtures/make_libmtl_fixtures.py, which imports
median-research-group/LibMTL's weighting classes unchanged and feeds them losses L_t = c_t + g_t . x
at x = 0 (loss c_t, gradient g_t). Each test gives polytask the same losses, gradients and random
draws and asks for the same output to 1e-5. Where polytask follows a different convention on
purpose (UW's factor 2, GradNorm's parametrisation, FairGrad's scaling), the test checks the stated
relation, as the module docstrings describe it. The MMoE and CGC cases load LibMTL's randomly
initialised weights into polytask's architectures and compare the outputs on a dense input.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from polytask import ARCHITECTURES, WEIGHTINGS
from polytask.tasks import InputSpec, Task
from polytask.weighting._common import gram
from polytask.weighting.aligned_mtl import alignment_matrix
from polytask.weighting.base import GradContext
from polytask.weighting.fairgrad import fairgrad_weights
from polytask.weighting.graddrop import graddrop_gradient
from polytask.weighting.gradvac import gradvac_coefficients
from polytask.weighting.imtl import imtl_g_weights
from polytask.weighting.pcgrad import pcgrad_coefficients

FX = json.loads((Path(__file__).parent / "fixtures" / "libmtl.json").read_text())
TOL = 1e-5


def _t(x) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


def _close(a: torch.Tensor, b) -> bool:
    b = torch.as_tensor(b, dtype=torch.float64)
    return a.shape == b.shape and float((a.double() - b).abs().max()) <= TOL


def _names(t: int) -> list[str]:
    return [f"t{i}" for i in range(t)]


class _Shared(nn.Module):
    """One shared parameter vector x = 0; the fixtures' losses are L_t = c_t + g_t . x."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.x = nn.Parameter(torch.zeros(dim, dtype=torch.float64))

    def shared_parameters(self) -> list[nn.Parameter]:
        return [self.x]

    def losses(self, c, g) -> torch.Tensor:
        return torch.stack([ci + gi @ self.x for ci, gi in zip(_t(c), _t(g))])


# --- loss weightings ---------------------------------------------------------------------------------

def test_ew_and_gls_losses_have_libmtls_gradients():
    for name, cases in (("ew", FX["ew"]), ("gls", FX["gls"])):
        for case in cases:
            losses = _t(case["losses"]).requires_grad_()
            total, reported = WEIGHTINGS.create(name, _names(len(losses))).objective(losses)
            total.backward()
            assert _close(losses.grad, case["loss_grad"]), name
            assert _close(reported, case["loss_grad"]), name   # polytask reports the weights it applied


def test_uw_is_twice_libmtls_objective_at_the_same_log_variance():
    for case in FX["uw"]:
        uw = WEIGHTINGS.create("uw", _names(len(case["s"])))
        with torch.no_grad():
            uw.log_vars.copy_(_t(case["s"]))
        uw.double()
        losses = _t(case["losses"]).requires_grad_()
        total, weights = uw.objective(losses)
        total.backward()
        assert abs(float(total.detach()) - 2 * case["loss"]) <= TOL
        assert _close(losses.grad, 2 * _t(case["loss_grad"]))
        assert _close(uw.log_vars.grad, 2 * _t(case["s_grad"]))
        assert _close(weights, 2 * _t(case["reported"]))


def test_dwa_weights_match_libmtl_epoch_by_epoch():
    fx = FX["dwa"]
    dwa = WEIGHTINGS.create("dwa", _names(3), temperature=fx["T"])
    for epoch, expected in enumerate(fx["weights"]):
        assert _close(dwa.current_weights(), expected), epoch
        dwa.end_epoch(epoch, torch.tensor(fx["epoch_losses"][epoch]))


def test_famo_weighted_loss_and_logit_updates_match_libmtl():
    fx = FX["famo"]
    famo = WEIGHTINGS.create("famo", _names(3), lr=fx["lr"], gamma=fx["gamma"]).double()
    for step in fx["steps"]:
        famo.has_prev.fill_(False)   # LibMTL updates on the same batch; drive the update explicitly
        before = _t(step["before"]).requires_grad_()
        total, _ = famo.objective(before)
        total.backward()
        assert _close(before.grad, step["loss_grad"])
        famo.update_logits(_t(step["before"]), _t(step["after"]))
        assert _close(famo.logits, step["logits"])


def test_stch_warmup_and_scalarized_loss_match_libmtl_given_its_nadir_point():
    for case in FX["stch"]:
        t = len(case["losses"])
        stch = WEIGHTINGS.create("stch", _names(t), mu=case["mu"], warmup_epochs=1, reference="warmup").double()
        if not case["warmup"]:   # the warm-up is over and its mean losses are LibMTL's nadir vector
            stch.end_epoch(0, _t(case["nadir"]))
        losses = _t(case["losses"]).requires_grad_()
        total, _ = stch.objective(losses)
        total.backward()
        assert _close(losses.grad, case["loss_grad"]), case


# --- gradient weightings: polytask's solver on LibMTL's gradients --------------------------------------

def test_pcgrad_matches_libmtl_given_its_shuffles():
    for case in FX["pcgrad"]:
        g = _t(case["grads"])
        w = pcgrad_coefficients(gram(g), case["orders"]).sum(0)
        assert _close(w @ g, case["shared_grad"])


def test_gradvac_matches_libmtl_over_steps_with_its_shuffles():
    fx = FX["gradvac"]
    targets = torch.zeros(3, 3, dtype=torch.float64)
    for step in fx["steps"]:
        g = _t(step["grads"])
        w = gradvac_coefficients(gram(g), targets, step["orders"], fx["beta"]).sum(0)
        assert _close(w @ g, step["shared_grad"])


def test_graddrop_matches_libmtl_given_its_uniform_draw():
    for case in FX["graddrop"]:
        combined = graddrop_gradient(_t(case["per_task"]), _t(case["rep"]), _t(case["uniform"]), case["leak"])
        assert _close(combined, case["rep_grad"]), case["leak"]


def test_imtl_matches_libmtl_weights_scaled_gradient_and_loss_scale_gradient():
    for case in FX["imtl"]:
        s = _t(case["s"])
        scaled = torch.exp(s)[:, None] * _t(case["grads"])   # gradient of e^s L - s
        alpha = imtl_g_weights(gram(scaled))
        assert _close(alpha, case["alpha"])
        assert _close(alpha @ scaled, case["shared_grad"])
        assert _close(torch.exp(s) * _t(case["losses"]) - 1.0, case["s_grad"])   # polytask's d/ds


def test_aligned_mtl_matches_libmtl_including_a_rank_deficient_case():
    for case in FX["aligned_mtl"]:
        g = _t(case["grads"])
        alpha = alignment_matrix(gram(g)).sum(0)
        assert _close(alpha, case["alpha"])
        assert _close(alpha @ g, case["shared_grad"])


def test_fairgrad_weights_match_libmtl():
    for case in FX["fairgrad"]:
        w = torch.from_numpy(fairgrad_weights(gram(_t(case["grads"])).numpy(), case["alpha"]))
        assert _close(w, case["weights"]), case["alpha"]


# --- whole weightings on a one-parameter model ----------------------------------------------------------

def test_db_mtl_matches_libmtl_over_steps():
    fx = FX["db_mtl"]
    model = _Shared(len(fx["steps"][0]["grads"][0]))
    db = WEIGHTINGS.create("db-mtl", _names(3), beta=fx["beta"], beta_sigma=fx["beta_sigma"])
    for step in fx["steps"]:
        model.x.grad = None
        db.backward(model.losses(step["losses"], step["grads"]), GradContext(model, "params"))
        assert _close(model.x.grad, step["shared_grad"])


def test_gradnorm_matches_libmtl_through_its_softmax_parametrisation():
    for case in FX["gradnorm"]:
        t = len(case["losses"])
        model = _Shared(len(case["grads"][0]))
        gn = WEIGHTINGS.create("gradnorm", _names(t), alpha=case["alpha"]).double()
        with torch.no_grad():
            gn.weights.copy_(_t(case["weights"]))
        gn.initial_losses.copy_(_t(case["initial_losses"]))
        gn.started.fill_(True)
        gn.backward(model.losses(case["losses"], case["grads"]), GradContext(model, "params"))
        assert _close(model.x.grad, case["shared_grad"])
        # LibMTL's w = T softmax(p): its dL_grad/dp is the softmax Jacobian applied to polytask's dL_grad/dw
        z = torch.softmax(_t(case["logits"]), 0)
        jac = t * (torch.diag(z) - z[:, None] * z[None, :])
        assert _close(jac @ gn.weights.grad, case["logits_grad"])


# --- architectures: LibMTL's MMoE / CGC weights loaded into polytask's -------------------------------

def _arch(name: str, **options):
    tasks = [Task("t0", "regression"), Task("t1", "regression")]
    return ARCHITECTURES.create(name, tasks, InputSpec("dense", dim=5), expert=(4,), tower=(), **options).double()


def _check_outputs(model: nn.Module, fx: dict) -> None:
    model.eval()
    with torch.no_grad():
        out = model(_t(fx["x"]))
    for task, ref in fx["outputs"].items():
        assert _close(out[task], ref), task


def _head(sd: dict, task: str) -> dict:
    return {f"heads.{task}.0.{p}": sd[f"decoders.{task}.{p}"] for p in ("weight", "bias")}


def test_mmoe_matches_libmtl_with_its_weights():
    fx = FX["mmoe"]
    sd = {k: _t(v) for k, v in fx["state_dict"].items()}
    model = _arch("mmoe", num_experts=fx["num_experts"][0])
    mapped = {k.replace("experts_shared.", "experts."): v for k, v in sd.items() if k.startswith("experts_shared.")}
    for i, task in enumerate(("t0", "t1")):
        mapped[f"gates.{i}.weight"] = sd[f"gate_specific.{task}.0.weight"]
        mapped[f"gates.{i}.bias"] = sd[f"gate_specific.{task}.0.bias"]
        mapped.update(_head(sd, task))
    model.load_state_dict(mapped)
    _check_outputs(model, fx)


def test_cgc_matches_libmtl_up_to_the_order_of_its_gate_outputs():
    fx = FX["cgc"]
    sd = {k: _t(v) for k, v in fx["state_dict"].items()}
    shared, per_task = fx["num_experts"][0], fx["num_experts"][1]
    model = _arch("cgc", num_shared_experts=shared, num_task_experts=per_task)
    order = list(range(shared, shared + per_task)) + list(range(shared))   # LibMTL [shared, task], Eq. 2 [task, shared]
    mapped = {}
    for k, v in sd.items():
        if k.startswith("experts_shared."):
            mapped[k.replace("experts_shared.", "levels.0.shared.")] = v
        elif k.startswith("experts_specific."):
            mapped[k.replace("experts_specific.", "levels.0.task.")] = v
    for task in ("t0", "t1"):
        mapped[f"levels.0.gates.{task}.weight"] = sd[f"gate_specific.{task}.0.weight"][order]
        mapped[f"levels.0.gates.{task}.bias"] = sd[f"gate_specific.{task}.0.bias"][order]
        mapped.update(_head(sd, task))
    model.load_state_dict(mapped)
    _check_outputs(model, fx)
