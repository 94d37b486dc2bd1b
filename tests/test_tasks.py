import numpy as np
import pandas as pd
import pytest
import torch

from polytask import InputSpec, MultiTaskData, PolytaskError, Task, TaskSuite
from polytask.metrics import delta_m, masked_task_losses


def test_masked_loss_ignores_missing_labels():
    task = Task("r", "regression")
    data = MultiTaskData(torch.zeros(4, 2), {"r": torch.tensor([1.0, 2.0, 100.0, 3.0])},
                         {"r": torch.tensor([True, True, False, True])})
    batch = next(data.batches(4))
    out = {"r": torch.zeros(4, 1)}
    loss = masked_task_losses([task], out, batch)
    assert loss.item() == pytest.approx((1 + 4 + 9) / 3)


def test_masked_loss_all_missing_is_zero_with_zero_grad():
    task = Task("b", "binary")
    data = MultiTaskData(torch.zeros(3, 2), {"b": torch.ones(3)}, {"b": torch.zeros(3, dtype=torch.bool)})
    out = torch.zeros(3, 1, requires_grad=True)
    loss = masked_task_losses([task], {"b": out}, next(data.batches(3)))
    loss.sum().backward()
    assert loss.item() == 0.0 and torch.all(out.grad == 0)


def test_task_validation_messages():
    with pytest.raises(PolytaskError, match="kind"):
        Task("x", "ordinal")  # type: ignore[arg-type]
    with pytest.raises(PolytaskError, match="does not apply"):
        Task("x", "regression", metrics=("auroc",))
    with pytest.raises(PolytaskError, match="num_classes"):
        Task("x", "multiclass")


def test_data_shape_errors():
    with pytest.raises(PolytaskError, match="empty"):
        MultiTaskData(torch.zeros(0, 2), {"a": torch.zeros(0)})
    with pytest.raises(PolytaskError, match="3 rows but the inputs have 4"):
        MultiTaskData(torch.zeros(4, 2), {"a": torch.zeros(3)})


def test_from_tensors_infers_kinds_and_masks_nan():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(100, 5)).astype("float32")
    reg = rng.normal(size=100)
    reg[:10] = np.nan
    suite = TaskSuite.from_tensors(x, {"cls": rng.integers(0, 3, 100), "reg": reg},
                                   kinds={"cls": "multiclass", "reg": "regression"}, seed=1)
    assert suite.task("cls").num_classes == 3
    assert suite.input_spec == InputSpec("dense", dim=5)
    n_masked = sum(int((~d.mask["reg"]).sum()) for d in (suite.train, suite.val, suite.test))
    assert n_masked == 10
    assert len(suite.train) + len(suite.val) + len(suite.test) == 100


def test_from_dataframe_encodes_categories():
    df = pd.DataFrame({"a": np.arange(30.0), "b": np.ones(30), "species": ["x", "y", "z"] * 10,
                       "score": [1.0, None, 3.0] * 10})
    suite = TaskSuite.from_dataframe(df, ["a", "b"], {"species": "multiclass", "score": "regression"})
    assert suite.task("species").num_classes == 3
    with pytest.raises(PolytaskError, match="no column 'nope'"):
        TaskSuite.from_dataframe(df, ["nope"], {"species": "multiclass"})


def test_delta_m_matches_definition():
    tasks = [Task("a", "multiclass", num_classes=3, metrics=("accuracy",)), Task("r", "regression", metrics=("mse", "mae"))]
    base = {"a": {"accuracy": 0.8}, "r": {"mse": 2.0, "mae": 1.0}}
    res = {"a": {"accuracy": 0.88}, "r": {"mse": 1.0, "mae": 1.5}}
    # a: +10%; r: mse lower-better (2-1)/2 = +50%, mae (1-1.5)/1 = -50% -> 0; mean over tasks = 5%
    assert delta_m(res, base, tasks) == pytest.approx(5.0)
