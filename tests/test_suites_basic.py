import torch

from polytask import SUITES
import polytask.data  # noqa: F401


def test_synthetic_mmoe_correlation_follows_cosine():
    corr = []
    for p in (0.0, 0.5, 0.9, 1.0):
        s = SUITES.create("synthetic-mmoe", correlation=p, num_samples=4000, seed=3)
        corr.append(torch.corrcoef(torch.stack([s.train.y["task1"], s.train.y["task2"]]))[0, 1].item())
    assert corr == sorted(corr)
    assert corr[-1] > 0.98 and corr[0] < 0.3


def test_synthetic_mmoe_is_seeded():
    a = SUITES.create("synthetic-mmoe", seed=1, num_samples=100)
    b = SUITES.create("synthetic-mmoe", seed=1, num_samples=100)
    c = SUITES.create("synthetic-mmoe", seed=2, num_samples=100)
    assert torch.equal(a.train.x, b.train.x) and not torch.equal(a.train.x, c.train.x)


def test_digits_multi_labels_are_consistent():
    s = SUITES.create("digits-multi")
    assert s.task_names == ["digit", "parity", "large", "ink"]
    for split in (s.train, s.val, s.test):
        d = split.y["digit"]
        assert torch.equal(split.y["parity"], (d % 2).float())
        assert torch.equal(split.y["large"], (d >= 5).float())
    assert len(s.train) + len(s.val) + len(s.test) == 1797
