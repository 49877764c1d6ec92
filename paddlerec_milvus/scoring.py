"""Scoring a model on held-out users: recall each user's interests through an index, then
average the metrics. Validation (exact search, every epoch) and evaluation (``infer.py``,
Milvus) both score through here; so does the most-popular baseline every model must beat."""

from __future__ import annotations

import contextvars
import logging
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from tqdm import tqdm

from .metrics import hitrate_at_n, ndcg_at_n, paddlerec_ndcg_at_n, recall_at_n
from .model_dir import create_reader, data_files
from .recall import ExactIndex, recall_top_k
from .towers import indexed_items, user_interests, user_tower

logger = logging.getLogger(__name__)


def cutoffs_for(top_n: int) -> list[int]:
    """The cutoffs reported: top_n, and 20 beside it when top_n is larger."""
    return sorted({top_n, 20} if top_n >= 20 else {top_n})[::-1]


def score_users(recalled: list[list[int]], truths: list[list[int]], cutoffs: list[int],
                paddlerec_metrics: bool = False) -> dict[str, float]:
    """Average each metric over users, at each cutoff."""
    out: dict[str, float] = {}
    for n in cutoffs:
        fns = [("Recall", recall_at_n), ("NDCG", ndcg_at_n), ("HitRate", hitrate_at_n)]
        if paddlerec_metrics:
            fns.append(("PaddleRecNDCG", paddlerec_ndcg_at_n))
        for name, fn in fns:
            out[f"{name}@{n}"] = float(np.mean([fn(r, t, n) for r, t in zip(recalled, truths)])) \
                if truths else 0.0
    return out


def interests_of(tower, reader, batch_size: int, progress: bool = True
                 ) -> tuple[list[np.ndarray], list[list[int]]]:
    """Every user's interests ([B, K, D] per batch of ``batch_size``) and eval items, in order."""
    batches, truths = [], []
    for _users, hist, seq_len, evals in tqdm(reader.iter_batches(batch_size),
                                             total=-(-len(reader) // batch_size),
                                             desc="interests", unit=" batch",
                                             disable=None if progress else True):
        batches.append(user_interests(tower, hist, seq_len))
        truths.extend(evals)
    return batches, truths


def score_checkpoint(config: dict[str, Any], dm, model, reader, index, top_n: int,
                     paddlerec_metrics: bool = False, progress: bool = True,
                     workers: int | None = None) -> tuple[dict[str, float], int]:
    """Fill ``index`` with the model's items (it must be empty or disposable: the caller checks),
    recall every user of ``reader`` through it and score them; returns (metrics, users)."""
    t0 = time.perf_counter()
    ids, vecs = indexed_items(dm, model)
    tower = user_tower(dm, model)
    k = max(top_n, 20)
    batch_size = int(config.get("runner.infer_batch_size", 256) or 256)
    # Every vector changes between checkpoints: a fresh collection is faster to fill and to
    # search than one whose rows were all replaced, and holds nothing but this checkpoint's items.
    # A server flushes, indexes and loads it for seconds: the interests are computed meanwhile.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="refill") as filler:
        filled = filler.submit(contextvars.copy_context().run, index.refill, ids, vecs)
        batches, truths = interests_of(tower, reader, batch_size, progress)
        filled.result()
    t1 = time.perf_counter()
    # Milvus: two searches in flight, so one batch's merge overlaps the other's search. Exact numpy
    # search is CPU-bound here: one worker is faster (3.4 s against 3.9 s for the amazon-book-1m
    # validation users) and holds less memory.
    if workers is None:
        workers = 1 if isinstance(index, ExactIndex) else 2
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="recall") as pool:
        pending = [pool.submit(recall_top_k, index, interests, k) for interests in batches]
        recalled = [r.ids for f in pending for r in f.result()]
    t2 = time.perf_counter()
    scores = score_users(recalled, truths, cutoffs_for(top_n), paddlerec_metrics)
    logger.log(logging.INFO if progress else logging.DEBUG,
               "%d items indexed (and interests computed) in %.2f s; %d users recalled in %.2f s; "
               "scored in %.2f s",
               len(ids), t1 - t0, len(truths), t2 - t1, time.perf_counter() - t2)
    return scores, len(truths)


def most_popular(config: dict[str, Any], n: int) -> list[int]:
    """The n most clicked training items (ties by id)."""
    counts: Counter[int] = Counter()
    for path in data_files(config, "runner.train_data_dir"):
        with open(path, encoding="utf-8") as f:
            counts.update(int(line.split(",")[1]) for line in f if line.strip())
    return [item for item, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n]]


def score_popularity(config: dict[str, Any], top_n: int = 50, split: str = "test",
                     reader=None) -> dict[str, float]:
    """Most-popular recall scored on the users of ``split`` (or of ``reader``) like a model."""
    reader = reader if reader is not None else create_reader(config, split)
    ranked = most_popular(config, max(top_n, 20))
    truths = [e for *_, evals in reader.iter_batches() for e in evals]
    return score_users([ranked] * len(truths), truths, cutoffs_for(top_n))
