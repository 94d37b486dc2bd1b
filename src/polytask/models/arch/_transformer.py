"""Shared plumbing of the architectures that put task-specific parts inside one pretrained transformer.

Each task runs its own pass through the shared encoder (with its own adapter or prompt), so there
is no single shared representation above the input: the representation cut is the token
embeddings, and the encoder's weights (shared, trained with ``shared="full"``) lie above it.
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

from torch import Tensor, nn

from polytask.errors import PolytaskError
from polytask.models.arch.base import Architecture
from polytask.models.backbones import Backbone
from polytask.models.pretrained import HFEncoder
from polytask.tasks import Inputs, InputSpec, Task

Shared = Literal["frozen", "full"]


class TransformerTasks(Architecture):
    """A Hugging Face encoder shared by all tasks, one head per task; subclasses add per-task parts
    through :meth:`task_states`. Sequence-output tasks (token, seq2seq) read every position's state,
    the others the backbone's pooled state."""

    def __init__(self, name: str, tasks: Sequence[Task], input_spec: InputSpec, backbone: Backbone,
                 backbone_options: dict[str, Any] | None, shared: Shared, tower: Sequence[int]) -> None:
        if input_spec.kind != "tokens":
            raise PolytaskError(f"architecture {name!r} needs a trainable Hugging Face backbone on token inputs, "
                                f"not {input_spec.kind} inputs; use a text suite such as wordnet")
        options = dict(backbone_options or {})
        if "finetune" in options or "cache" in options:
            raise PolytaskError(f"architecture {name!r} sets the backbone's finetune and cache itself; "
                                "pass shared='frozen' or shared='full' instead")
        if isinstance(backbone, str):
            options.update(finetune="full", cache=False)
        super().__init__(tasks, input_spec, backbone, options)
        if not isinstance(self.backbone, HFEncoder) or self.backbone._frozen is not None:
            raise PolytaskError(f"architecture {name!r} needs a trainable Hugging Face backbone ('hf' with path=, "
                                f"or 'minilm'), not {type(self.backbone).__name__}")
        if shared not in ("frozen", "full"):
            raise PolytaskError(f"shared must be 'frozen' or 'full', not {shared!r}")
        bad = [t for t in self.task_names if "." in t or not t]
        if bad:
            raise PolytaskError(f"task name {bad[0]!r} cannot name a per-task part; use a name without dots")
        if isinstance(getattr(self.backbone.encoder, "pooler", None), nn.Module):
            self.backbone.encoder.pooler = None  # unused (the pooling is ours): no parameters without gradients
        self.shared = shared
        self.make_heads(self.backbone.out_dim, tower)

    def task_states(self, task: str, embeds: Tensor, mask: Tensor) -> Tensor:  # pragma: no cover - abstract
        """Last hidden states [B, L, H] of the token embeddings ``embeds`` under ``task``'s own parts."""
        raise NotImplementedError

    def forward(self, x: Inputs) -> dict[str, Tensor]:
        enc = self.backbone
        ids, mask = enc.tokens(x)
        length = x["input_ids"].shape[1]  # type: ignore[index]
        embeds = self.boundary(enc.net.get_input_embeddings()(ids))
        out = {}
        for t in self.tasks:
            pool = "tokens" if t.kind_impl.sequence_output else None
            out[t.name] = self.heads[t.name](enc.pool_states(self.task_states(t.name, embeds, mask), mask, pool, length))
        return out
