"""Network bodies of the merge suites: the part of a network that is fine-tuned per task and merged.

A body maps a (cached) stem output to features of size ``out_dim``; each task puts its own linear
head on top. :class:`FineTuneNet` joins a body and one head for the Trainer.

* :class:`DigitsBody`: a 64-128-128 ReLU MLP on flattened 8x8 digits (``digits-merge``).
* :class:`EfficientNetTail`: the last MBConv blocks of EfficientNet-Lite0, its 1x1 head convolution
  and global average pooling (``vision-merge``; the stem and first blocks are the frozen stem).
* :class:`MiniLMBody`: all-MiniLM-L6-v2 on packed tokens, mean-pooled (``text-merge``, ``text-merge-lora``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor, nn

if TYPE_CHECKING:
    from polytask.models.pretrained import EfficientNetLite0


class FineTuneNet(nn.Module):
    """body -> task head, as the Trainer wants it (``forward(x) -> {task: logits}``).

    ``train()`` keeps the body in evaluation mode (no dropout, frozen BatchNorm statistics).
    """

    def __init__(self, body: nn.Module, head: nn.Module, task: str) -> None:
        super().__init__()
        self.body, self.head, self.task = body, head, task

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {self.task: self.head(self.body(x))}

    def train(self, mode: bool = True) -> FineTuneNet:
        super().train(mode)
        self.body.eval()
        return self


class DigitsBody(nn.Module):
    """The digits-merge MLP: flattened 8x8 image -> two ReLU layers."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.out_dim = hidden

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class EfficientNetTail(nn.Module):
    """Blocks ``start``.. of an EfficientNet, its head convolution and global average pooling."""

    def __init__(self, encoder: EfficientNetLite0, start: int) -> None:
        super().__init__()
        blocks, self.conv_head, self.bn1, self.act = encoder.tail(start)
        self.blocks = nn.ModuleList(blocks)
        self.out_dim = 1280

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return self.act(self.bn1(self.conv_head(x))).mean((2, 3))


class MiniLMBody(nn.Module):
    """A Hugging Face BERT encoder on packed tokens [B, 2, L] (ids, attention mask), mean-pooled."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.out_dim = 384

    def forward(self, x: Tensor) -> Tensor:
        ids, mask = x[:, 0], x[:, 1]
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


def efficientnet(image_size: int) -> EfficientNetLite0:
    """ImageNet EfficientNet-Lite0 at ``image_size`` pixels, fully trainable, in evaluation mode."""
    from polytask.models.pretrained import EfficientNetLite0
    from polytask.tasks import InputSpec

    enc = EfficientNetLite0(InputSpec("image", shape=(1, 28, 28)), finetune="full", image_size=image_size, cache=False)
    return enc.eval()


def vision_body(image_size: int = 64, first_block: int = 11) -> nn.Module:
    """Pretrained EfficientNet-Lite0 from block ``first_block`` on."""
    return EfficientNetTail(efficientnet(image_size), first_block).eval()


def text_body(mode: str = "full", r: int = 8, alpha: float = 16.0) -> nn.Module:
    """Pretrained MiniLM: ``full`` (embeddings and pooler frozen), ``lora`` (peft adapters) or ``plain``
    (no adapters, nothing trainable; LoRA suites are evaluated on it with the adapters folded in)."""
    from polytask.models.pretrained import MiniLM
    from polytask.tasks import InputSpec

    enc = MiniLM(InputSpec("tokens", seq_len=8), finetune="lora" if mode == "lora" else "full", r=r, alpha=alpha,
                 cache=False).encoder
    if mode == "full":
        enc.embeddings.requires_grad_(False)
        enc.pooler.requires_grad_(False)
    return MiniLMBody(enc).eval()
