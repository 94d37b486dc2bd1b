"""Tiny Hugging Face encoders built from a config and saved locally (offline, a few hundred kB)."""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = ("the a dog cat bird fish runs sleeps eats sings big small red blue happy old tree house river "
         "sky book pen cup car and of to in on is was ##s ##ing ##ed").split()
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]


def tiny_bert(folder: Path, seed: int = 0, hidden: int = 32, layers: int = 2) -> Path:
    """A 2-layer 32-d BERT with random weights and a WordPiece tokenizer over :data:`VOCAB`, saved to ``folder``."""
    from transformers import BertConfig, BertModel, BertTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    folder = Path(folder)
    BertTokenizer(vocab={w: i for i, w in enumerate(VOCAB)}).save_pretrained(str(folder))
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(VOCAB), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=2 * hidden, max_position_embeddings=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    BertModel(config).save_pretrained(str(folder))
    return folder


def token_inputs(batch: int, seq_len: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random ids of :data:`VOCAB` words between [CLS] and [SEP], right padded to ``seq_len``."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, seq_len + 1, (batch,), generator=g)
    lengths[0] = seq_len
    ids = torch.randint(5, len(VOCAB), (batch, seq_len), generator=g)
    ids[:, 0] = 2
    pos = torch.arange(seq_len)[None]
    ids[pos == (lengths[:, None] - 1)] = 3
    mask = (pos < lengths[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask}
