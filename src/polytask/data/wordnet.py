"""WordNet definitions (Miller, "WordNet: A Lexical Database for English", CACM 1995), from Debian ``wordnet-base``.

Every synset of WordNet 3.0 (117,659) gives one text, its definition: the gloss in
``/usr/share/wordnet/data.{noun,verb,adj,adv}`` up to its first quoted usage example. Two tasks
on the same text: ``pos``, the part of speech (noun, verb, adj incl. satellites, adv), and
``topic``, the lexicographer file the synset was filed under (45 classes such as
``noun.animal`` or ``verb.motion``; it refines ``pos``, so the tasks are nested). Options
``pos`` and ``topics`` keep only some parts of speech or lexicographer files (topic classes are
renumbered in ``WORDNET_LEXNAMES`` order). Inputs are MiniLM WordPiece tokens (``seq_len``
64 covers 99.9% of definitions untruncated); the split is a seeded 70/15/15.
"""

from __future__ import annotations

from typing import Sequence

import torch

from polytask.data._sources import (WORDNET_LEXNAMES, assemble, seeded_splits, shrink, tokenize_used, wordnet_files,
                                   wordnet_glosses)
from polytask.errors import PolytaskError
from polytask.registry import SUITES
from polytask.sources import fingerprint
from polytask.tasks import InputSpec, Task, TaskSuite

POS = ("noun", "verb", "adj", "adv")


@SUITES.register("wordnet")
def wordnet(*, seed: int = 0, subset: int | None = None, pos: Sequence[str] | None = None,
            topics: Sequence[str] | None = None, seq_len: int = 64, tasks: list[str] | None = None,
            features: str | None = None) -> TaskSuite:
    """WordNet 3.0 definitions (Debian wordnet-base), 117,659 texts: tasks part of speech (4) and topic (45)."""
    need = "suite 'wordnet'"
    texts, text_pos, lex = wordnet_glosses(need)
    bad = [p for p in (pos or ()) if p not in POS] or [t for t in (topics or ()) if t not in WORDNET_LEXNAMES]
    if bad:
        raise PolytaskError(f"wordnet has no part of speech or topic {bad[0]!r}; parts of speech: {', '.join(POS)}; "
                            f"topics: {', '.join(WORDNET_LEXNAMES)}")
    keep = [i for i in range(len(texts)) if (pos is None or text_pos[i] in pos) and (topics is None or lex[i] in topics)]
    if len(keep) < 3:
        raise PolytaskError(f"only {len(keep)} definitions match pos={pos} and topics={topics}; widen the selection")
    pos_names = [p for p in POS if any(text_pos[i] == p for i in keep)]
    topic_names = [t for t in WORDNET_LEXNAMES if t in {lex[i] for i in keep}]
    y_pos = torch.tensor([pos_names.index(text_pos[i]) for i in keep])
    y_topic = torch.tensor([topic_names.index(lex[i]) for i in keep])
    idx = shrink(seeded_splits(len(keep), 0.15, 0.15, seed), subset, seed)
    x, idx, used = tokenize_used([texts[i] for i in keep], idx, seq_len, fingerprint("wordnet", *wordnet_files(need)), need)
    task_list = [Task("pos", "multiclass", num_classes=len(pos_names)) if len(pos_names) > 1 else None,
                 Task("topic", "multiclass", num_classes=len(topic_names)) if len(topic_names) > 1 else None]
    present = [t for t in task_list if t is not None]
    if not present:
        raise PolytaskError("the selection leaves one part of speech and one topic: nothing to classify; widen pos or topics")
    labels = {"pos": y_pos[used], "topic": y_topic[used]}
    return assemble("wordnet", present, InputSpec("tokens", seq_len=seq_len), x,
                    {t.name: labels[t.name] for t in present}, idx, __doc__,
                    task_names=tasks, features=features)
