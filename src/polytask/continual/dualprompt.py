"""DualPrompt (Wang et al., ECCV 2022, "DualPrompt: Complementary Prompting for Rehearsal-free
Continual Learning").

A frozen pretrained encoder f, one shared G(eneral)-prompt g ∈ R^{L_g × d} and one E(xpert)-prompt
e_t ∈ R^{L_e × d} per task with a learnable key k_t. For an input x with query q(x) = f(x):

* training on task t uses e_t (the task identity is known) and pulls its key to the queries,
      L = CE(head(h), y) + λ · mean_x (1 − cos(q(x), k_t)),     λ = ``pull`` (default 1);
* at test time the E-prompt is the best-matching key's, t̂(x) = argmax_t cos(q(x), k_t),
  among the tasks trained so far;
* the G-prompt attaches to an earlier position than the E-prompt (the paper: layers 1-2 and
  3-5 of a ViT), both by prefix-tuning: half of each prompt's rows prefix the keys, half the values.

Only g, the E-prompts, the keys and the heads train; the encoder's weights never change; the
current task's e_t and k_t are the only E-prompt parameters the optimiser sees.

Checked against the DualPrompt class in the CODA-Prompt authors' code (github.com/GT-RIPL/CODA-Prompt,
models/zoo.py): training selects ``p[task_id]`` and adds ``(1 - cos_sim[:, task_id]).sum()``; test
takes the top-1 key; keys and prompts are split in halves for prefix keys/values. Deviations:
the prompts reach a pooled feature vector through the parameter-free prefix attention of
``_prompting`` (G first, then E: h = PA(PA(q; g); e_t)), not a ViT's MSA layers; the pull term is
averaged over the batch (their sum scales with the batch size); test-time matching considers
only the tasks trained so far (their pool includes untrained keys); initialisation uniform in
[-1, 1] (theirs: [0, 1)). Defaults L_e = 20, L_g = 6 as in their experiments/imagenet-r.sh
(``--prompt_param 10 20 6``: pool = number of tasks, E length, G length). Class-incremental
training masks logits outside the current experience.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polytask.continual._prompting import PromptModel, PromptStrategy, prefix_attention, split_prefix
from polytask.errors import PolytaskError
from polytask.registry import STRATEGIES
from polytask.tasks import Inputs, Task


def match_task(q: Tensor, keys: Tensor) -> Tensor:
    """t̂(x) = argmax_t cos(q(x), k_t) for queries [B, d] and keys [T, d]."""
    return F.cosine_similarity(q[:, None, :], keys[None], dim=-1).argmax(1)


class DualPromptModel(PromptModel):
    """Frozen encoder, a shared G-prompt, one E-prompt and key per task, linear heads."""

    def __init__(self, backbone: nn.Module, tasks: Sequence[Task], num_experiences: int, *, g_length: int = 6,
                 e_length: int = 20, pull: float = 1.0) -> None:
        super().__init__(backbone, tasks)
        if g_length < 2 or e_length < 2 or g_length % 2 or e_length % 2:
            raise PolytaskError(f"dualprompt prompt lengths must be even and >= 2 (half keys, half values), got "
                                f"g_length={g_length}, e_length={e_length}")
        d = self.dim
        self.pull = float(pull)
        self.g = nn.Parameter(torch.empty(g_length, d).uniform_(-1, 1))
        self.e = nn.ParameterList(nn.Parameter(torch.empty(e_length, d).uniform_(-1, 1)) for _ in range(num_experiences))
        self.keys = nn.ParameterList(nn.Parameter(torch.empty(d).uniform_(-1, 1)) for _ in range(num_experiences))
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))  # tasks trained so far (saved)
        self.task = 0
        self.last_selection: Tensor | None = None

    def start_task(self, index: int) -> None:
        """Train e_index and k_index from now on; earlier (and later) E-prompts and keys stay fixed."""
        self.task = index
        self.seen.fill_(max(int(self.seen), index + 1))
        for i, (e, k) in enumerate(zip(self.e, self.keys)):
            e.requires_grad_(i == index)
            k.requires_grad_(i == index)

    def forward(self, x: Inputs) -> dict[str, Tensor]:
        q = self.query(x)
        if self.training:
            idx = torch.full((len(q),), self.task, dtype=torch.long, device=q.device)
            self.aux_loss = self.pull * (1 - F.cosine_similarity(q, self.keys[self.task][None], dim=-1)).mean()
        else:
            idx = match_task(q, torch.stack(list(self.keys)[:max(int(self.seen), 1)]))
        self.last_selection = idx
        h = prefix_attention(q, *split_prefix(self.g))
        e = torch.stack(list(self.e))[idx]  # [B, L_e, d]
        return self.read_out(prefix_attention(h, *split_prefix(e)))


@STRATEGIES.register("dualprompt")
class DualPrompt(PromptStrategy):
    """DualPrompt: a shared G-prompt plus key-matched per-task E-prompts on a frozen encoder (Wang et al. 2022)."""

    name = "dualprompt"
    needs_boundaries = True

    def __init__(self, *, g_length: int = 6, e_length: int = 20, pull: float = 1.0, encoder: str | None = None,
                 encoder_options: dict[str, Any] | None = None, image_shape: Sequence[int] | None = None,
                 train_mask: bool = True) -> None:
        super().__init__(encoder=encoder, encoder_options=encoder_options, image_shape=image_shape,
                         train_mask=train_mask)
        self.options = {"g_length": g_length, "e_length": e_length, "pull": pull}

    def make_model(self, backbone: nn.Module) -> DualPromptModel:
        assert self.scenario is not None
        return DualPromptModel(backbone, self.scenario.tasks, len(self.scenario), **self.options)

    def begin(self, index: int, tasks: list[Task]) -> None:
        super().begin(index, tasks)
        assert isinstance(self.model, DualPromptModel)
        self.model.start_task(index)
