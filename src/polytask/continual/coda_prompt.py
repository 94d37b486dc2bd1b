"""CODA-Prompt (Smith et al., CVPR 2023, "CODA-Prompt: COntinual Decomposed Attention-based
Prompting for Rehearsal-Free Continual Learning").

A frozen encoder f and a pool of M prompt components P_m ∈ R^{L × d}, each with a key K_m and an
attention vector A_m ∈ R^d; M is split evenly over the tasks. For a query q = f(x), the prompt is
the weighted sum of the components seen so far,

    α_m = cos(q ⊙ A_m, K_m),        p(x) = Σ_m α_m P_m,

(no softmax, no top-k: every component contributes; the weights are end-to-end trainable).
Training on task t updates only task t's components (earlier ones frozen, later ones unused);
before task t its components are initialised orthonormal to all earlier ones (Gram-Schmidt) and
the loss carries the orthogonality penalty

    L = CE(head(h), y) + λ (‖K Kᵀ − I‖² + ‖A Aᵀ − I‖² + ‖P Pᵀ − I‖²),   λ = ``ortho``,

over the components seen so far (P flattened to M' × L·d; ‖·‖² the mean of squared entries, as in
the authors' ``ortho_penalty``), exposed to the Trainer as ``aux_loss``.

Checked against the authors' code (github.com/GT-RIPL/CODA-Prompt, models/zoo.py, ``CodaPrompt``):
α = einsum of normalize(q ⊙ A) and normalize(K); P_ = Σ α P; the prompt is split in halves into
prefix keys and values; past components are detached in training, test uses components [0:f];
new components are re-drawn by Gram-Schmidt at each task; penalty mean((t tᵀ − I)²) · ortho_mu.
Deviations: the prompt reaches the pooled frozen feature through the parameter-free prefix
attention of ``_prompting`` (h = PA(q; p_k, p_v)) instead of five ViT MSA layers; past components
are frozen with ``requires_grad`` (same effect as their detach); our Gram-Schmidt orthogonalises
the new block against an orthonormal basis of all earlier components (theirs projects onto the
earlier rows one by one, exact only while those rows stay orthogonal after training); a pool
larger than the feature dimension (e.g. 100 components of the 64-d split-digits inputs) cannot
be orthogonal, so there a new block is orthonormal only among itself.
Defaults M = 100, L = 8, λ = 0 as in the authors' experiments/imagenet-r.sh (``--prompt_param 100
8 0.0``, "ortho penalty loss weight - with updated code, now can be 0"): with Gram-Schmidt
initialisation per task the penalty is optional; pass ``ortho`` > 0 for the paper's loss.
Class-incremental training masks logits outside the current experience (their learner sets
past classes to -inf and cuts future ones).
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


def component_weights(q: Tensor, keys: Tensor, attention: Tensor) -> Tensor:
    """α [B, M] with α_{b,m} = cos(q_b ⊙ A_m, K_m)."""
    return F.cosine_similarity(q[:, None, :] * attention[None], keys[None], dim=-1)


def gram_schmidt_rows(old: Tensor, n: int, generator: torch.Generator) -> Tensor:
    """n random unit rows orthogonal to each other and to the span of the rows of ``old`` [s, D].

    Where s + n > D that is impossible: the rows are then orthonormal among themselves (n <= D)
    or only unit-norm (n > D).
    """
    dim = old.shape[1]
    v = torch.randn(dim, n, generator=generator, dtype=old.dtype)
    if n > dim:
        return F.normalize(v.T, dim=1)
    if old.shape[0] and old.shape[0] + n <= dim:
        basis = torch.linalg.qr(old.T.detach()).Q  # [D, s] orthonormal basis of the earlier components
        for _ in range(2):  # twice: re-orthogonalise against round-off
            v = v - basis @ (basis.T @ v)
    return torch.linalg.qr(v).Q.T.contiguous()  # [n, D]


def ortho_penalty(t: Tensor) -> Tensor:
    """mean((t tᵀ − I)²) for rows t [M, D]."""
    return ((t @ t.T - torch.eye(len(t), dtype=t.dtype, device=t.device)) ** 2).mean()


class CodaPromptModel(PromptModel):
    """Frozen encoder, per-task blocks of prompt components with keys and attention vectors, linear heads."""

    def __init__(self, backbone: nn.Module, tasks: Sequence[Task], num_experiences: int, *, pool_size: int = 100,
                 prompt_length: int = 8, ortho: float = 0.0, seed: int = 0) -> None:
        super().__init__(backbone, tasks)
        per_task = pool_size // num_experiences
        if per_task < 1 or prompt_length < 2 or prompt_length % 2:
            raise PolytaskError(f"coda-prompt needs pool_size >= the number of experiences ({num_experiences}) and an "
                                f"even prompt_length >= 2, got pool_size={pool_size}, prompt_length={prompt_length}")
        d = self.dim
        self.ortho, self.seed = float(ortho), seed
        blocks = range(num_experiences)
        self.prompts = nn.ParameterList(nn.Parameter(torch.zeros(per_task, prompt_length, d)) for _ in blocks)
        self.keys = nn.ParameterList(nn.Parameter(torch.zeros(per_task, d)) for _ in blocks)
        self.attention = nn.ParameterList(nn.Parameter(torch.zeros(per_task, d)) for _ in blocks)
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))  # task blocks in use (saved)
        self.last_weights: Tensor | None = None

    def _blocks(self) -> tuple[Tensor, Tensor, Tensor]:
        n = max(int(self.seen), 1)
        return (torch.cat(list(self.prompts)[:n]), torch.cat(list(self.keys)[:n]), torch.cat(list(self.attention)[:n]))

    @torch.no_grad()
    def start_task(self, index: int) -> None:
        """Gram-Schmidt-initialise task ``index``'s components (once); train only them from now on."""
        if index >= int(self.seen):
            g = torch.Generator().manual_seed(self.seed * 1000 + index)
            for blocks in (self.prompts, self.keys, self.attention):
                old = torch.cat([b.flatten(1) for b in blocks]).narrow(0, 0, index * len(blocks[0]))
                blocks[index].copy_(gram_schmidt_rows(old, len(blocks[index]), g).reshape(blocks[index].shape))
            self.seen.fill_(index + 1)
        for blocks in (self.prompts, self.keys, self.attention):
            for i, b in enumerate(blocks):
                b.requires_grad_(i == index)

    def forward(self, x: Inputs) -> dict[str, Tensor]:
        q = self.query(x)
        prompts, keys, attention = self._blocks()
        alpha = component_weights(q, keys, attention)  # [B, M']
        self.last_weights = alpha.detach()
        if self.training and self.ortho > 0:
            penalty = ortho_penalty(keys) + ortho_penalty(attention) + ortho_penalty(prompts.flatten(1))
            self.aux_loss = self.ortho * penalty
        p = torch.einsum("bm,mld->bld", alpha, prompts)
        return self.read_out(prefix_attention(q, *split_prefix(p)))


@STRATEGIES.register("coda-prompt")
class CodaPrompt(PromptStrategy):
    """CODA-Prompt: attention-weighted, orthogonally initialised prompt components, frozen encoder (Smith et al. 2023)."""

    name = "coda-prompt"
    needs_boundaries = True

    def __init__(self, *, pool_size: int = 100, prompt_length: int = 8, ortho: float = 0.0,
                 encoder: str | None = None, encoder_options: dict[str, Any] | None = None,
                 image_shape: Sequence[int] | None = None, train_mask: bool = True) -> None:
        super().__init__(encoder=encoder, encoder_options=encoder_options, image_shape=image_shape,
                         train_mask=train_mask)
        self.options = {"pool_size": pool_size, "prompt_length": prompt_length, "ortho": ortho}

    def make_model(self, backbone: nn.Module) -> CodaPromptModel:
        assert self.scenario is not None
        return CodaPromptModel(backbone, self.scenario.tasks, len(self.scenario), seed=self.seed, **self.options)

    def begin(self, index: int, tasks: list[Task]) -> None:
        super().begin(index, tasks)
        assert isinstance(self.model, CodaPromptModel)
        self.model.start_task(index)
