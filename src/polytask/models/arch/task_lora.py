"""Per-task LoRA adapters inside one shared transformer (Hu et al., "LoRA: Low-Rank Adaptation of Large
Language Models", ICLR 2022; one adapter per task as in the multi-task LoRA literature, e.g.
Wang et al., "MultiLoRA", 2023). Task t runs the shared encoder with its own low-rank update on
every adapted matrix W (peft named adapters, one per task):

    h_t = W x + (alpha / r) B_t A_t x,      y_t = head_t(pool(encoder_t(x)))

``shared="frozen"`` (the default) trains only the adapters and heads; ``shared="full"`` trains the
pretrained weights too (shared by all tasks). The adapters are saved in peft's own format
(:meth:`TaskLoRA.save_adapters`; ``PeftModel.from_pretrained(base, dir / task)`` loads one) and
their dense updates (alpha / r) B_t A_t under the base model's tensor names are LoRA task vectors
(:meth:`TaskLoRA.task_vector`).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from polytask.models.arch._transformer import Shared, TransformerTasks
from polytask.models.backbones import Backbone
from polytask.models.pretrained import lora_config, with_lora
from polytask.registry import ARCHITECTURES
from polytask.tasks import InputSpec, Task

_PEFT_PREFIX = "base_model.model."


@ARCHITECTURES.register("task-lora")
class TaskLoRA(TransformerTasks):
    """One peft LoRA adapter per task in a shared Hugging Face encoder; shared weights frozen or trained."""

    def __init__(self, tasks: Sequence[Task], input_spec: InputSpec, *, backbone: Backbone = "auto",
                 backbone_options: dict[str, Any] | None = None, shared: Shared = "frozen", r: int = 8,
                 alpha: float = 16.0, lora_dropout: float = 0.0, target_modules: Sequence[str] | None = None,
                 lora_init: bool | str = True, tower: Sequence[int] = ()) -> None:
        super().__init__("task-lora", tasks, input_spec, backbone, backbone_options, shared, tower)
        config = lora_config(r, alpha, lora_dropout, target_modules, lora_init)
        net = with_lora(self.backbone.encoder, config, self.task_names[0])
        for name in self.task_names[1:]:
            net.add_adapter(name, config)
        self.backbone.encoder = net
        self.backbone.train_base(shared == "full")
        for name in self.task_names:
            for p in self._adapter_parameters(name):
                p.requires_grad_(True)

    def _tuner_layers(self) -> list[nn.Module]:
        from peft.tuners.tuners_utils import BaseTunerLayer

        return [m for m in self.backbone.encoder.modules() if isinstance(m, BaseTunerLayer)]

    def _adapter_parameters(self, task: str) -> list[nn.Parameter]:
        params = []
        for layer in self._tuner_layers():
            for attr in layer.adapter_layer_names:
                part = getattr(layer, attr)
                if task in part:
                    params += list(part[task].parameters()) if isinstance(part, nn.ModuleDict) else [part[task]]
        return params

    def task_parameters(self, task: str) -> list[nn.Parameter]:
        """The task's head and its LoRA adapter."""
        return super().task_parameters(task) + self._adapter_parameters(task)

    def task_states(self, task: str, embeds: Tensor, mask: Tensor) -> Tensor:
        for layer in self._tuner_layers():  # route to the task's adapter without touching requires_grad
            layer._active_adapter = [task]
        return self.backbone.states(None, mask, inputs_embeds=embeds)

    def task_vector(self, task: str) -> dict[str, Tensor]:
        """The task's dense update (alpha / r) B A per adapted weight, under the base model's tensor names."""
        out = {}
        for name, layer in self.backbone.encoder.named_modules():
            if hasattr(layer, "get_delta_weight") and task in getattr(layer, "lora_A", {}):
                out[f"{name.removeprefix(_PEFT_PREFIX)}.weight"] = layer.get_delta_weight(task).detach().clone()
        return out

    def save_adapters(self, directory: str | Path) -> Path:
        """Write every task's adapter in peft's format to ``directory/<task>/`` (adapter_config.json,
        adapter_model.safetensors); with ``shared="full"`` also the trained base model (and its
        tokenizer) to ``directory/base/``, which the adapters then belong to."""
        directory = Path(directory)
        net = self.backbone.encoder
        net.save_pretrained(str(directory), selected_adapters=list(self.task_names))
        if self.shared == "full":
            with torch.no_grad():
                base = copy.deepcopy(net).unload()
            base.save_pretrained(str(directory / "base"))
            self.backbone.tokenizer.save_pretrained(str(directory / "base"))
        return directory
