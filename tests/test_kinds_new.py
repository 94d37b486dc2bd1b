"""The token, seq2seq and ranking kinds: losses, metrics and masking computed by hand on tiny cases."""

from __future__ import annotations

import math

import pytest
import torch
from sklearn.metrics import roc_auc_score

from polytask.errors import PolytaskError
from polytask.kinds import IGNORE, group_auc
from polytask.metrics import masked_task_losses
from polytask.tasks import Batch, Task, TaskSuite


def metrics(task, out, y):
    m = task.make_metrics()
    m.update(task.predict(out), task.kind_impl.metric_target(y))
    return {k: float(v) for k, v in m.compute().items()}


def test_token_loss_is_each_samples_mean_over_its_labelled_tokens():
    task = Task("tag", "token", num_classes=3)
    out = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]],
                                  [[0.25, 0.5, 0.25], [1 / 3, 1 / 3, 1 / 3], [0.9, 0.05, 0.05]]]))
    y = torch.tensor([[0, 1, IGNORE], [IGNORE, IGNORE, 0]])
    expected = torch.tensor([-(math.log(0.5) + math.log(0.8)) / 2, -math.log(0.9)])
    torch.testing.assert_close(task.loss(out, y), expected)
    torch.testing.assert_close(task.loss(out, torch.full((2, 3), IGNORE)), torch.zeros(2))  # nothing labelled
    # accuracy over real tokens only: predictions 0, 1 | 0 against labels 0, 1 | 0 -> 3/3, then one wrong
    assert metrics(task, out, y)["accuracy"] == 1.0
    assert metrics(task, out, torch.tensor([[0, 2, IGNORE], [IGNORE, IGNORE, 0]]))["accuracy"] == pytest.approx(2 / 3)


def test_token_labels_missing_per_sample_and_per_token():
    task = Task("tag", "token", num_classes=3)
    out = torch.randn(3, 4, 3)
    y = torch.tensor([[0, 1, IGNORE, IGNORE], [2, 2, 2, IGNORE], [1, IGNORE, IGNORE, IGNORE]])
    mask = torch.tensor([True, False, True])  # sample 1 lacks the task altogether
    batch = Batch(torch.zeros(3, 1), {"tag": y}, {"tag": mask})
    per_sample = task.loss(out, y)
    torch.testing.assert_close(masked_task_losses([task], {"tag": out}, batch)[0], (per_sample[0] + per_sample[2]) / 2)
    labels, n = task.kind_impl.labels(torch.tensor([[0, 4, IGNORE], [7, 7, 7]]), torch.tensor([True, False]))
    assert n == 5 and labels.dtype == torch.long  # classes from the labelled rows, -100 ignored
    with pytest.raises(PolytaskError, match=r"outputs \[B, L, C\]"):
        task.loss(torch.randn(3, 3), y)


def test_seq2seq_loss_and_exact_match_token_accuracy_bleu_rouge_by_hand():
    task = Task("gen", "seq2seq", num_classes=8, metrics=("exact_match", "token_accuracy", "bleu", "rouge_l"))
    target = torch.tensor([[1, 2, 3, 4, 6], [5, 5, IGNORE, IGNORE, IGNORE]])
    pred = torch.tensor([[1, 2, 3, 4, 5, 0], [5, 5, 7, 7, 7, 7]])  # outputs may run longer than the targets
    out = torch.nn.functional.one_hot(pred, 8).float() * 4.0
    p_hit, p_miss = math.exp(4) / (math.exp(4) + 7), 1 / (math.exp(4) + 7)
    torch.testing.assert_close(task.loss(out, target), torch.tensor([-(4 * math.log(p_hit) + math.log(p_miss)) / 5,
                                                                     -math.log(p_hit)]))
    r = metrics(task, out, target)
    assert r["exact_match"] == 0.5 and r["token_accuracy"] == pytest.approx(6 / 7)
    # corpus BLEU-4: clipped n-gram matches 6/7, 4/5, 2/3, 1/2 (sample 2 has no 3- or 4-grams), brevity 1
    assert r["bleu"] == pytest.approx((6 / 7 * 4 / 5 * 2 / 3 * 1 / 2) ** 0.25, abs=1e-5)
    # ROUGE-L F per sample (LCS 4 of 5, then 2 of 2), averaged
    assert r["rouge_l"] == pytest.approx((0.8 + 1.0) / 2, abs=1e-5)


def test_group_auc_is_the_impression_weighted_mean_of_per_group_aucs():
    scores = torch.tensor([2.0, 1.0, 0.5, 0.2, 0.1, 3.0, 0.4, 0.4])
    labels = torch.tensor([1.0, 0, 0, 1, 0, 1, 1, 0])
    groups = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3])  # group 2 has no negative: left out; group 3 is a tie
    assert float(group_auc(scores, labels, groups)) == pytest.approx((2 * 1.0 + 3 * 0.5 + 2 * 0.5) / 7)
    g = torch.Generator().manual_seed(0)
    s, y, grp = torch.randn(300, generator=g), torch.randint(0, 2, (300,), generator=g), torch.randint(0, 20, (300,), generator=g)
    s[::7] = 0.0  # ties
    num = den = 0.0
    for k in range(20):
        sel = grp == k
        if 0 < int(y[sel].sum()) < int(sel.sum()):
            num += int(sel.sum()) * roc_auc_score(y[sel].numpy(), s[sel].numpy())
            den += int(sel.sum())
    assert float(group_auc(s, y.float(), grp)) == pytest.approx(num / den, abs=1e-9)
    assert math.isnan(float(group_auc(s[:2], torch.ones(2), grp[:2])))


def test_ranking_loss_ndcg_logloss_by_hand():
    task = Task("rank", "ranking", metrics=("gauc", "ndcg@5", "logloss", "auroc"))
    logits = torch.tensor([[2.0], [0.0], [-1.0], [1.0], [0.5]])
    y = torch.tensor([[1.0, 0], [0.0, 0], [1.0, 0], [0.0, 1], [1.0, 1]])  # (relevance, group)
    p = torch.sigmoid(logits.reshape(-1))
    bce = -(y[:, 0] * p.log() + (1 - y[:, 0]) * (1 - p).log())
    torch.testing.assert_close(task.loss(logits, y), bce)
    r = metrics(task, logits, y)
    assert r["logloss"] == pytest.approx(float(bce.mean()), abs=1e-6)
    # group 0 ranks (rel 1, 0, 1): DCG 1 + 1/log2(4) against the ideal 1 + 1/log2(3); group 1 ranks (0, 1)
    ndcg0 = (1 + 1 / math.log2(4)) / (1 + 1 / math.log2(3))
    assert r["ndcg@5"] == pytest.approx((ndcg0 + 1 / math.log2(3)) / 2, abs=1e-6)
    assert r["gauc"] == pytest.approx((3 * 0.5 + 2 * 0.0) / 5)
    assert r["auroc"] == pytest.approx(roc_auc_score(y[:, 0].numpy(), p.numpy()))
    assert Task.higher_is_better("gauc") and not Task.higher_is_better("logloss")


def test_ranking_labels_from_tensors_with_missing_rows():
    y = torch.tensor([[1.0, 0], [0.0, 0], [float("nan"), 1], [0.0, 1], [1.0, 2], [0.0, 2]] * 2)
    suite = TaskSuite.from_tensors(torch.randn(12, 3), {"rank": y}, {"rank": "ranking"}, val_fraction=0.25,
                                   test_fraction=0.25)
    data = suite.train
    assert suite.tasks[0].out_dim == 1 and data.y["rank"].shape == (len(data), 2)
    nan_rows = torch.isnan(y[:, 0])
    assert int((~torch.cat([suite.train.mask["rank"], suite.val.mask["rank"], suite.test.mask["rank"]])).sum()) == int(nan_rows.sum())
    with pytest.raises(PolytaskError, match="whole numbers"):
        Task("r", "ranking").kind_impl.labels(torch.tensor([[1.0, 0.5]]), torch.tensor([True]))
    with pytest.raises(PolytaskError, match=r"\[N, 2\]"):
        Task("r", "ranking").kind_impl.labels(torch.tensor([1.0]), torch.tensor([True]))


def test_synthetic_recsys_rank_groups_by_user_and_trains():
    from polytask import ARCHITECTURES, SUITES, TrainConfig, Trainer
    from polytask.trainer import evaluate_model

    suite = SUITES.create("synthetic-recsys-rank", num_samples=600, num_users=40, num_items=80, num_tasks=2, seed=0)
    plain = SUITES.create("synthetic-recsys", num_samples=600, num_users=40, num_items=80, num_tasks=2, seed=0)
    assert [t.kind for t in suite.tasks] == ["ranking", "ranking"]
    y = suite.train.y["click"]
    assert torch.equal(y[:, 0], plain.train.y["click"]) and torch.equal(y[:, 1], suite.train.x["fields"][:, 0].float())
    torch.manual_seed(0)
    model = ARCHITECTURES.create("shared-bottom", suite.tasks, suite.input_spec)
    Trainer(model, suite.tasks, "ew", TrainConfig(epochs=1, batch_size=128, progress=False)).fit(suite.train)
    r = evaluate_model(model, suite.tasks, suite.test)
    assert set(r["click"]) == {"gauc", "ndcg@10", "logloss", "auroc", "loss"}
    assert 0.0 <= r["click"]["gauc"] <= 1.0 and r["click"]["logloss"] == pytest.approx(r["click"]["loss"], rel=1e-4)
