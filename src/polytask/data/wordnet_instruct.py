"""Instruction-style text-to-text tasks built from WordNet 3.0 (Debian ``wordnet-base``; Miller,
"WordNet: A Lexical Database for English", CACM 1995), in the spirit of Natural Instructions
(Mishra et al., "Cross-Task Generalization via Natural Language Crowdsourcing Instructions",
ACL 2022): every task is phrased as an instruction in the input text, and one text-to-text model
answers all of them.

* ``define``: "Which word has this meaning? <definition>" -> the synset's first lemma;
* ``hypernym``: "Name a more general word for: <lemma>" -> the first lemma of its first hypernym
  (``@`` or ``@i`` pointer);
* ``antonym``: "Give a word with the opposite meaning: <word>" -> its antonym (``!`` pointers
  between words; 7,106 distinct pairs);
* ``reverse``: "Write these words in reverse order: <3-5 words of a definition>" -> the same
  words reversed (a pure sequence-manipulation task next to the three lexical ones).

Each sample belongs to one task (``per_task`` seeded draws per task; the other tasks' labels are
masked); pairs whose target does not fit in ``target_len`` - 1 tokens are skipped. Inputs are the
tokenizer's ids of the instruction text (MiniLM's WordPiece unless ``tokenizer=`` names a local
Hugging Face tokenizer folder) plus ``target_ids``, the target's ids padded with the pad id, which
a text-to-text architecture shifts right for teacher forcing. Labels
are the target's ids followed by the end token (the tokenizer's eos, else its sep token), then
``IGNORE`` (-100). Every task is ``seq2seq`` over the tokenizer's vocabulary; each task's samples are split
70/15/15 (seeded).
"""

from __future__ import annotations

import hashlib
from typing import Any, Sequence

import numpy as np
import torch

from polytask.data._sources import assemble, cached_arrays, seeded_splits, shrink, wordnet_files
from polytask.data._wordnet_lex import WORD, Synset, pointers, synsets
from polytask.data.wordnet_tags import text_tokenizer
from polytask.errors import PolytaskError
from polytask.kinds import IGNORE
from polytask.registry import SUITES
from polytask.sources import fingerprint
from polytask.tasks import InputSpec, Task, TaskSuite

INSTRUCTIONS = {
    "define": "Which word has this meaning? {}",
    "hypernym": "Name a more general word for: {}",
    "antonym": "Give a word with the opposite meaning: {}",
    "reverse": "Write these words in reverse order: {}",
}


def task_pairs(table: Sequence[Synset], seed: int, n: int) -> dict[str, list[tuple[str, str]]]:
    """Up to ``n`` (input, target) pairs per task drawn at random (the instruction is put around the
    input later); antonym pairs are distinct (word, antonym) pairs."""
    g = np.random.default_rng(seed)
    where = {(s.pos, s.offset): s for s in table}

    def draw(items: Sequence[Any]) -> list[Any]:
        return [items[i] for i in sorted(g.permutation(len(items))[:n].tolist())]

    hyper = []
    for s in draw([s for s in table if "@" in s.pointer_fields or "@i" in s.pointer_fields]):
        offset, pos, _, _ = (pointers(s, "@") + pointers(s, "@i"))[0]
        hyper.append((s.lemmas[0], where[pos, offset].lemmas[0]))
    anto = {(s.lemmas[src - 1], where[pos, offset].lemmas[dst - 1]): None
            for s in table if "!" in s.pointer_fields for offset, pos, src, dst in pointers(s, "!")}
    reverse = []
    for i in g.permutation(len(table)).tolist():
        words = [w for w in WORD.findall(table[i].definition.lower()) if w.isalpha()]
        if len(words) >= 3:
            k = int(g.integers(3, min(5, len(words)) + 1))
            start = int(g.integers(0, len(words) - k + 1))
            reverse.append((" ".join(words[start:start + k]), " ".join(reversed(words[start:start + k]))))
            if len(reverse) == n:
                break
    return {"define": [(s.definition, s.lemmas[0]) for s in draw(table)], "hypernym": hyper,
            "antonym": draw(list(anto)), "reverse": reverse}


def encode(tokenizer: Any, texts: Sequence[str], targets: Sequence[str], seq_len: int,
           target_len: int) -> dict[str, np.ndarray]:
    """Input ids and mask [N, seq_len]; ``target_ids`` (pad-padded) and ``labels`` (end token, then
    ``IGNORE``) [N, target_len]."""
    enc = tokenizer(list(texts), padding="max_length", truncation=True, max_length=seq_len)
    end = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    if end is None or tokenizer.pad_token_id is None:
        raise PolytaskError("the tokenizer has no end (eos or sep) or pad token; use a tokenizer that has both")
    out = tokenizer(list(targets), add_special_tokens=False, truncation=True, max_length=target_len - 1)["input_ids"]
    labels = np.full((len(targets), target_len), IGNORE, dtype=np.int32)
    for i, ids in enumerate(out):
        labels[i, :len(ids) + 1] = [*ids, end]
    return {"input_ids": np.asarray(enc["input_ids"], dtype=np.int32),
            "attention_mask": np.asarray(enc["attention_mask"], dtype=np.uint8),
            "target_ids": np.where(labels == IGNORE, tokenizer.pad_token_id, labels).astype(np.int32),
            "labels": labels}


@SUITES.register("wordnet-instruct")
def wordnet_instruct(*, seed: int = 0, per_task: int = 2000, subset: int | None = None, seq_len: int = 48,
                     target_len: int = 12, tokenizer: str | None = None, tasks: list[str] | None = None) -> TaskSuite:
    """WordNet as instructions, text to text: tasks define, hypernym, antonym and reverse (seq2seq)."""
    need = "suite 'wordnet-instruct'"
    if per_task < 7 or seq_len < 8 or target_len < 2:
        raise PolytaskError(f"per_task must be >= 7 (one validation and one test sample per task), seq_len >= 8 "
                            f"and target_len >= 2, not {per_task}, {seq_len}, {target_len}")
    tok, folder = text_tokenizer(tokenizer, need)
    files = sorted(folder.glob("tokenizer*.json")) + sorted(folder.glob("vocab*"))
    key = fingerprint("wordnet-instruct", 2, *wordnet_files(need), seed, per_task, seq_len, target_len, str(folder),
                      *files)

    def build() -> dict[str, np.ndarray]:
        texts, targets, task_of = [], [], []
        for k, (name, pairs) in enumerate(task_pairs(synsets(need), seed, 2 * per_task).items()):
            lengths = [len(ids) for ids in tok([t for _, t in pairs], add_special_tokens=False)["input_ids"]]
            fit = [pair for pair, n in zip(pairs, lengths) if n < target_len][:per_task]
            texts += [INSTRUCTIONS[name].format(source) for source, _ in fit]
            targets += [target for _, target in fit]
            task_of += [k] * len(fit)
        return {**encode(tok, texts, targets, seq_len, target_len), "task": np.array(task_of, dtype=np.int8)}

    a = {k: torch.from_numpy(v.astype(np.int64)) for k, v in cached_arrays("wordnet-instruct", key, build).items()}
    names = list(INSTRUCTIONS)
    n_vocab = len(tok)
    task_list = [Task(name, "seq2seq", num_classes=n_vocab) for name in names]
    labels = {name: torch.where((a["task"] == k)[:, None], a["labels"], IGNORE) for k, name in enumerate(names)}
    masks = {name: a["task"] == k for k, name in enumerate(names)}
    per = [torch.nonzero(a["task"] == k).squeeze(1) for k in range(len(names))]  # split each task 70/15/15
    parts = [[rows[i] for i in seeded_splits(len(rows), 0.15, 0.15, seed + k)] for k, rows in enumerate(per)]
    idx = shrink([torch.cat([p[j] for p in parts]).sort().values for j in range(3)], subset, seed)
    x = {k: a[k] for k in ("input_ids", "attention_mask", "target_ids")}
    return assemble("wordnet-instruct", task_list, InputSpec("tokens", seq_len=seq_len), x, labels, idx, __doc__,
                    masks=masks, task_names=tasks)
