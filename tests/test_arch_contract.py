"""The contract every registered architecture keeps with the Trainer and GradContext."""

from __future__ import annotations

import tempfile
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from polytask import ARCHITECTURES, SUITES, PolytaskError, TrainConfig, Trainer
from polytask.models.arch.base import Architecture
from polytask.models.arch.diagnostics import ExpertDiagnostics
from polytask.tasks import InputSpec, Task
from polytask.weighting.base import GradContext
import polytask.data  # noqa: F401
from arch_helpers import abc_losses, example_inputs, names_of, nonzero, open_feature_gates
from hf_helpers import tiny_bert

TASKS = [Task("a", "binary"), Task("b", "multiclass", num_classes=3), Task("c", "regression")]
DENSE = InputSpec("dense", dim=10)
RECSYS = InputSpec("recsys", field_vocab=(5, 7, 11), seq_names=("click", "like"), item_vocab=30, seq_len=6,
                   dense_dim=3)
B = 6
TOKENS = InputSpec("tokens", seq_len=8)
RECSYS_ONLY = {"dtrn"}
# per-task parts inside a transformer: a tiny BERT built from a config; trained shared weights and
# random LoRA B (peft's default B = 0 gives A no gradient at the start)
TINY = {"backbone": "hf", "backbone_options": {"path": str(tiny_bert(Path(tempfile.mkdtemp()) / "bert"))},
        "shared": "full"}
TOKENS_ONLY = {"task-lora": [{**TINY, "lora_init": False}], "task-prompt": [TINY]}
VARIANTS = {"dtrn": [{}, {"top": "mmoe"}], "taskexpert": [{}, {"num_layers": 3}], **TOKENS_ONLY}
EXPERT_ARCHS = {"cgc", "cross-stitch", "dtrn", "home", "mmoe", "ple", "taskexpert"}
# task-owned parameters that other tasks' losses reach by design: cross-stitch columns are
# mixed through the shared alpha units (only its heads are reached by their own task alone)
MIXED = {"cross-stitch": ("columns.",)}
# the cut leaves some shared parameters above it (DTRN's interest module reads the cut
# embeddings), so those get the task gradients directly, not through last_rep
PARTIAL_CUT = {"dtrn", *TOKENS_ONLY}


# text to text with every weight shared (no task-owned part): its contract is checked in test_suites_text_kinds.py
SEQ2SEQ_ONLY = {"seq2seq-lm"}


def _cases() -> list:
    cases = []
    for name in ARCHITECTURES.names():
        if name in SEQ2SEQ_ONLY:
            continue
        specs = [(TOKENS, "tokens")] if name in TOKENS_ONLY else (
            ([] if name in RECSYS_ONLY else [(DENSE, "dense")]) + [(RECSYS, "recsys")])
        for spec, kind in specs:
            for opts in VARIANTS.get(name, [{}]):
                label = "-".join([name, kind, *(f"{k}={v}" for k, v in opts.items() if k not in TINY)])
                cases.append(pytest.param(name, spec, opts, id=label))
    return cases


CASES = _cases()


def build(name: str, spec: InputSpec, opts: dict) -> Architecture:
    torch.manual_seed(0)
    return open_feature_gates(ARCHITECTURES.create(name, TASKS, spec, **opts))


def total(out: dict[str, Tensor]) -> Tensor:
    return sum(abc_losses(TASKS, out, B).values())


def stacked(out: dict[str, Tensor]) -> Tensor:
    losses = abc_losses(TASKS, out, B)
    return torch.stack([losses[t.name] for t in TASKS])


def flat(grads, params) -> Tensor:
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params)])


def test_every_expert_architecture_declares_the_diagnostics():
    assert {n for n in ARCHITECTURES.names() if issubclass(ARCHITECTURES.get(n), ExpertDiagnostics)} == EXPERT_ARCHS


@pytest.mark.parametrize(("name", "spec", "opts"), CASES)
def test_forward_gives_one_output_per_task(name, spec, opts):
    out = build(name, spec, opts)(example_inputs(spec, B))
    assert {k: tuple(v.shape) for k, v in out.items()} == {"a": (B, 1), "b": (B, 3), "c": (B, 1)}


@pytest.mark.parametrize(("name", "spec", "opts"), CASES)
def test_shared_and_task_specific_parameters_partition_the_trainable_ones(name, spec, opts):
    model = build(name, spec, opts)
    shared, specific = {id(p) for p in model.shared_parameters()}, {id(p) for p in model.task_specific_parameters()}
    assert not shared & specific
    assert shared | specific == {id(p) for p in model.parameters() if p.requires_grad}
    owned = [{id(p) for p in model.task_parameters(t)} for t in model.task_names]
    assert all(owned) and sum(map(len, owned)) == len(specific)  # every task owns a part; no part has two owners


@pytest.mark.parametrize(("name", "spec", "opts"), CASES)
def test_a_task_loss_reaches_its_own_parts_and_no_other_task_parts(name, spec, opts):
    model = build(name, spec, opts)
    x = example_inputs(spec, B)
    for a in model.task_names:
        model.zero_grad(set_to_none=True)
        abc_losses(TASKS, model(x), B)[a].backward()
        grad = {n: p.grad for n, p in model.named_parameters()}
        assert all(nonzero(grad[n]) for n in names_of(model, model.task_parameters(a))), a
        for b in model.task_names:
            if b != a:
                others = [n for n in names_of(model, model.task_parameters(b)) if not n.startswith(MIXED.get(name, ()))]
                assert others and not any(nonzero(grad[n]) for n in others), (a, b)


@pytest.mark.parametrize(("name", "spec", "opts"), CASES)
def test_representation_cut_reproduces_the_full_backward(name, spec, opts):
    model = build(name, spec, opts)
    x = example_inputs(spec, B)
    normal = model(x)
    model.zero_grad(set_to_none=True)
    total(normal).backward()
    full = {n: p.grad.clone() for n, p in model.named_parameters()}
    with model.representation_cut():
        rep = model(x)
    assert model.rep_leaf is not None and model.rep_leaf.is_leaf and model.rep_leaf.requires_grad
    assert model.last_rep is not None and model.last_rep.shape == model.rep_leaf.shape
    assert all(torch.allclose(normal[t], rep[t]) for t in normal)
    model.zero_grad(set_to_none=True)
    total(rep).backward()
    if name not in PARTIAL_CUT:  # the cut is complete: shared parameters are reached only through last_rep
        assert not any(p.grad is not None for p in model.shared_parameters())
    model.last_rep.backward(model.rep_leaf.grad)
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, full[n], atol=1e-6), n
    # the cut ends with the block: a forward outside it reaches the shared parameters directly
    direct = torch.autograd.grad(total(model(x)), model.shared_parameters(), allow_unused=True)
    assert any(nonzero(g) for g in direct)


@pytest.mark.parametrize(("name", "spec", "opts"), CASES)
def test_grad_context_rep_rows_reproduce_the_params_mode(name, spec, opts):
    model = build(name, spec, opts)
    x = example_inputs(spec, B)
    params = GradContext(model, "params")
    exact = params.task_grads(stacked(model(x)))
    assert exact.shape == (len(TASKS), params.shared_size)
    rep = GradContext(model, "rep")
    with model.representation_cut():
        losses = stacked(model(x))
    rows = rep.task_grads(losses)
    assert rows.shape == (len(TASKS), B * model.rep_leaf[0].numel())
    for t in range(len(TASKS)):  # pulled back through the cut (plus any path above it) = the exact row
        pulled = torch.autograd.grad(model.last_rep, rep.shared, rows[t].reshape(model.last_rep.shape),
                                     retain_graph=True, allow_unused=True)
        above = torch.autograd.grad(losses[t], rep.shared, retain_graph=True, allow_unused=True)
        torch.testing.assert_close(flat(pulled, rep.shared) + flat(above, rep.shared), exact[t], atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize(("name", "spec", "opts"), CASES)
@pytest.mark.parametrize("mode", ["params", "rep"])
def test_grad_context_update_matches_the_weighted_backward(name, spec, opts, mode):
    model = build(name, spec, opts)
    x = example_inputs(spec, B)
    w = torch.tensor([0.2, 1.0, 3.0])
    model.zero_grad(set_to_none=True)
    (w * stacked(model(x))).sum().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    ctx = GradContext(model, mode)
    with model.representation_cut() if mode == "rep" else nullcontext():
        losses = stacked(model(x))
    ctx.task_grads(losses)
    ctx.apply(losses, w)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[n], atol=1e-6, rtol=1e-4, msg=n)


@pytest.mark.parametrize(("name", "spec", "opts"), CASES)
def test_aux_loss_is_reset_each_forward_and_none_or_a_scalar(name, spec, opts):
    model = build(name, spec, opts)
    sentinel = torch.tensor(1.0)
    for train in (True, False):
        model.train(train)
        model.aux_loss = sentinel
        model(example_inputs(spec, B))
        aux = model.aux_loss
        assert aux is not sentinel
        assert aux is None or (aux.dim() == 0 and bool(torch.isfinite(aux)) and aux.requires_grad)


@pytest.mark.parametrize(("name", "spec", "opts"), [c for c in CASES if c.values[0] in EXPERT_ARCHS])
def test_expert_diagnostics_have_the_declared_shapes(name, spec, opts):
    model = build(name, spec, opts)
    model(example_inputs(spec, B))
    groups = model.expert_groups()
    assert set(groups) == {"shared", *model.task_names}
    experts = groups["shared"] + [i for t in model.task_names for i in groups[t]]
    assert set(model.last_gates) == (set(model.task_names) if experts else set())
    assert bool(model.last_expert_activations) == bool(experts)
    for t, g in model.last_gates.items():
        assert g.dim() == 2 and g.shape[0] == B and not g.requires_grad
        own = groups["shared"] + groups[t]
        assert len(set(own)) == len(own) and all(0 <= i < g.shape[1] for i in own)
    for act in model.last_expert_activations.values():
        assert act.dim() == 2 and act.shape[0] == B and not act.requires_grad


class PlainNet(nn.Module):
    """A plain module that returns {task: output}: no polytask contract."""

    def __init__(self, tasks) -> None:
        super().__init__()
        self.heads = nn.ModuleDict({t.name: nn.Linear(10, t.out_dim) for t in tasks})

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {name: head(x) for name, head in self.heads.items()}


@pytest.mark.parametrize(("weighting", "options"), [("pcgrad", {}), ("graddrop", {}), ("mgda", {"mode": "rep"})])
def test_trainer_refuses_a_plain_module_for_gradient_weightings_in_one_line(weighting, options):
    suite = SUITES.create("synthetic-mmoe", num_samples=100, dim=10, seed=0)
    with pytest.raises(PolytaskError, match=f"weighting '{weighting}' needs per-task gradients .* PlainNet is not "
                                            "a polytask Architecture") as err:
        Trainer(PlainNet(suite.tasks), suite.tasks, weighting, weighting_options=options)
    assert "\n" not in str(err.value) and "'ew'" in str(err.value)


def test_plain_modules_train_with_loss_only_weightings():
    suite = SUITES.create("synthetic-mmoe", num_samples=200, dim=10, seed=0)
    model = PlainNet(suite.tasks)
    before = [p.detach().clone() for p in model.parameters()]
    Trainer(model, suite.tasks, "ew", TrainConfig(epochs=1, batch_size=64, progress=False)).fit(suite.train)
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
