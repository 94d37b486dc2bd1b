"""Learning to Prompt (Wang et al., CVPR 2022, "Learning to Prompt for Continual Learning").

A frozen pretrained backbone f, a pool of M prompts P_i ∈ R^{L_p × d} with learnable keys k_i,
and a trainable head. For an input x:

1. query q(x) = f(x): the frozen backbone's feature (MiniLM: its mean-pooled sentence vector);
2. select the N keys closest to q by cosine similarity γ (Eq. 3, top-N);
3. prepend the selected prompts to the token embeddings, run the frozen encoder, and feed the
   mean of the outputs at the prompt positions to the head (the paper's prompt-token readout);
4. train with the surrogate loss of Eq. 5,
       L = CE(head(·), y) + λ Σ_{selected i} (1 − cos(q(x), k_i)),   λ = ``pull`` (0.1 in the
   authors' code), exposed to the Trainer as the model's ``aux_loss`` (:class:`AuxiliaryLoss`).

Only prompts, keys and head are trained: the backbone's weights stay bit for bit the same.
Class-incremental training masks the logits of classes outside the current experience (the
authors' ``train_mask``). Defaults M = 10, N = 5, L_p = 5 as in the paper.

Adaptation for backbones without token embeddings (dense, image or cached-feature inputs,
where nothing can be prepended): the selected prompts are averaged to one d-vector and
added to the frozen feature, h = f(x) + mean(P_selected), so a prompt acts as a learned,
key-selected shift of the representation. With a randomly initialised backbone (e.g. the
MLP on MNIST) f is not pretrained, so that setting tests the mechanism, not the method.
Prompt-frequency diversification (the paper's optional Eq. 6 penalty) is not implemented.

The frozen encoder (see ``_prompting.frozen_encoder``): the run's backbone by default, or a
pretrained encoder by name, e.g. ``encoder="efficientnet-lite0", image_shape=[1, 28, 28]`` on
split-mnist (frozen ImageNet EfficientNet-Lite0 features instead of raw pixels) or
``encoder="minilm"`` on wordnet-topics (token mode: prompts prepended to MiniLM's tokens).

Checked against: the PyTorch port of the authors' JAX code, JH-LEE-KR/l2p-pytorch (prompt.py,
also in aimagelab/mammoth models/l2p_utils/prompt.py): cosine similarity of the frozen [CLS]
query to the L2-normalised keys, top-N selection, the pull term reduce_sim subtracted with
coefficient 0.1 (``pull_constraint_coeff``), the prompt-token mean readout (``head_type="prompt"``)
and ``train_mask``. Same mechanism and loss.
Deviations: the port defaults to ``batchwise_prompt=True`` (the N prompts chosen most often in the
batch are used for every sample); we select per sample, as Eq. 3 defines it. The backbone
is MiniLM / EfficientNet-Lite0 or the run's own, not a ViT-B/16, and the feature-shift adaptation
above replaces prepending where there are no tokens. In token mode the prompts enter through
MiniLM's input embeddings, so they get BERT's position embeddings (positions 0..N·L_p−1) and shift the
text tokens' positions by N·L_p, where the ViT of the paper prepends them after its position
embedding. The pull coefficient is the code's 0.1; the paper's text gives λ = 0.5.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polytask.continual._prompting import PromptModel, PromptStrategy
from polytask.errors import PolytaskError
from polytask.registry import STRATEGIES
from polytask.tasks import Inputs, Task


class PromptPool(PromptModel):
    """Frozen backbone + prompt pool with keys + one linear head per task."""

    def __init__(self, backbone: nn.Module, tasks: Sequence[Task], *, pool_size: int = 10, top_n: int = 5,
                 prompt_length: int = 5, pull: float = 0.1) -> None:
        if not 1 <= top_n <= pool_size or prompt_length < 1:
            raise PolytaskError(f"l2p needs 1 <= top_n <= pool_size and prompt_length >= 1, got "
                                f"top_n={top_n}, pool_size={pool_size}, prompt_length={prompt_length}")
        net = getattr(backbone, "net", None)
        token_mode = net is not None and hasattr(net, "get_input_embeddings")
        d = int(backbone.out_dim)
        d_prompt = int(net.get_input_embeddings().embedding_dim) if token_mode else d
        super().__init__(backbone, tasks, head_dim=d_prompt)
        self.token_mode = token_mode
        self.top_n, self.pull = top_n, float(pull)
        self.keys = nn.Parameter(torch.empty(pool_size, d).uniform_(-1, 1))
        self.prompts = nn.Parameter(torch.empty(pool_size, prompt_length, d_prompt).uniform_(-1, 1))
        self.last_selection: Tensor | None = None

    def _prompted(self, x: Inputs, prompts: Tensor) -> Tensor:
        """Prepend ``prompts`` [B, N·L_p, d] to the token embeddings; mean output at the prompt positions."""
        assert isinstance(x, dict)
        net = self.backbone.net
        mask = x["attention_mask"]
        length = max(int(mask.sum(1).max()), 1)
        ids, mask = x["input_ids"][:, :length], mask[:, :length]
        emb = net.get_input_embeddings()(ids)
        n = prompts.shape[1]
        full_mask = torch.cat([torch.ones(len(ids), n, dtype=mask.dtype), mask], 1)
        hidden = net(inputs_embeds=torch.cat([prompts.to(emb.dtype), emb], 1), attention_mask=full_mask).last_hidden_state
        return hidden[:, :n].mean(1)

    def forward(self, x: Inputs) -> dict[str, Tensor]:
        q = self.query(x)
        sim = F.cosine_similarity(q[:, None, :], self.keys[None], dim=-1)  # [B, M]
        top = sim.detach().topk(self.top_n, dim=1).indices  # [B, N]
        self.last_selection = top
        if self.training:
            self.aux_loss = self.pull * (1 - sim.gather(1, top)).sum(1).mean()
        chosen = self.prompts[top]  # [B, N, L_p, d]
        if self.token_mode:
            h = self._prompted(x, chosen.flatten(1, 2))
        else:
            h = q + chosen.mean((1, 2))
        return self.read_out(h)


@STRATEGIES.register("l2p")
class L2P(PromptStrategy):
    """Learning to Prompt: a key-selected prompt pool on a frozen backbone; trains prompts, keys, head (Wang et al. 2022)."""

    name = "l2p"

    def __init__(self, *, pool_size: int = 10, top_n: int = 5, prompt_length: int = 5, pull: float = 0.1,
                 encoder: str | None = None, encoder_options: dict[str, Any] | None = None,
                 image_shape: Sequence[int] | None = None, train_mask: bool = True) -> None:
        super().__init__(encoder=encoder, encoder_options=encoder_options, image_shape=image_shape,
                         train_mask=train_mask)
        self.options = {"pool_size": pool_size, "top_n": top_n, "prompt_length": prompt_length, "pull": pull}

    def make_model(self, backbone: nn.Module) -> PromptPool:
        assert self.scenario is not None
        return PromptPool(backbone, self.scenario.tasks, **self.options)
