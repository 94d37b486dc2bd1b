"""DTRN: hypernetwork conditioning, gradient ownership, recsys-only inputs.

The checks every architecture shares (shapes, ownership, rep mode, diagnostics shapes) are in
test_arch_contract.py.
"""

from __future__ import annotations

import pytest
import torch

from polytask import ARCHITECTURES, SUITES, PolytaskError, TrainConfig, Trainer
from polytask.tasks import InputSpec, Task
import polytask.data  # noqa: F401
import polytask.models.arch  # noqa: F401
from arch_helpers import abc_losses, grads_of, names_of, nonzero

TASKS = [Task("a", "binary"), Task("b", "multiclass", num_classes=3), Task("c", "regression")]
SPEC = InputSpec("recsys", field_vocab=(5, 7, 11), seq_names=("click", "like"), item_vocab=30, seq_len=6,
                 dense_dim=3)
B = 8


def inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    seqs = torch.randint(1, SPEC.item_vocab, (B, 2, SPEC.seq_len), generator=g)
    lengths = torch.randint(0, SPEC.seq_len + 1, (B, 2, 1), generator=g)
    seqs = torch.where(torch.arange(SPEC.seq_len) < lengths, seqs, torch.zeros_like(seqs))
    seqs[0, 1] = 0  # one fully padded sequence
    return {"fields": torch.stack([torch.randint(0, v, (B,), generator=g) for v in SPEC.field_vocab], 1),
            "seqs": seqs, "dense": torch.randn(B, SPEC.dense_dim, generator=g)}


def losses(out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return abc_losses(TASKS, out, B)


def build(**opts):
    torch.manual_seed(0)
    return ARCHITECTURES.create("dtrn", TASKS, SPEC, **opts)


@pytest.mark.parametrize("top", ["towers", "mmoe"])
def test_finite_and_every_parameter_learns(top):
    model = build(top=top)
    out = model(inputs())
    assert all(torch.isfinite(v).all() for v in out.values())  # a fully padded sequence is fine
    g = grads_of(model, sum(losses(out).values()))
    assert [n for n, v in g.items() if not nonzero(v) and "padding" not in n] == []
    if top == "mmoe":
        assert torch.allclose(model.last_gates["a"].sum(-1), torch.ones(B))


def test_hypernetwork_parameters_follow_the_task_embedding():
    model = build()
    params = model.conditional_parameters()  # [T, S, 4, E]
    assert params.shape == (3, 2, 4, model.embedding_dim)
    for i in range(3):
        for j in range(i + 1, 3):
            assert not torch.allclose(params[i], params[j])
    assert not torch.allclose(params[:, 0], params[:, 1])  # behaviour types differ too
    x = inputs()
    interest = model.interests(model.backbone.sequence_embeddings(x), x["seqs"] > 0)
    assert not torch.allclose(interest[:, 0], interest[:, 1])
    with torch.no_grad():  # same task embedding -> same generated parameters and interests
        model.task_embeddings["b"].weight.copy_(model.task_embeddings["a"].weight)
    params = model.conditional_parameters()
    assert torch.equal(params[0], params[1]) and not torch.allclose(params[0], params[2])
    interest = model.interests(model.backbone.sequence_embeddings(x), x["seqs"] > 0)
    assert torch.allclose(interest[:, 0], interest[:, 1])


def test_interest_ignores_padding_items():
    model = build()
    x = inputs()
    base = model(x)
    changed = {k: v.clone() for k, v in x.items()}
    # swap the embedding row of padding id 0: nothing may change
    with torch.no_grad():
        model.backbone.items.weight[0] = 5.0
    out = model(changed)
    for t in base:
        assert torch.allclose(base[t], out[t], atol=1e-5)


@pytest.mark.parametrize("top", ["towers", "mmoe"])
def test_task_owns_its_senet_and_embedding_and_shared_parts_learn_from_all(top):
    model = build(top=top)
    shared = [n for n in names_of(model, model.shared_parameters()) if n.startswith(("hypernet.", "encoder."))]
    assert any(n.startswith("hypernet.") for n in shared)
    for a in model.task_names:
        g = grads_of(model, losses(model(inputs()))[a])
        own = names_of(model, model.task_parameters(a))
        assert any(n.startswith("senets.") for n in own) and any(n.startswith("task_embeddings.") for n in own)
        assert all(nonzero(g[n]) for n in shared), a  # the hypernetwork and Transformer serve every task


def test_refinement_is_a_per_field_reweighting():
    model = build()
    x = inputs()
    reps = model.representations(x)
    n_fields = len(SPEC.field_vocab) + len(SPEC.seq_names) + 1
    e = model.embedding_dim
    assert reps["a"].shape == (B, n_fields * e)
    fields = model.backbone.field_embeddings(x)
    w = model.senets["a"](torch.cat([fields, model.interests(model.backbone.sequence_embeddings(x), x["seqs"] > 0)[:, 0],
                                     model.dense_proj(x["dense"])[:, None]], 1).mean(-1))
    assert torch.allclose(reps["a"].reshape(B, n_fields, e)[:, 0], w[:, :1] * fields[:, 0], atol=1e-6)


def test_recsys_only():
    with pytest.raises(PolytaskError, match="recsys"):
        ARCHITECTURES.create("dtrn", TASKS, InputSpec("dense", dim=4))
    with pytest.raises(PolytaskError):
        build(top="ple")


def test_trains_with_the_trainer_and_rep_mode():
    suite = SUITES.create("synthetic-recsys", num_samples=800, num_tasks=3, num_users=100, num_items=300)
    torch.manual_seed(0)
    model = ARCHITECTURES.create("dtrn", suite.tasks, suite.input_spec, top="mmoe")
    trainer = Trainer(model, suite.tasks, "pcgrad", TrainConfig(epochs=1, batch_size=256, progress=False),
                      weighting_options={"mode": "rep"})
    history = trainer.fit(suite.train)
    assert all(torch.isfinite(torch.tensor(v)) for k, v in history[0].items() if k.startswith("train/"))
    assert set(trainer.evaluate(suite.test)) == set(suite.task_names)
