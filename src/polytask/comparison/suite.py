"""One suite every route reads: a merge suite's per-task data and pretrained body, as a TaskSuite.

A comparison suite is a merge suite (``digits-merge``, ``vision-merge``, ``text-merge``): one
pretrained body θ_0, one dataset per task, and, cached with it, the per-task references every
route is measured against — one fine-tuned copy of the body per task (the individual ceiling,
LP-FT through the shared Trainer) and linear probes on the frozen body (the floor). From it:

* the joint route trains an architecture whose backbone is a fresh copy of θ_0 on the union of
  the tasks' data (:func:`polytask.sampling.concat_task_data`), each sample labelled for its own task;
* the continual route learns one experience per task (:meth:`Scenario.from_suite`);
* the merge route merges the cached fine-tuned bodies.

Every route trains the same tensors of the body (those the merge suite fine-tunes and merges,
i.e. the keys of its ``base.safetensors``) with the same frozen rest, keeps BatchNorm statistics
and dropout in evaluation mode as the merge suite's fine-tuning does, and gives every task its own
head. Like the individual models (LP-FT, Kumar et al., ICLR 2022), the joint and continual models
with linear heads start from the linear probes on the frozen body (:meth:`ComparisonSuite.probe_heads`,
the build's own recipe and seeds, so the very heads the individual models started from).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from safetensors import safe_open
from torch import Tensor, nn

from polytask.sampling import concat_task_data
from polytask.tasks import InputSpec, MultiTaskData, Task, TaskSuite

#: the comparison suites and the build options ``compare`` gives them (the user's override these). With the merge
#: benchmark's vision-merge (blocks 11-15 fine-tuned for 2 epochs) the frozen body with linear probes reaches
#: 0.96 of the fine-tuned models, too close to tell the routes apart; fine-tuning blocks 6-15 for 5 epochs
#: brings the floor to 0.84 of the ceiling (the multi-mnist tasks: 0.55 -> 0.89).
COMPARE_SUITES: dict[str, dict[str, Any]] = {
    "digits-merge": {},
    "vision-merge": {"first_block": 6, "epochs": 5, "lr": 3e-4},
    "text-merge": {},
}


class PretrainedBody(nn.Module):
    """A copy of the pretrained body as a backbone: its merged tensors trainable, the rest frozen,
    BatchNorm statistics and dropout kept in evaluation mode even while training."""

    def __init__(self, body: nn.Module, trainable: set[str]) -> None:
        super().__init__()
        self.body = copy.deepcopy(body)
        for name, p in self.body.named_parameters():
            p.requires_grad_(name in trainable)
        self.out_dim = int(body.out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)

    def train(self, mode: bool = True) -> PretrainedBody:
        super().train(mode)
        self.body.eval()
        return self


@dataclass
class ComparisonSuite:
    """A merge suite seen by every route: the TaskSuite, the body to start from, the references."""

    merge: Any  # polytask.merging MergeSuite
    suite: TaskSuite
    trainable: set[str]
    _probes: dict[str, nn.Linear] | None = None

    @property
    def name(self) -> str:
        return self.suite.name

    @property
    def task_names(self) -> list[str]:
        return self.suite.task_names

    def body(self) -> PretrainedBody:
        """A fresh trainable copy of the pretrained body θ_0."""
        return PretrainedBody(self.merge.body, self.trainable)

    @property
    def finetune(self) -> dict[str, Any]:
        """The training settings the suite's individual models were fine-tuned with (epochs, batch size, lr)."""
        return dict(self.merge.meta["finetune"]["train"])

    def reference(self, which: str) -> dict[str, float]:
        """Per-task test accuracy of ``individual`` (fine-tuned per task) or ``probe`` (frozen body + linear probe)."""
        key = {"individual": "finetuned_accuracy", "probe": "probe_accuracy"}[which]
        return {t: float(self.merge.meta[key][t]) for t in self.task_names}

    def probe_heads(self) -> dict[str, nn.Linear]:
        """Linear probes on the frozen body, trained as the suite's build trains them (same seeds)."""
        if self._probes is None:
            self._probes = linear_probes(self.merge)
        return {t: copy.deepcopy(h) for t, h in self._probes.items()}

    def samples(self, split: str = "train") -> dict[str, int]:
        return {t: int(self.merge.meta["samples"][t][split]) for t in self.task_names}


def comparison_suite(merge_suite: Any) -> ComparisonSuite:
    """The :class:`ComparisonSuite` view of a loaded merge suite."""
    tasks = [Task(t, "multiclass", num_classes=max(int(merge_suite.meta["classes"][t]), 2), metrics=("accuracy",))
             for t in merge_suite.tasks]
    splits = {s: concat_task_data({t: MultiTaskData(*_xy(merge_suite.data[t][s], t)) for t in merge_suite.tasks})
              for s in ("train", "val", "test")}
    x = splits["train"].x
    spec = InputSpec("tokens", seq_len=x.shape[-1]) if merge_suite.kind == "text" else \
        InputSpec("image", shape=tuple(x.shape[1:]))
    suite = TaskSuite(merge_suite.name, tasks, spec, splits["train"], splits["val"], splits["test"],
                      description=merge_suite.meta.get("description", ""))
    with safe_open(str(merge_suite.base_path), "pt") as f:
        trainable = set(f.keys())
    return ComparisonSuite(merge_suite, suite, trainable)


def linear_probes(merge_suite: Any) -> dict[str, nn.Linear]:
    """Step 1 of the suite's LP-FT for every task, exactly as its build ran it (same recipe and seeds)."""
    from polytask.merging.suites import linear_probe

    seed = int(merge_suite.meta["resolved_options"].get("seed", 0))
    return {t: linear_probe(merge_suite.body, Task(t, "multiclass", num_classes=int(merge_suite.meta["classes"][t])),
                            merge_suite.data[t], merge_suite.meta["finetune"]["probe"], seed, i).requires_grad_(True)
            for i, t in enumerate(merge_suite.tasks)}


def _xy(split: tuple[Tensor, Tensor], task: str) -> tuple[Tensor, dict[str, Tensor]]:
    return split[0], {task: split[1]}
