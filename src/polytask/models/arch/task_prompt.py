"""Per-task prompt tokens in one shared transformer (prompt tuning: Lester et al., "The Power of Scale
for Parameter-Efficient Prompt Tuning", EMNLP 2021). Task t prepends its own P learned vectors
to the token embeddings E(x) and reads the states of the real tokens:

    H_t = encoder([P_t ; E(x)])[P:],      y_t = head_t(pool(H_t))

The prompts start as the embeddings of P random vocabulary tokens (the paper's sampled-vocabulary
initialisation). ``shared="frozen"`` (the default) trains only the prompts and heads;
``shared="full"`` trains the encoder too.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from polytask.errors import PolytaskError
from polytask.models.arch._transformer import Shared, TransformerTasks
from polytask.models.backbones import Backbone
from polytask.registry import ARCHITECTURES
from polytask.tasks import InputSpec, Task


@ARCHITECTURES.register("task-prompt")
class TaskPrompt(TransformerTasks):
    """``num_prompts`` learned prompt vectors per task prepended to a shared Hugging Face encoder's input."""

    def __init__(self, tasks: Sequence[Task], input_spec: InputSpec, *, backbone: Backbone = "auto",
                 backbone_options: dict[str, Any] | None = None, shared: Shared = "frozen", num_prompts: int = 8,
                 tower: Sequence[int] = ()) -> None:
        super().__init__("task-prompt", tasks, input_spec, backbone, backbone_options, shared, tower)
        limit = self.backbone.max_length
        if num_prompts < 1 or (limit and num_prompts + input_spec.seq_len > limit):
            raise PolytaskError(f"num_prompts must be >= 1 and leave room for {input_spec.seq_len} tokens in the "
                                f"encoder's {limit} positions, not {num_prompts}")
        self.backbone.train_base(shared == "full")
        table = self.backbone.net.get_input_embeddings().weight
        self.prompts = nn.ParameterDict({
            t: nn.Parameter(table[torch.randint(0, table.shape[0], (num_prompts,))].detach().clone())
            for t in self.task_names})
        self.num_prompts = num_prompts

    def task_parameters(self, task: str) -> list[nn.Parameter]:
        """The task's head and its prompt vectors."""
        return super().task_parameters(task) + [self.prompts[task]]

    def task_states(self, task: str, embeds: Tensor, mask: Tensor) -> Tensor:
        b = embeds.shape[0]
        prompt = self.prompts[task].to(embeds.dtype).unsqueeze(0).expand(b, -1, -1)
        full_mask = torch.cat([mask.new_ones(b, self.num_prompts), mask], 1)
        return self.backbone.states(None, full_mask, inputs_embeds=torch.cat([prompt, embeds], 1))[:, self.num_prompts:]
