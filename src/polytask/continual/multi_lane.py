"""MULTI-LANE (De Min, Mancini, Lathuilière, Roy, Ricci, CoLLAs 2024, PMLR 274, 2025, "Less is more:
Summarizing Patch Tokens for efficient Multi-Label Class-Incremental Learning").

Multi-label class-incremental learning without prompt selection: every step t owns a *lane*, a
task-specific pathway through a frozen pretrained encoder that never interacts with the other
lanes, and the classes C_t introduced at step t are read from lane t only. A lane has S learned
patch selectors s_{t,1..S}, prefix prompts (P^k_t, P^v_t) of length L and a linear classifier
W_t over C_t. For the frozen tokens x_1..x_N of an input (patch tokens for a ViT) and its frozen
pooled feature h (the class token's output):

1. summarise the tokens into S lane tokens (gradients stop at the frozen tokens):
       a_{t,s,n} = softmax_n(<s_{t,s}, x_n> / √d),     p_{t,s} = Σ_n a_{t,s,n} x_n;
2. the lane's class token attends over its prompts and summaries only (``_prompting.prefix_attention``):
       c_t = PA(h; [P^k_t; p_t], [P^v_t; p_t]) = Σ_j softmax_j(<h, k_j> / √d) v_j,
       k = [P^k_t; p_t; h],  v = [P^v_t; p_t; h];
3. class c ∈ C_t scores ℓ_c = W_t[c] · c_t + b_t[c] (:func:`route_logits`: each class's logit
   comes from the lane that owns it; no key matching, no prompt selection).

Training step t runs only lane t, with binary cross-entropy over all C labels whose logits
outside C_t are 0 (the authors' ``mask_logits(..., fill_value=0)``: those terms are constant, so
only lane t and W_t learn); lane t starts as a copy of lane t-1 (``next_task``). At test time
every trained lane runs. The encoder's weights never change.

Checked against the authors' code (github.com/tdemin16/multi-lane): ``multi_lane/blocks.py``
(``PreT_Attention.forward``: selectors' softmax over the detached patches scaled by dim^-1/2,
lane attention over [prompts; cls; summaries], "drop and replace" of the summaries after each
layer; ``next_task`` copies lane t-1 into lane t), ``vision_transformer.py`` (``forward_head``
with ``head_mode='concat'``: a shared head masked so that class c reads lane τ(c), summed over
lanes; train-time ``_get_selectors`` returns only the current lane), ``engine.py`` (BCE with
non-current logits and targets filled with 0; evaluation on test images holding a seen class,
scored over the seen classes) and ``configs/coco.py`` (Adam, 20 selectors, 20 prompts, orthogonal
initialisation). Deviations: one lane layer on the encoder's final tokens with identity
projections (the repository's prefix attention, as for DualPrompt here) instead of lanes
through the first 5 (prompts) and all 12 (summaries) MSA layers of a frozen ViT-B/16; per-lane
heads, equivalent to their class-masked shared head; defaults S = 4 selectors and L = 10
prompts (titles have ~16 tokens, not 196 patches); no pre-head normalisation (their coco config
sets ``normalize=True``, which disables the 'pre-head' branch). On pooled-feature inputs (the
default ``movies-multilabel-ci``: cached MiniLM title features and metadata) N = 1, so step 1
returns the feature itself, the selectors get no gradient, and a lane is its prompts and
classifier on that feature; with an encoder that exposes its output tokens (``encoder="minilm"``
on a scenario of MiniLM token inputs) the lanes summarise those tokens as in the paper.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from polytask.continual._prompting import frozen_encoder, prefix_attention
from polytask.continual.base import Strategy
from polytask.continual.multilabel import is_multilabel_ci
from polytask.continual.scenario import Scenario
from polytask.errors import PolytaskError
from polytask.registry import STRATEGIES
from polytask.tasks import Inputs, Task


def summarize(selectors: Tensor, tokens: Tensor, mask: Tensor | None = None) -> Tensor:
    """p_s = Σ_n softmax_n(<s, x_n>/√d) x_n for selectors [S, d] and tokens [B, N, d] (mask [B, N]) -> [B, S, d]."""
    att = torch.einsum("sd,bnd->bsn", selectors, tokens) / math.sqrt(tokens.shape[-1])
    if mask is not None:
        att = att.masked_fill(~mask.bool()[:, None, :], float("-inf"))
    return torch.einsum("bsn,bnd->bsd", att.softmax(-1), tokens)


def route_logits(lane_logits: Sequence[Tensor], lane_classes: Sequence[Sequence[int]], lanes: Sequence[int],
                 num_classes: int) -> Tensor:
    """[B, C] logits: class c ∈ C_t takes lane t's output where lane t ran (``lanes``), 0 elsewhere."""
    out = lane_logits[0].new_zeros(len(lane_logits[0]), num_classes)
    for t, logits in zip(lanes, lane_logits):
        out[:, list(lane_classes[t])] = logits
    return out


class MultiLaneModel(nn.Module):
    """A frozen encoder and one lane (selectors, prefix prompts, classifier) per step."""

    def __init__(self, backbone: nn.Module, task: Task, lane_classes: Sequence[Sequence[int]], *,
                 num_selectors: int = 4, num_prompts: int = 10) -> None:
        super().__init__()
        if num_selectors < 1 or num_prompts < 1:
            raise PolytaskError(f"multi-lane needs num_selectors >= 1 and num_prompts >= 1, got "
                                f"{num_selectors} and {num_prompts}")
        self.backbone = backbone.requires_grad_(False).eval()
        self.task, self.num_classes = task.name, task.out_dim
        self.lane_classes = [tuple(int(c) for c in g) for g in lane_classes]
        d = int(backbone.out_dim)
        net = getattr(backbone, "net", None)
        self.token_mode = net is not None and hasattr(net, "get_input_embeddings")

        def ortho(*shape: int) -> nn.Parameter:
            return nn.Parameter(nn.init.orthogonal_(torch.empty(*shape)))

        self.selectors = nn.ParameterList(ortho(num_selectors, d) for _ in self.lane_classes)
        self.prompt_k = nn.ParameterList(ortho(num_prompts, d) for _ in self.lane_classes)
        self.prompt_v = nn.ParameterList(ortho(num_prompts, d) for _ in self.lane_classes)
        self.heads = nn.ModuleList(nn.Linear(d, len(g)) for g in self.lane_classes)
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))  # lanes trained so far (saved)
        self.lane = 0

    def train(self, mode: bool = True) -> MultiLaneModel:
        super().train(mode)
        self.backbone.eval()  # frozen: no dropout, no statistics updates
        return self

    def lane_parameters(self, t: int) -> list[nn.Parameter]:
        return [self.selectors[t], self.prompt_k[t], self.prompt_v[t], *self.heads[t].parameters()]

    def start_lane(self, t: int) -> None:
        """Train lane t from now on, starting from a copy of lane t-1; every other lane is frozen."""
        if int(self.seen) <= t and t > 0:
            with torch.no_grad():
                for src, dst in zip(self.lane_parameters(t - 1)[:3], self.lane_parameters(t)[:3]):
                    dst.copy_(src)
        self.lane = t
        self.seen.fill_(max(int(self.seen), t + 1))
        for i in range(len(self.lane_classes)):
            for p in self.lane_parameters(i):
                p.requires_grad_(i == t)

    def encode(self, x: Inputs) -> tuple[Tensor, Tensor, Tensor | None]:
        """The frozen pooled feature h [B, d], tokens [B, N, d] and their mask (None when N = 1)."""
        with torch.no_grad():
            h = self.backbone(x)
            if not self.token_mode:
                return h, h[:, None], None
            assert isinstance(x, dict)
            mask = x["attention_mask"]
            n = max(int(mask.sum(1).max()), 1)
            tokens = self.backbone.net(input_ids=x["input_ids"][:, :n], attention_mask=mask[:, :n]).last_hidden_state
            return h, tokens.to(h.dtype), mask[:, :n]

    def run_lane(self, t: int, h: Tensor, tokens: Tensor, mask: Tensor | None) -> Tensor:
        p = summarize(self.selectors[t], tokens, mask)
        keys = torch.cat([self.prompt_k[t].expand(len(h), -1, -1), p], 1)
        values = torch.cat([self.prompt_v[t].expand(len(h), -1, -1), p], 1)
        return self.heads[t](prefix_attention(h, keys, values))

    def forward(self, x: Inputs) -> dict[str, Tensor]:
        h, tokens, mask = self.encode(x)
        lanes = [self.lane] if self.training else list(range(max(int(self.seen), 1)))
        logits = [self.run_lane(t, h, tokens, mask) for t in lanes]
        return {self.task: route_logits(logits, self.lane_classes, lanes, self.num_classes)}


@STRATEGIES.register("multi-lane")
class MultiLane(Strategy):
    """MULTI-LANE: one lane (token selectors, prompts, classifier) per step; each class reads its own lane (De Min et al. 2024)."""

    name = "multi-lane"
    needs_boundaries = True

    def __init__(self, *, num_selectors: int = 4, num_prompts: int = 10, encoder: str | None = None,
                 encoder_options: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.options = {"num_selectors": num_selectors, "num_prompts": num_prompts}
        self.encoder, self.encoder_options = encoder, encoder_options
        self.model: MultiLaneModel | None = None

    def setup(self, scenario: Scenario, seed: int) -> None:
        if not is_multilabel_ci(scenario):
            raise PolytaskError(f"multi-lane needs a multi-label class-incremental scenario (one multilabel task, "
                                f"experiences with classes), not {scenario.name!r} ({scenario.kind}); "
                                "use e.g. movies-multilabel-ci")
        super().setup(scenario, seed)

    def build_model(self, default: Callable[[], nn.Module]) -> nn.Module:
        assert self.scenario is not None
        spec = self.scenario.input_spec
        backbone = frozen_encoder(default, spec, self.encoder, self.encoder_options, None, self.name)
        self.model = MultiLaneModel(backbone, self.scenario.tasks[0], [e.classes for e in self.scenario],
                                    **self.options)
        return self.model

    def begin(self, index: int, tasks: list[Task]) -> None:
        super().begin(index, tasks)
        assert self.model is not None
        self.model.start_lane(index)
