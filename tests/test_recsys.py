"""The synthetic-recsys suite: shapes, seeding, positive rates, partial conversion labels,
the correlation knob and learnability."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from polytask import SUITES, PolytaskError
from polytask.data.synthetic_recsys import calibrate_bias
import polytask.data  # noqa: F401


@pytest.fixture(scope="module")
def suite():
    return SUITES.create("synthetic-recsys")


def test_shapes_and_spec(suite):
    spec = suite.input_spec
    assert suite.task_names == ["click", "long_view", "like", "follow", "share", "conversion"]
    assert [len(s) for s in (suite.train, suite.val, suite.test)] == [14000, 3000, 3000]
    x = suite.train.x
    assert x["fields"].dtype == torch.long and x["fields"].shape == (14000, len(spec.field_vocab))
    assert x["seqs"].shape == (14000, len(spec.seq_names), spec.seq_len) and x["seqs"].dtype == torch.long
    assert x["dense"].shape == (14000, spec.dense_dim) and x["dense"].dtype == torch.float32
    for j, vocab in enumerate(spec.field_vocab):  # every id fits its embedding table
        assert 0 <= int(x["fields"][:, j].min()) and int(x["fields"][:, j].max()) < vocab
    assert int(x["seqs"].max()) < spec.item_vocab and int(x["seqs"].min()) == 0
    # padding only at the end of a sequence: once 0, always 0
    pad = x["seqs"] == 0
    assert torch.equal(pad, pad.cummax(-1).values)
    assert "synthetic recommender log" in suite.description


def test_seeded():
    small = {"num_samples": 2000, "num_users": 300, "num_items": 500}
    a = SUITES.create("synthetic-recsys", seed=1, **small)
    b = SUITES.create("synthetic-recsys", seed=1, **small)
    c = SUITES.create("synthetic-recsys", seed=2, **small)
    for k in ("fields", "seqs", "dense"):
        assert torch.equal(a.train.x[k], b.train.x[k]) and torch.equal(a.test.x[k], b.test.x[k])
        assert not torch.equal(a.train.x[k], c.train.x[k])
    for t in a.task_names:
        assert torch.equal(a.train.y[t], b.train.y[t]) and torch.equal(a.train.mask[t], b.train.mask[t])


def test_positive_rates_and_conversion_mask(suite):
    y = {t: torch.cat([s.y[t] for s in (suite.train, suite.val, suite.test)]) for t in suite.task_names}
    m = {t: torch.cat([s.mask[t] for s in (suite.train, suite.val, suite.test)]) for t in suite.task_names}
    ranges = {"click": (0.27, 0.33), "long_view": (0.17, 0.23), "like": (0.04, 0.06), "follow": (0.01, 0.02),
              "share": (0.014, 0.026)}
    for t, (lo, hi) in ranges.items():
        assert bool(m[t].all()) and lo <= float(y[t].mean()) <= hi, t
    assert 0.035 <= float(y["conversion"][m["conversion"]].mean()) <= 0.065
    for split in (suite.train, suite.val, suite.test):
        assert torch.equal(split.mask["conversion"], split.y["click"].bool())
        assert float(split.y["conversion"][~split.mask["conversion"]].abs().sum()) == 0.0


def test_sparsity_knob_moves_rare_rates():
    dense = SUITES.create("synthetic-recsys", sparsity=0.0, num_samples=4000, num_tasks=5, num_users=300,
                          num_items=500)
    assert dense.task_names == ["click", "long_view", "like", "follow", "share"]
    for t in dense.task_names:  # sparsity 0: every rate is click's 0.3
        assert 0.26 <= float(dense.train.y[t].mean()) <= 0.34, t


def label_correlation(s) -> float:
    names = ["click", "long_view", "like", "follow", "share"]
    c = torch.corrcoef(torch.stack([s.train.y[t] for t in names]))
    return float((c.sum() - len(names)) / (len(names) * (len(names) - 1)))


def test_correlation_knob_is_monotone():
    corr = [label_correlation(SUITES.create("synthetic-recsys", correlation=p, seed=3)) for p in (0.0, 0.5, 1.0)]
    assert corr == sorted(corr)
    assert corr[2] - corr[0] > 0.1 and abs(corr[0]) < 0.05


def _category_overlap(suite, data) -> torch.Tensor:
    """[N, S]: share of each behaviour sequence's items in the impressed item's category."""
    cat = torch.full((suite.input_spec.item_vocab,), -1)
    for split in (suite.train, suite.val, suite.test):
        cat[split.x["fields"][:, 3]] = split.x["fields"][:, 4]
    valid = data.x["seqs"] > 0
    same = (cat[data.x["seqs"]] == data.x["fields"][:, 4, None, None]) & valid
    return same.sum(-1) / valid.sum(-1).clamp(min=1)


def test_behaviour_sequences_carry_signal(suite):
    overlap = _category_overlap(suite, suite.train)
    for t in ("click", "long_view", "like", "share"):
        best = max(roc_auc_score(suite.train.y[t].numpy(), overlap[:, b].numpy()) for b in range(3))
        assert best > 0.53, (t, best)


def _features(suite, data) -> sp.csr_matrix:
    """A logistic model's view: one-hot fields, dense features, sequence/item category overlap."""
    f = data.x["fields"].numpy()
    n = len(f)
    rows = np.arange(n)
    blocks = [sp.csr_matrix((np.ones(n), (rows, f[:, j])), shape=(n, v))
              for j, v in enumerate(suite.input_spec.field_vocab)]
    blocks.append(sp.csr_matrix(torch.cat([data.x["dense"], _category_overlap(suite, data)], 1).numpy()))
    return sp.hstack(blocks).tocsr()


def test_every_task_is_learnable_by_a_logistic_model(suite):
    train, test = _features(suite, suite.train), _features(suite, suite.test)
    for t in suite.task_names:
        m, mt = suite.train.mask[t].numpy(), suite.test.mask[t].numpy()
        model = LogisticRegression(C=0.1, solver="liblinear").fit(train[m], suite.train.y[t].numpy()[m])
        auc = roc_auc_score(suite.test.y[t].numpy()[mt], model.predict_proba(test[mt])[:, 1])
        assert auc > 0.65, (t, auc)


def test_calibrate_bias_hits_the_rate():
    z = torch.randn(10000, generator=torch.Generator().manual_seed(0))
    b = calibrate_bias(z, 0.02)
    assert abs(float(torch.sigmoid(z + b).mean()) - 0.02) < 1e-4


@pytest.mark.parametrize("opts", [{"correlation": 1.5}, {"num_tasks": 0}, {"num_tasks": 7}, {"sparsity": -1.0}])
def test_bad_options(opts):
    with pytest.raises(PolytaskError):
        SUITES.create("synthetic-recsys", num_samples=200, num_users=50, num_items=50, **opts)
