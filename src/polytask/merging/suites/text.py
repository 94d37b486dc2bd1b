"""``text-merge`` and ``text-merge-lora``: all-MiniLM-L6-v2 (mean pooling) on four text tasks.

Tasks: ``wordnet-pos``, ``wordnet-topic``, ``fortunes`` (topic) and ``tweet-sentiment``.
``text-merge`` fine-tunes everything but the embeddings (merged: the six transformer layers).
``text-merge-lora`` trains per-task LoRA adapters (Hu et al., ICLR 2022; via peft) on the
attention query and value projections; its task vectors are the adapters folded into the dense
weights, τ_t = (α/r)·B_t A_t (peft's ``merge_and_unload``), and its merged tensors are those
twelve matrices of the plain, adapter-free model.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from polytask.merging.suites.base import Prepared, SuiteSpec, splits_of
from polytask.models.bodies import text_body
from polytask.registry import MERGE_SUITES, SUITES


def _text_source(task: str, subset: int, seed: int, seq_len: int) -> tuple[Any, str]:
    if task.startswith("wordnet-"):
        label = task.split("-", 1)[1]
        return SUITES.create("wordnet", subset=subset, seed=seed, seq_len=seq_len, tasks=[label]), label
    if task == "fortunes":
        return SUITES.create("fortunes", subset=subset, seed=seed, seq_len=seq_len, tasks=["topic"]), "topic"
    return SUITES.create("tweet-sentiment", subset=subset, seed=seed, seq_len=seq_len, tasks=["sentiment"]), "sentiment"


def _pack(x: dict[str, Tensor]) -> Tensor:
    """Tokens as one tensor [N, 2, L] (ids, mask), trimmed to the longest sequence."""
    length = max(int(x["attention_mask"].sum(1).max()), 1)
    return torch.stack([x["input_ids"][:, :length], x["attention_mask"][:, :length]], 1)


def _lora_target(key: str) -> bool:
    return key.endswith(("attention.self.query.weight", "attention.self.value.weight"))


def _folded(body: nn.Module) -> dict[str, Tensor]:
    """LoRA: W + (α/r)·B·A for every adapted matrix, under the plain model's tensor names."""
    dense = body.model.merge_and_unload()
    return {f"model.{k}": v.detach().clone() for k, v in dense.state_dict().items() if _lora_target(k)}


def _plain() -> tuple[nn.Module, dict[str, Tensor]]:
    """The adapter-free pretrained MiniLM and its adapted matrices (the base of the folded task vectors)."""
    plain = text_body("plain")
    return plain, {k: v.detach().clone() for k, v in plain.state_dict().items() if _lora_target(k)}


@MERGE_SUITES.register("text-merge")
class TextMerge(SuiteSpec):
    """all-MiniLM-L6-v2 fully fine-tuned on 4 text tasks"""

    name = "text-merge"
    tasks = ("wordnet-pos", "wordnet-topic", "fortunes", "tweet-sentiment")
    kind = "text"
    size_class = "text"
    eval_batch = 32
    val_limit = 64
    lora: ClassVar[bool] = False

    @classmethod
    def prepare(cls, *, tasks: list[str] | None = None, subset: int = 1000, seq_len: int = 48, probe_epochs: int = 20,
                epochs: int = 1, lr: float | None = None, r: int = 8, alpha: float = 16.0, seed: int = 0) -> Prepared:
        """MiniLM: fully fine-tuned transformer layers, or LoRA adapters folded into the weights."""
        names = cls.check_tasks(tasks)
        data, classes = {}, {}
        for t in names:
            suite, label = _text_source(t, subset, seed, seq_len)
            data[t] = splits_of(suite, label, _pack)
            classes[t] = int(max(int(s[1].max()) for s in data[t].values())) + 1
        return Prepared(lambda: text_body("lora" if cls.lora else "full", r, alpha), data, classes,
                        train={"epochs": epochs, "batch_size": 16, "lr": lr or (5e-4 if cls.lora else 5e-5)},
                        probe={"epochs": probe_epochs, "batch_size": 128, "lr": 1e-2},
                        finetuned=_folded if cls.lora else None, plain=_plain if cls.lora else None,
                        info={"subset": subset, "seq_len": seq_len, "lora": {"r": r, "alpha": alpha} if cls.lora else None})

    @classmethod
    def pretrained_body(cls, options: dict[str, Any]) -> nn.Module:
        return text_body("full")


@MERGE_SUITES.register("text-merge-lora")
class TextMergeLora(TextMerge):
    """all-MiniLM-L6-v2 with per-task LoRA adapters on 4 text tasks"""

    name = "text-merge-lora"
    lora = True

    @classmethod
    def pretrained_body(cls, options: dict[str, Any]) -> nn.Module:
        return text_body("plain")
