"""Progressive Layered Extraction (Tang et al., RecSys 2020, "Progressive Layered Extraction
(PLE): A Novel Multi-Task Learning (MTL) Model for Personalized Recommendations", Sec. 4.3).

Eq. 4-5 (levels j = 1..N, level 0 inputs = backbone output):
    g^{k,j}(x) = w^{k,j}(g^{k,j-1}(x)) S^{k,j}(x)      (task k: its experts + shared experts)
    g^{s,j}(x) = w^{s,j}(g^{s,j-1}(x)) S^{s,j}(x)      (shared: all experts; levels j < N only)
    y^k = t^k(g^{k,N}(x))
Every level is a CGC block; ``num_levels=1`` is exactly ``cgc``.

Checked against: median-research-group/LibMTL LibMTL/architecture/PLE.py (commit 4336804). No
code by the paper's authors was found.
Deviations, on purpose: LibMTL's PLE has no shared gate g^{s,j}: at each level it runs the shared
experts on every task's previous output separately and mixes them into that task only, and its
levels are the stages of a ResNet encoder. We follow Eq. 5: the shared experts of level j read
the shared gate's output g^{s,j-1}, which mixes all tasks' and the shared experts, and levels are
MLP experts on the backbone output. The task gates read the previous level's task output in both.
"""

from __future__ import annotations

from typing import Any, Sequence

from polytask.models.arch._experts import ExtractionNetwork
from polytask.models.backbones import Backbone
from polytask.registry import ARCHITECTURES
from polytask.tasks import InputSpec, Task


@ARCHITECTURES.register("ple")
class PLE(ExtractionNetwork):
    """Progressive Layered Extraction: stacked CGC levels with a shared gate between levels (Tang et al. 2020).

    Shared: backbone, shared experts and shared gates, and the task experts of all levels
    but the last (they feed the shared gate, so every task's loss reaches them). Task-specific:
    the last level's task experts and gates, the task gates of the level below it, and the
    towers. Rep mode marks [the last level's per-task inputs, its shared expert outputs] as
    the shared representation.
    """

    def __init__(self, tasks: Sequence[Task], input_spec: InputSpec, *, backbone: Backbone = "auto",
                 backbone_options: dict[str, Any] | None = None, num_levels: int = 2,
                 num_shared_experts: int = 2, num_task_experts: int = 1, expert: Sequence[int] = (16,),
                 tower: Sequence[int] = (8,)) -> None:
        super().__init__(tasks, input_spec, backbone, backbone_options, num_levels, num_shared_experts,
                         num_task_experts, expert, tower, "ple")
