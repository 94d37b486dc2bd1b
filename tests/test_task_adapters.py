"""Task-specific parts inside a shared transformer: per-task LoRA adapters and per-task prompt tokens."""

from __future__ import annotations

import pytest
import torch

import polytask.models.arch  # noqa: F401
from polytask import TrainConfig, Trainer
from polytask.errors import PolytaskError
from polytask.registry import ARCHITECTURES
from polytask.tasks import InputSpec, MultiTaskData, Task
from hf_helpers import tiny_bert, token_inputs

pytest.importorskip("peft")
SPEC = InputSpec("tokens", seq_len=8)
TASKS = [Task("a", "binary"), Task("b", "multiclass", num_classes=3)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_bert(tmp_path_factory.mktemp("hf") / "bert")


def build(name, tiny, tasks=TASKS, **opts):
    torch.manual_seed(0)
    return ARCHITECTURES.create(name, tasks, SPEC, backbone="hf", backbone_options={"path": str(tiny)}, **opts)


def names(model, params):
    ids = {id(p) for p in params}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def losses(model, x):
    out = model(x)
    y = torch.tensor([0.0, 1.0, 1.0, 0.0]), torch.tensor([0, 2, 1, 1])
    return TASKS[0].loss(out["a"], y[0]).mean(), TASKS[1].loss(out["b"], y[1]).mean()


@pytest.mark.parametrize("name", ["task-lora", "task-prompt"])
def test_each_tasks_own_part_gets_gradient_from_its_own_loss_only(name, tiny):
    model = build(name, tiny, **({"lora_init": False} if name == "task-lora" else {}))
    x = token_inputs(4, 8)
    for i, (task, other) in enumerate([("a", "b"), ("b", "a")]):
        model.zero_grad(set_to_none=True)
        losses(model, x)[i].backward()
        own, theirs = names(model, model.task_parameters(task)), names(model, model.task_parameters(other))
        grads = {n: p.grad for n, p in model.named_parameters()}
        assert own and all(grads[n] is not None and grads[n].abs().sum() > 0 for n in own)
        assert theirs and all(grads[n] is None or not grads[n].any() for n in theirs)


def test_task_lora_parameter_sets(tiny):
    frozen = build("task-lora", tiny, r=4)
    assert frozen.shared_parameters() == []  # base frozen: nothing shared is trained
    a = names(frozen, frozen.task_parameters("a"))
    assert {n for n in a if not n.startswith("heads.")} == {
        f"backbone.encoder.base_model.model.encoder.layer.{i}.attention.self.{m}.lora_{ab}.a.weight"
        for i in range(2) for m in ("query", "value") for ab in "AB"}
    assert sum(p.numel() for p in frozen.task_parameters("b")) == 2 * 2 * 4 * 64 + (32 * 3 + 3)  # adapter + head
    assert {n for n, p in frozen.named_parameters() if p.requires_grad} == a | names(frozen, frozen.task_parameters("b"))
    full = build("task-lora", tiny, r=4, shared="full")
    shared = names(full, full.shared_parameters())
    assert shared and not any("lora_" in n or n.startswith("heads.") for n in shared)
    assert "backbone.encoder.base_model.model.embeddings.word_embeddings.weight" in shared
    assert not any("pooler" in n for n, _ in full.named_parameters())  # unused, dropped


def test_task_prompt_parameter_sets_and_output_length(tiny):
    model = build("task-prompt", tiny, num_prompts=3)
    assert model.shared_parameters() == []
    assert names(model, model.task_parameters("a")) == {"prompts.a", "heads.a.0.weight", "heads.a.0.bias"}
    assert model.prompts["a"].shape == (3, 32)
    token = Task("tag", "token", num_classes=4)
    mixed = build("task-prompt", tiny, tasks=[TASKS[0], token], num_prompts=3)
    out = mixed(token_inputs(4, 8))
    assert out["a"].shape == (4, 1) and out["tag"].shape == (4, 8, 4)  # prompt positions are not outputs
    with torch.no_grad():
        mixed.prompts["tag"].add_(1.0)
    assert torch.equal(mixed(token_inputs(4, 8))["a"], out["a"])  # another task's prompt changes nothing here
    with pytest.raises(PolytaskError, match="num_prompts"):
        build("task-prompt", tiny, num_prompts=60)


def task_states(model, task, x):
    ids, mask = model.backbone.tokens(x)
    return model.task_states(task, model.backbone.net.get_input_embeddings()(ids), mask)


@pytest.mark.parametrize("shared", ["frozen", "full"])
def test_saved_adapters_reload_with_peft_to_identical_outputs(tiny, tmp_path, shared):
    from peft import PeftModel
    from transformers import AutoModel

    model = build("task-lora", tiny, shared=shared, lora_init=False)
    x = token_inputs(4, 8)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    sum(losses(model, x)).backward()
    opt.step()  # the base moves too with shared="full"
    model.eval()
    folder = model.save_adapters(tmp_path / "adapters")
    base_dir = folder / "base" if shared == "full" else tiny
    assert (folder / "base").is_dir() == (shared == "full")
    for task in ("a", "b"):
        assert (folder / task / "adapter_model.safetensors").is_file()
        peft_model = PeftModel.from_pretrained(AutoModel.from_pretrained(str(base_dir)), str(folder / task)).eval()
        with torch.no_grad():
            theirs = peft_model(**x).last_hidden_state
            ours = task_states(model, task, x)
        n = int(x["attention_mask"].sum(1).max())
        torch.testing.assert_close(ours, theirs[:, :n], atol=1e-5, rtol=1e-5)


def test_task_vector_is_the_dense_lora_update(tiny):
    from transformers import AutoModel

    model = build("task-lora", tiny, lora_init=False, r=2, alpha=4.0).eval()
    tau = model.task_vector("b")
    assert sorted(tau) == sorted(f"encoder.layer.{i}.attention.self.{m}.weight" for i in range(2)
                                 for m in ("query", "value"))
    plain = AutoModel.from_pretrained(str(tiny)).eval()
    state = plain.state_dict()
    plain.load_state_dict({k: v + tau[k] if k in tau else v for k, v in state.items()})  # θ_0 + τ_b
    x = token_inputs(4, 8)
    n = int(x["attention_mask"].sum(1).max())
    with torch.no_grad():
        torch.testing.assert_close(task_states(model, "b", x), plain(**x).last_hidden_state[:, :n], atol=1e-5, rtol=1e-5)


def test_pcgrad_trains_task_lora_with_shared_weights(tiny):
    model = build("task-lora", tiny, shared="full")
    g = torch.Generator().manual_seed(0)
    x = token_inputs(16, 8, seed=1)
    data = MultiTaskData(x, {"a": torch.randint(0, 2, (16,), generator=g).float(),
                             "b": torch.randint(0, 3, (16,), generator=g)})
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    Trainer(model, TASKS, "pcgrad", TrainConfig(epochs=1, batch_size=8, progress=False)).fit(data)
    moved = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert any("lora_B.a" in n for n in moved) and any("lora_B.b" in n for n in moved)
    assert any(n.endswith("query.base_layer.weight") for n in moved)


def test_refuses_a_backbone_it_cannot_adapt(tiny):
    with pytest.raises(PolytaskError, match="sets the backbone's finetune"):
        ARCHITECTURES.create("task-lora", TASKS, SPEC, backbone="hf", backbone_options={"path": str(tiny),
                                                                                          "finetune": "lora"})
    with pytest.raises(PolytaskError, match="needs a trainable Hugging Face backbone"):
        ARCHITECTURES.create("task-prompt", TASKS, InputSpec("dense", dim=4))
