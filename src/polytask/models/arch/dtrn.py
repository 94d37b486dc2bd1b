"""DTRN (Liu, Zhou, Jiang, Ge, Lian, CIKM 2023, "Deep Task-specific Bottom Representation
Network for Multi-Task Recommendation", arXiv 2308.05996).

Instead of sharing one bottom representation, every task t gets its own:

(a) Task-specific Interest Module (TIM). A hypernetwork shared by all tasks reads the
    task embedding e_t and the behaviour-type embedding e_b and generates the conditional
    parameters of a Transformer layer that encodes behaviour sequence b:
        [γ¹_{t,b}, β¹_{t,b}, γ²_{t,b}, β²_{t,b}] = HyperMLP([e_t ; e_b])
    Conditional Transformer (the layer weights are shared; only the LayerNorm affine
    parameters are generated, which is what makes it parameter-efficient):
        A   = CLN¹_{t,b}(H_b + MultiHead(H_b, H_b, H_b)),   H_b = item embeddings + positions
        O   = CLN²_{t,b}(A + FFN(A)),     CLN(h) = γ ⊙ (h - μ(h)) / σ(h) + β
    and the interest of task t in behaviour b is the masked mean of O over the sequence.
(b) Task-specific Representation Refinement Module (TRM): per task a SENet over the N
    feature embeddings X_t = [field embeddings, the task's interests, dense projection]:
        z = mean_E(X_t)  (squeeze),   w_t = σ(W²_t ReLU(W¹_t z))  (excitation),
        R_t = flatten(w_t ⊙ X_t)
(c) Top: ``top="towers"`` feeds R_t to task t's tower; ``top="mmoe"`` puts MMoE on it
    (our wiring: shared experts f_k applied to each task's own R_t, task gate
    softmax(W_t R_t)), the paper's point that DTRN combines with existing MTL tops.

The formulas above follow the paper's description of TIM (hypernetwork -> conditional
LayerNorm parameters of a Transformer encoding each behaviour sequence) and TRM (SENet field
reweighting per task); we do not reproduce its equation numbering.
Simplifications and choices (not from the paper): one Conditional Transformer layer
(post-LN, as in Vaswani et al.) shared across behaviour types, learned positions, masked
mean pooling of its outputs; the hypernetwork is a two-layer ReLU MLP whose γ outputs are
1 + MLP so every task starts near a plain LayerNorm; dense features enter the TRM as one
extra field through a shared linear projection; the SENet uses the sigmoid excitation of
Hu et al. (2018) with reduction ratio ``se_reduction``.

Ownership: the task embedding, SENet, tower (and MMoE gate) of task t are t's alone: no
other task's loss reaches them. Shared: embeddings, positions, the Transformer weights,
behaviour embeddings, the hypernetwork, the dense projection and the MMoE experts. Rep mode
marks the backbone outputs (field embeddings, sequence embeddings, projected dense
features) as the shared representation; the shared TIM parts sit above that cut, so in rep
mode they receive the weighted sum of the task gradients directly.

No reference code found; looked in: find_repos "DTRN" (unrelated repositories only), code search
"deep task-specific bottom representation hypernetwork conditional transformer SENet", and the
paper pages. Deviations: the simplifications listed above, all ours.
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polytask.errors import PolytaskError
from polytask.models.arch._experts import mix, stack_outputs
from polytask.models.arch.base import Architecture
from polytask.models.arch.diagnostics import ExpertDiagnostics
from polytask.models.backbones import Backbone, mlp
from polytask.registry import ARCHITECTURES
from polytask.tasks import InputSpec, Task


class ConditionalTransformer(nn.Module):
    """One post-LN Transformer layer whose two LayerNorms take externally generated (γ, β)."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, max_len: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise PolytaskError(f"dtrn num_heads ({num_heads}) must divide the embedding size ({dim})")
        self.heads = num_heads
        self.positions = nn.Parameter(torch.zeros(max_len, dim))
        nn.init.normal_(self.positions, std=0.02)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.ReLU(), nn.Linear(ffn_dim, dim))

    def attend(self, h: Tensor, valid: Tensor) -> Tensor:
        """Task-independent part: normalise(H + MultiHead(H)) for [..., L, E] with padding mask [..., L]."""
        h = h + self.positions[: h.shape[-2]]
        *lead, n, e = h.shape
        q, k, v = self.qkv(h).reshape(*lead, n, 3, self.heads, e // self.heads).movedim(-2, -4).unbind(-2)
        bias = torch.zeros(valid.shape, dtype=h.dtype, device=h.device).masked_fill(~valid, -1e9)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias[..., None, None, :])
        return F.layer_norm(h + self.proj(out.movedim(-3, -2).reshape(*lead, n, e)), (e,))

    def condition(self, normed: Tensor, gamma1: Tensor, beta1: Tensor, gamma2: Tensor, beta2: Tensor) -> Tensor:
        """Apply CLN¹ (generated γ¹, β¹), the FFN with residual, and CLN² (γ², β²)."""
        a = gamma1 * normed + beta1
        return gamma2 * F.layer_norm(a + self.ffn(a), (a.shape[-1],)) + beta2


@ARCHITECTURES.register("dtrn")
class DTRN(ExpertDiagnostics, Architecture):
    """DTRN: task-specific bottom representations from a hypernetwork-conditioned interest module and per-task SENets (Liu et al. 2023).

    Needs recsys inputs (categorical fields and behaviour sequences). See the module
    docstring for the equations, the choices made and which parameters are task-specific.

    Diagnostics (``top="mmoe"``; empty with towers): ``last_gates[task]`` is [B, K] over the K
    shared experts; they run on each task's own R_t, so ``last_expert_activations`` names them
    ``<task>/shared/i``; ``expert_groups()`` gives every expert to ``"shared"``.
    """

    def __init__(self, tasks: Sequence[Task], input_spec: InputSpec, *, backbone: Backbone = "auto",
                 backbone_options: dict[str, Any] | None = None, task_dim: int = 8, behaviour_dim: int = 8,
                 hyper_hidden: int = 32, num_heads: int = 2, ffn_dim: int = 32, se_reduction: int = 2,
                 top: Literal["towers", "mmoe"] = "towers", num_experts: int = 4, expert: Sequence[int] = (32,),
                 tower: Sequence[int] = (32,)) -> None:
        if input_spec.kind != "recsys" or not input_spec.seq_names:
            raise PolytaskError(f"dtrn needs recsys inputs with behaviour sequences, not {input_spec.kind} inputs; "
                                "use a recsys suite such as synthetic-recsys")
        if top not in ("towers", "mmoe"):
            raise PolytaskError(f"dtrn top must be 'towers' or 'mmoe', not {top!r}")
        if top == "mmoe" and (num_experts < 1 or not expert):
            raise PolytaskError("dtrn top='mmoe' needs num_experts >= 1 and at least one expert layer, e.g. expert=[32]")
        super().__init__(tasks, input_spec, backbone, backbone_options)
        if not hasattr(self.backbone, "field_embeddings"):
            raise PolytaskError("dtrn reads per-field and per-item embeddings; use backbone 'embedding'")
        e = self.backbone.embedding_dim
        n_seq = len(input_spec.seq_names)
        self.embedding_dim, self.top = e, top
        # (a) TIM
        self.task_embeddings = nn.ModuleDict({t: nn.Embedding(1, task_dim) for t in self.task_names})
        self.behaviour_embeddings = nn.Embedding(n_seq, behaviour_dim)
        self.hypernet = nn.Sequential(nn.Linear(task_dim + behaviour_dim, hyper_hidden), nn.ReLU(),
                                      nn.Linear(hyper_hidden, 4 * e))
        self.encoder = ConditionalTransformer(e, num_heads, ffn_dim, max(input_spec.seq_len, 1))
        # (b) TRM
        self.dense_proj = nn.Linear(input_spec.dense_dim, e) if input_spec.dense_dim else None
        n_fields = len(input_spec.field_vocab) + n_seq + (1 if self.dense_proj is not None else 0)
        squeeze = max(1, n_fields // se_reduction)
        self.senets = nn.ModuleDict({t: nn.Sequential(nn.Linear(n_fields, squeeze), nn.ReLU(),
                                                      nn.Linear(squeeze, n_fields), nn.Sigmoid())
                                     for t in self.task_names})
        # (c) top
        rep_dim = n_fields * e
        if top == "mmoe":
            self.experts = nn.ModuleList(mlp(rep_dim, expert) for _ in range(num_experts))
            self.gates = nn.ModuleDict({t: nn.Linear(rep_dim, num_experts) for t in self.task_names})
            head_in = expert[-1]
        else:
            head_in = rep_dim
        self.make_heads(head_in, tower)
        for t in self.task_names:
            self.mark_task_specific(t, self.task_embeddings[t], self.senets[t])
            if top == "mmoe":
                self.mark_task_specific(t, self.gates[t])

    def expert_groups(self) -> dict[str, list[int]]:
        """Indices in each task gate: every expert is shared; no task has its own."""
        shared = list(range(len(self.experts))) if self.top == "mmoe" else []
        return {"shared": shared, **{t: [] for t in self.task_names}}

    def conditional_parameters(self) -> Tensor:
        """[T, S, 4, E] hypernetwork output: (γ¹, β¹, γ², β²) for every task and behaviour type."""
        tasks = torch.cat([self.task_embeddings[t].weight for t in self.task_names])  # [T, dt]
        beh = self.behaviour_embeddings.weight  # [S, db]
        n_t, n_s = tasks.shape[0], beh.shape[0]
        pairs = torch.cat([tasks[:, None].expand(n_t, n_s, -1), beh[None].expand(n_t, n_s, -1)], -1)
        out = self.hypernet(pairs).reshape(n_t, n_s, 4, self.embedding_dim)
        return out + torch.tensor([1.0, 0.0, 1.0, 0.0], device=out.device)[:, None]

    def interests(self, seq_emb: Tensor, valid: Tensor) -> Tensor:
        """TIM: [B, S, L, E] sequence embeddings and [B, S, L] mask -> [B, T, S, E] task interests."""
        normed = self.encoder.attend(seq_emb, valid)[:, None]  # [B, 1, S, L, E]
        g1, b1, g2, b2 = (p[None, :, :, None, :] for p in self.conditional_parameters().unbind(2))
        out = self.encoder.condition(normed, g1, b1, g2, b2)  # [B, T, S, L, E]
        m = valid[:, None, :, :, None].to(out.dtype)
        return (out * m).sum(3) / m.sum(3).clamp(min=1.0)

    def representations(self, x: dict[str, Tensor]) -> dict[str, Tensor]:
        """Task-specific bottom representations R_t, each [B, N*E]."""
        fields = self.backbone.field_embeddings(x)
        seqs = self.backbone.sequence_embeddings(x)
        parts = [fields, seqs] + ([self.dense_proj(x["dense"])[:, None]] if self.dense_proj is not None else [])
        parts = self.cut(parts)
        fields, seqs, extra = parts[0], parts[1], parts[2:]
        interest = self.interests(seqs, x["seqs"] > 0)
        reps: dict[str, Tensor] = {}
        for i, t in enumerate(self.task_names):
            feats = torch.cat([fields, interest[:, i], *extra], 1)  # [B, N, E]
            w = self.senets[t](feats.mean(-1))  # [B, N]
            reps[t] = (feats * w[..., None]).flatten(1)
        return reps

    def forward(self, x: dict[str, Tensor]) -> dict[str, Tensor]:
        reps = self.representations(x)
        if self.top == "towers":
            return {t: self.heads[t](reps[t]) for t in self.task_names}
        out: dict[str, Tensor] = {}
        acts: dict[str, Tensor] = {}
        for t in self.task_names:
            experts = stack_outputs(self.experts, reps[t], [f"{t}/shared/{i}" for i in range(len(self.experts))], acts)
            g = self.gates[t](reps[t]).softmax(-1)
            self.last_gates[t] = g.detach()
            out[t] = self.heads[t](mix(g, experts))
        self.last_expert_activations = acts
        return out
