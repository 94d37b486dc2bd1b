"""Token classification on WordNet's usage examples (Debian ``wordnet-base``; Miller, "WordNet: A
Lexical Database for English", CACM 1995).

Each of the 48,339 quoted usage examples in the WordNet 3.0 glosses is one sentence, split into
words and punctuation marks; every word gets labels for three tasks on the same tokens:

* ``headword`` (2 classes, every word): whether the word is the synset's lemma the example
  illustrates ("the *dog* barked all night" for dog.n.01), found through morphy's exception
  lists and detachment rules (morphy(7WN)), so inflected forms (``barked``, ``ran``) count;
  multi-word lemmas mark every word of the span;
* ``pos`` (noun, verb, adj, adv; labelled on the headword's words only, ``IGNORE`` elsewhere):
  the synset's part of speech, i.e. the headword's part of speech in this very sentence;
* ``lexpos`` (noun, verb, adj, adv, other; every word): the word's most frequent part of speech
  in WordNet (most senses tagged in the semantic concordances, then most senses), ``other`` for
  words WordNet does not list (function words, numbers, punctuation): a context-free lexicon tag.

In 1,094 examples the lemma is not found (derived or irregular forms morphy does not know): those
samples carry no ``headword`` and ``pos`` labels (masked), only ``lexpos``. Inputs are the
tokenizer's sub-words (MiniLM's WordPiece unless ``tokenizer=`` names a local Hugging Face
tokenizer folder); a word's labels sit on its first sub-word, ``IGNORE`` (-100) on the others, on
special tokens and on padding. The split is a seeded 70/15/15 over synsets (no synset's examples
appear in two splits).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from polytask.data._sources import assemble, cached_arrays, seeded_splits, shrink, wordnet_files
from polytask.data._wordnet_lex import POS_FILES, WORD, Synset, base_forms, exceptions, sense_counts, synsets
from polytask.errors import PolytaskError
from polytask.kinds import IGNORE
from polytask.registry import SUITES
from polytask.sources import fingerprint, minilm_dir, require_module
from polytask.tasks import InputSpec, Task, TaskSuite

LEXPOS = (*POS_FILES, "other")


def text_tokenizer(path: str | None, needed_by: str) -> tuple[Any, Path]:
    """``AutoTokenizer.from_pretrained`` of the local folder ``path`` (MiniLM's when None) and the folder."""
    folder = Path(path) if path else minilm_dir(needed_by, source="minilm-tokenizer")
    if not folder.is_dir():
        raise PolytaskError(f"tokenizer= must be a local folder with a Hugging Face tokenizer, not {str(path)!r}")
    require_module("transformers", "minilm", needed_by)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True), folder


def headword_span(words: Sequence[str], synset: Synset, exc: dict[str, dict[str, tuple[str, ...]]]) -> list[bool]:
    """Per word: part of one of ``synset``'s lemmas (each lemma word equal to a morphy base form)."""
    forms = [base_forms(w, synset.pos, exc) for w in words]
    hit = [False] * len(words)
    for lemma in synset.lemmas:
        parts = lemma.split()
        for i in range(len(words) - len(parts) + 1):
            if all(p in forms[i + j] for j, p in enumerate(parts)):
                hit[i:i + len(parts)] = [True] * len(parts)
    return hit


def lexicon_pos(word: str, exc: dict[str, dict[str, tuple[str, ...]]],
                counts: dict[str, dict[str, tuple[int, int]]]) -> int:
    """Index in :data:`LEXPOS` of ``word``'s most frequent WordNet part of speech (``other`` if unlisted)."""
    best, best_count = len(POS_FILES), (-1, -1)
    for k, pos in enumerate(POS_FILES):
        for form in base_forms(word, pos, exc):
            count = counts[pos].get(form)
            if count is not None and count > best_count:
                best, best_count = k, count
    return best


def _build(rows: Sequence[tuple[int, str]], seq_len: int, tokenizer: Any, need: str) -> dict[str, np.ndarray]:
    """Token ids and the three tasks' labels of the (synset number, example) ``rows``."""
    table, exc, counts = synsets(need), exceptions(need), sense_counts(need)
    words = [WORD.findall(example) for _, example in rows]
    hits = [headword_span(w, table[s], exc) for w, (s, _) in zip(words, rows)]
    enc = tokenizer(words, is_split_into_words=True, padding="max_length", truncation=True, max_length=seq_len)
    labels = {t: np.full((len(rows), seq_len), IGNORE, dtype=np.int16) for t in ("headword", "pos", "lexpos")}
    lex_cache: dict[str, int] = {}
    for r, ((s, _), hit) in enumerate(zip(rows, hits)):
        found, prev = any(hit), None
        for j, w in enumerate(enc.word_ids(r)):
            if w is None or w == prev:  # special tokens, padding and sub-words after a word's first
                prev = w
                continue
            prev = w
            word = words[r][w].lower()
            if word not in lex_cache:
                lex_cache[word] = lexicon_pos(word, exc, counts)
            labels["lexpos"][r, j] = lex_cache[word]
            if found:
                labels["headword"][r, j] = int(hit[w])
                if hit[w]:
                    labels["pos"][r, j] = POS_FILES.index(table[s].pos)
    return {"input_ids": np.asarray(enc["input_ids"], dtype=np.int32),
            "attention_mask": np.asarray(enc["attention_mask"], dtype=np.uint8),
            "found": np.array([any(h) for h in hits]), **labels}


@SUITES.register("wordnet-tags")
def wordnet_tags(*, seed: int = 0, subset: int | None = None, seq_len: int = 48, tokenizer: str | None = None,
                 tasks: list[str] | None = None) -> TaskSuite:
    """WordNet usage examples, 48,339 sentences: per-word headword (2), its part of speech (4), lexicon POS (5)."""
    need = "suite 'wordnet-tags'"
    if seq_len < 8:
        raise PolytaskError(f"seq_len must be at least 8 tokens, not {seq_len}")
    tok, folder = text_tokenizer(tokenizer, need)
    if not tok.is_fast:
        raise PolytaskError(f"suite 'wordnet-tags' aligns labels with words through a fast tokenizer; {folder} has "
                            "no tokenizer.json (save the tokenizer with a recent transformers to write one)")
    rows = [(s, example) for s, syn in enumerate(synsets(need)) for example in syn.examples]
    synset_of = torch.tensor([s for s, _ in rows])
    groups = seeded_splits(len(synsets(need)), 0.15, 0.15, seed)
    split_of = torch.zeros(len(synsets(need)), dtype=torch.long)
    for k, g in enumerate(groups):
        split_of[g] = k
    idx = shrink([torch.nonzero(split_of[synset_of] == k).squeeze(1) for k in range(3)], subset, seed)
    used = torch.cat(idx).sort().values
    where = torch.full((len(rows),), -1, dtype=torch.long)
    where[used] = torch.arange(len(used))
    files = sorted(folder.glob("tokenizer*.json")) + sorted(folder.glob("vocab*"))
    key = fingerprint("wordnet-tags", 1, *wordnet_files(need), seq_len, str(folder), *files,
                      hashlib.sha256(used.numpy().tobytes()).hexdigest()[:16])
    arrays = cached_arrays("wordnet-tags", key, lambda: _build([rows[i] for i in used.tolist()], seq_len, tok, need))
    a = {k: torch.from_numpy(v.astype(np.int64) if v.dtype != bool else v) for k, v in arrays.items()}
    task_list = [Task("headword", "token", num_classes=2), Task("pos", "token", num_classes=len(POS_FILES)),
                 Task("lexpos", "token", num_classes=len(LEXPOS))]
    return assemble("wordnet-tags", task_list, InputSpec("tokens", seq_len=seq_len),
                    {"input_ids": a["input_ids"], "attention_mask": a["attention_mask"]},
                    {t.name: a[t.name] for t in task_list}, [where[i] for i in idx], __doc__,
                    masks={"headword": a["found"], "pos": a["found"]}, task_names=tasks)
