"""Fortune cookies by topic (the BSD ``fortune`` databases), from Debian ``fortunes``.

Entries of ten topic files in ``/usr/share/games/fortunes`` (an entry ends at a line holding
``%``): computers, education, food, law, love, medicine, pets, politics, science and sports,
3,409 texts in all (``topics`` picks other files). Tasks on the same text: ``topic`` (which file
it came from) and ``length``, a regression on log(1 + number of words), standardised with the
training split's mean and deviation. Inputs are MiniLM WordPiece tokens truncated to
``seq_len`` (128); the split is a seeded 70/15/15.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from polytask.data._sources import FORTUNES_DIR, assemble, seeded_splits, shrink, tokenize_used
from polytask.data._sources import fortunes as read_fortunes
from polytask.errors import PolytaskError
from polytask.registry import SUITES
from polytask.sources import fingerprint
from polytask.tasks import InputSpec, Task, TaskSuite

TOPICS = ("computers", "education", "food", "law", "love", "medicine", "pets", "politics", "science", "sports")


@SUITES.register("fortunes")
def fortunes(*, seed: int = 0, subset: int | None = None, topics: Sequence[str] = TOPICS, seq_len: int = 128,
             tasks: list[str] | None = None, features: str | None = None) -> TaskSuite:
    """Fortune cookies (Debian fortunes), 3,409 texts in ten topics: tasks topic (10) and length (regression)."""
    need = "suite 'fortunes'"
    topics = list(dict.fromkeys(topics))
    if len(topics) < 2:
        raise PolytaskError(f"fortunes needs at least two topics to classify, not {topics}")
    texts, labels = read_fortunes(topics, need)
    topic = torch.tensor([topics.index(t) for t in labels])
    words = torch.tensor([math.log1p(len(t.split())) for t in texts])
    idx = shrink(seeded_splits(len(texts), 0.15, 0.15, seed), subset, seed)
    mean, std = words[idx[0]].mean(), words[idx[0]].std().clamp(min=1e-6)
    x, idx, used = tokenize_used(texts, idx, seq_len, fingerprint("fortunes", *[FORTUNES_DIR / t for t in topics]), need)
    return assemble("fortunes", [Task("topic", "multiclass", num_classes=len(topics)), Task("length", "regression")],
                    InputSpec("tokens", seq_len=seq_len), x, {"topic": topic[used], "length": ((words - mean) / std)[used]}, idx,
                    __doc__, task_names=tasks, features=features)
