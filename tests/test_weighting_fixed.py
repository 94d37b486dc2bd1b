"""Fixed task weights and a main task: the weighted objective by hand, the weight forms and their
errors, and a run whose main task alone drives model selection and Δm."""

from __future__ import annotations

import json

import pytest
import torch

from polytask import PolytaskError, RunConfig, TrainConfig, run
from polytask.joint.runner import main_task_settings
from polytask.metrics import delta_m
from polytask.registry import WEIGHTINGS
from polytask.weighting.fixed import fixed_weights


def test_the_update_is_the_gradient_of_the_fixed_weighted_sum():
    theta = torch.tensor([1.0, -2.0], requires_grad=True)
    losses = torch.stack([theta[0] ** 2, 3 * theta[1], theta.sum()])  # grads: [2, 0], [0, 3], [1, 1]
    w = WEIGHTINGS.create("fixed", ["a", "b", "c"], weights=[1.0, 0.5, 0.25]).backward(losses)
    assert torch.equal(w, torch.tensor([1.0, 0.5, 0.25]))
    assert torch.allclose(theta.grad, torch.tensor([2 + 0.25, 1.5 + 0.25]))


def test_weight_forms():
    names = ["a", "b", "c"]
    assert fixed_weights(names).tolist() == [1, 1, 1]
    assert fixed_weights(names, {"c": 2, "a": 1, "b": 0}).tolist() == [1, 0, 2]
    assert fixed_weights(names, main="b", aux_weight=0.1).tolist() == pytest.approx([0.1, 1, 0.1])


@pytest.mark.parametrize("kwargs, message", [
    ({"weights": [1, 2]}, "got 2 weights for 3 tasks"),
    ({"weights": {"a": 1, "b": 1}}, "has no weight for task 'c'"),
    ({"weights": {"a": 1, "b": 1, "c": 1, "d": 1}}, "names no task 'd'"),
    ({"weights": [0, 0, 0]}, "at least one positive"),
    ({"weights": [1, -1, 0]}, "non-negative"),
    ({"main": "z"}, "main task 'z' is not a task"),
    ({"main": "a", "weights": [1, 1, 1]}, "not both"),
])
def test_bad_weights_are_one_line_errors(kwargs, message):
    with pytest.raises(PolytaskError, match=message):
        WEIGHTINGS.create("fixed", ["a", "b", "c"], **kwargs)


def _config(**kw) -> RunConfig:
    kw.setdefault("train", TrainConfig(epochs=3, progress=False, num_threads=1))
    return RunConfig(suite="synthetic-mmoe", suite_options={"num_samples": 400}, weighting="fixed", **kw)


def test_a_main_task_drives_model_selection_and_delta_m(tmp_path):
    base = run(_config(baseline="none"))
    tasks = [t.name for t in base.suite.tasks]
    main = tasks[1]
    baselines = {t: {m: v * 0.9 + 0.01 for m, v in r.items()} for t, r in base.metrics["test"].items()}
    path = tmp_path / "baselines.json"
    path.write_text(json.dumps(baselines))
    result = run(_config(main=main, baseline=str(path), weighting_options={"aux_weight": 0.5}))
    m = result.metrics
    assert m["main"] == main
    main_task = [t for t in result.suite.tasks if t.name == main]
    assert m["delta_m"] == pytest.approx(delta_m(m["test"], baselines, main_task))
    assert m["delta_m_all_tasks"] == pytest.approx(delta_m(m["test"], baselines, result.suite.tasks))
    metric = main_task[0].metrics[0]
    train, options = main_task_settings(result.config, result.suite)  # what the run's trainer was given
    assert train.monitor == f"{main}/{metric}" and options == {"aux_weight": 0.5, "main": main}
    # the weighting took the run's main task: weight 1 for it, aux_weight for the others
    logged = {t: result.history[0][f"weight/{t}"] for t in tasks}
    assert logged == {t: (1.0 if t == main else 0.5) for t in tasks}
    with pytest.raises(PolytaskError, match="main task 'nope' is not a task of suite"):
        run(_config(main="nope", baseline="none"))
    with pytest.raises(PolytaskError, match="is not a metric of the main task"):
        run(_config(main=main, baseline="none", train=TrainConfig(epochs=1, monitor=f"{tasks[0]}/{metric}")))
