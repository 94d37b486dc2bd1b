"""One text-to-text model shared by every task (T5: Raffel et al., "Exploring the Limits of Transfer
Learning with a Unified Text-to-Text Transformer", JMLR 2020; multi-task training on tasks phrased
as instructions: Mishra et al., "Cross-Task Generalization via Natural Language Crowdsourcing
Instructions", ACL 2022). The task is named by the instruction inside the input text, so every
weight is shared; task t's loss is the teacher-forced negative log-likelihood of its targets,

    L_t = -(1 / |y|) Σ_i log p(y_i | y_<i, x),

with the decoder reading the target shifted right (``target_ids`` in the inputs, led by the model's
``decoder_start_token_id``). In eval mode (``generate=True``, the default) the outputs are the
logits of greedy decoding with the model's own ``generate``: position i holds the distribution the
model gave after its own i generated tokens; once a sequence has emitted its end token the later
positions repeat that last step (the predictions stay "ended"). The seq2seq kind's argmax is then
the generated text, so exact match and BLEU score real generations, and the evaluation loss is the
likelihood of the targets under free-running decoding (equal to the teacher-forced loss wherever the
generated prefix matches the target). ``finetune="lora"`` trains one shared peft LoRA adapter
(Hu et al., ICLR 2022) instead of every weight. The representation cut is the encoder's input
embeddings, as in :mod:`polytask.models.arch._transformer`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
from torch import Tensor, nn

from polytask.errors import PolytaskError
from polytask.models.arch.base import Architecture
from polytask.models.backbones import Backbone
from polytask.models.pretrained import _hf_quiet, lora_config, with_lora
from polytask.registry import ARCHITECTURES
from polytask.tasks import Inputs, InputSpec, Task


class HFSeq2Seq(nn.Module):
    """A Hugging Face encoder-decoder in a local folder (``AutoModelForSeq2SeqLM.from_pretrained``)."""

    def __init__(self, path: str | os.PathLike[str], finetune: Literal["full", "lora"], r: int, alpha: float,
                 target_modules: Sequence[str] | None) -> None:
        super().__init__()
        folder = Path(path) if path else None
        if folder is None or not (folder / "config.json").is_file():
            raise PolytaskError(f"architecture 'seq2seq-lm' needs path= a local encoder-decoder folder with "
                                f"config.json (what save_pretrained writes), not {str(path)!r}")
        if finetune not in ("full", "lora"):
            raise PolytaskError(f"finetune must be 'full' or 'lora', not {finetune!r}")
        _hf_quiet()
        from transformers import AutoModelForSeq2SeqLM

        model = AutoModelForSeq2SeqLM.from_pretrained(str(folder), local_files_only=True)
        self.config = model.config
        self.net = with_lora(model, lora_config(r, alpha, 0.0, target_modules)) if finetune == "lora" else model
        self.out_dim = int(model.config.d_model if hasattr(model.config, "d_model") else model.config.hidden_size)

    @property
    def lm(self) -> Any:
        """The model with its generate() (the base model of a peft wrapper, adapters injected)."""
        return self.net.get_base_model() if hasattr(self.net, "get_base_model") else self.net


@ARCHITECTURES.register("seq2seq-lm")
class Seq2SeqLM(Architecture):
    """A Hugging Face encoder-decoder (T5, BART) shared by every seq2seq task; greedy generation at evaluation."""

    def __init__(self, tasks: Sequence[Task], input_spec: InputSpec, *, path: str = "", backbone: Backbone = "auto",
                 backbone_options: dict[str, Any] | None = None, finetune: Literal["full", "lora"] = "full",
                 r: int = 8, alpha: float = 16.0, target_modules: Sequence[str] | None = None,
                 generate: bool = True) -> None:
        if backbone != "auto" or backbone_options:
            raise PolytaskError("architecture 'seq2seq-lm' loads its model from path=; leave backbone and "
                                "backbone_options unset")
        if input_spec.kind != "tokens":
            raise PolytaskError(f"architecture 'seq2seq-lm' needs token inputs, not {input_spec.kind}; "
                                "use a text-to-text suite such as wordnet-instruct")
        bad = [t.name for t in tasks if t.kind != "seq2seq"]
        if bad:
            raise PolytaskError(f"architecture 'seq2seq-lm' generates text; task {bad[0]!r} is not a seq2seq task")
        model = HFSeq2Seq(path, finetune, r, alpha, target_modules)
        vocab = int(model.config.vocab_size)
        big = [t.name for t in tasks if t.num_classes > vocab]
        if big:
            raise PolytaskError(f"task {big[0]!r} has a vocabulary larger than the model's ({vocab}); tokenise the "
                                "suite with the model's tokenizer (suite option tokenizer=<model folder>)")
        super().__init__(tasks, input_spec, model)
        self.generate = generate
        self.vocab_size = vocab
        self.start = int(model.config.decoder_start_token_id)
        self.end = int(model.config.eos_token_id)
        self.pad = int(model.config.pad_token_id if model.config.pad_token_id is not None else self.end)

    def _inputs(self, x: Inputs) -> tuple[Tensor, Tensor, Tensor]:
        if not isinstance(x, dict) or not {"input_ids", "attention_mask", "target_ids"} <= set(x):
            raise PolytaskError("architecture 'seq2seq-lm' takes a dict with input_ids, attention_mask and target_ids "
                                "(a text-to-text suite such as wordnet-instruct)")
        ids, mask = x["input_ids"], x["attention_mask"]
        if ids.numel() and int(ids.max()) >= self.vocab_size:
            raise PolytaskError(f"token id {int(ids.max())} is outside the model's vocabulary ({self.vocab_size}); "
                                "tokenise the suite with the model's tokenizer (suite option tokenizer=<model folder>)")
        length = max(int(mask.sum(1).max()), 1) if mask.numel() else 1  # right padding
        return ids[:, :length], mask[:, :length], x["target_ids"]

    def forward(self, x: Inputs) -> dict[str, Tensor]:
        ids, mask, targets = self._inputs(x)
        lm = self.backbone.lm
        if self.training or not self.generate:
            decoder_in = torch.cat([targets.new_full((len(targets), 1), self.start), targets[:, :-1]], 1)
            embeds = self.boundary(lm.get_input_embeddings()(ids))
            logits = self.backbone.net(inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=decoder_in).logits
        else:
            logits = self.generated_logits(ids, mask, targets.shape[1])
        return {t: logits for t in self.task_names}

    def generated_logits(self, ids: Tensor, mask: Tensor, length: int) -> Tensor:
        """[B, length, V] logits of greedy decoding; after a sequence's end token its last step repeats."""
        out = self.backbone.lm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=length, do_sample=False,
                                        num_beams=1, output_logits=True, return_dict_in_generate=True,
                                        pad_token_id=self.pad,
                                        eos_token_id=self.end, decoder_start_token_id=self.start)
        steps = torch.stack(out.logits, 1).float()  # [B, n, V], n <= length
        tokens = out.sequences[:, -steps.shape[1]:]
        n = steps.shape[1]
        is_end = tokens == self.end
        first_end = torch.where(is_end.any(1), is_end.float().argmax(1), torch.full_like(is_end[:, 0], n - 1,
                                                                                           dtype=torch.long))
        src = torch.minimum(torch.arange(length, device=ids.device)[None], first_end[:, None]).clamp(max=n - 1)
        return steps.gather(1, src[..., None].expand(-1, -1, steps.shape[-1]))


def save_tiny_t5(folder: str | os.PathLike[str], tokenizer: str | None = None, d_model: int = 64, layers: int = 2,
                 heads: int = 4, d_ff: int = 128, seed: int = 0) -> Path:
    """A randomly initialised T5 (``T5Config``, tiny sizes) over ``tokenizer``'s vocabulary (MiniLM's
    WordPiece by default), saved with that tokenizer to ``folder``: pad is the decoder start token,
    the tokenizer's eos (else sep) token ends a sequence, as the wordnet-instruct suite writes them."""
    from transformers import T5Config, T5ForConditionalGeneration

    from polytask.data.wordnet_tags import text_tokenizer

    _hf_quiet()
    tok, _ = text_tokenizer(tokenizer, "save_tiny_t5")
    end = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
    torch.manual_seed(seed)
    config = T5Config(vocab_size=len(tok), d_model=d_model, d_kv=d_model // heads, d_ff=d_ff, num_layers=layers,
                      num_decoder_layers=layers, num_heads=heads, dropout_rate=0.0, pad_token_id=tok.pad_token_id,
                      eos_token_id=end, decoder_start_token_id=tok.pad_token_id)
    folder = Path(folder)
    T5ForConditionalGeneration(config).save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder
