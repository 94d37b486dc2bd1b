"""Customized Gate Control (Tang et al., RecSys 2020, "Progressive Layered Extraction (PLE):
A Novel Multi-Task Learning (MTL) Model for Personalized Recommendations", Sec. 4.2).

Eq. 1-3:  y^k = t^k(g^k(x)),   g^k(x) = w^k(x) S^k(x),   w^k(x) = softmax(W^k_g x),
          S^k(x) = [E_(k,1), ..., E_(k,m_k), E_(s,1), ..., E_(s,m_s)]
Each task's gate mixes its own experts and the shared experts; experts sit on the backbone
output. This is PLE with a single extraction level (see ``ple``).

Checked against: median-research-group/LibMTL LibMTL/architecture/CGC.py (commit 4336804): per
task a softmax gate (Linear on the input) over the concatenation of the shared experts and the
task's own experts. Same computation: with LibMTL's weights loaded (gate rows reordered),
polytask's CGC gives LibMTL's outputs (tests/test_reference_libmtl.py). No code by the paper's
authors was found.
Deviations: LibMTL concatenates [shared, task] experts; we follow Eq. 2's order [task, shared]
(it only permutes the gate's outputs). Experts and gates read the backbone output h, not the raw
input (see ``mmoe``).
"""

from __future__ import annotations

from typing import Any, Sequence

from polytask.models.arch._experts import ExtractionNetwork
from polytask.models.backbones import Backbone
from polytask.registry import ARCHITECTURES
from polytask.tasks import InputSpec, Task


@ARCHITECTURES.register("cgc")
class CGC(ExtractionNetwork):
    """Customized Gate Control: shared plus per-task experts, one gate per task over both (Tang et al. 2020).

    Shared: backbone and shared experts. Task-specific: the task's experts, gate and tower
    (a task's loss never reaches another task's experts, gate or tower). Rep mode marks
    [backbone output, shared expert outputs] as the shared representation.
    """

    def __init__(self, tasks: Sequence[Task], input_spec: InputSpec, *, backbone: Backbone = "auto",
                 backbone_options: dict[str, Any] | None = None, num_shared_experts: int = 2,
                 num_task_experts: int = 1, expert: Sequence[int] = (16,), tower: Sequence[int] = (8,)) -> None:
        super().__init__(tasks, input_spec, backbone, backbone_options, 1, num_shared_experts,
                         num_task_experts, expert, tower, "cgc")
