"""Scoring a model on held-out users: recall each user's interests through an index, then
average the metrics. Validation (exact search, every epoch) and evaluation (``infer.py``,
Milvus) both score through here; so does the most-popular baseline every model must beat."""

from __future__ import annotations

import contextvars
import logging
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm import tqdm

from .metrics import hitrate_at_n, ndcg_at_n, paddlerec_ndcg_at_n, recall_at_n
from .model_dir import create_reader, data_files
from .recall import (
    ExactIndex,
    HistoryHits,
    UserRecall,
    history_hits,
    latest_clicks,
    merge_interest_hits,
    merge_rows,
)
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


def interests_of(tower, reader, batch_size: int, progress: bool = True, history_len: int | None = None
                 ) -> tuple[list[np.ndarray], list[list[int]]]:
    """Every user's interests ([B, K, D] per batch of ``batch_size``) and eval items, in order."""
    batches, _histories, truths = user_batches(tower, reader, batch_size, progress, history_len)
    return batches, truths


def user_batches(tower, reader, batch_size: int, progress: bool = True, history_len: int | None = None
                 ) -> tuple[list[np.ndarray], list[list[list[int]]], list[list[int]]]:
    """Per batch of ``batch_size`` users: interests [B, K, D] (from each user's latest
    ``history_len`` clicks; None = all the reader gives) and histories (the reader's, up to
    maxlen: what the history bonus raises); and every user's eval items, in order."""
    batches, histories, truths = [], [], []
    for _users, hist, seq_len, evals in tqdm(reader.iter_batches(batch_size),
                                             total=-(-len(reader) // batch_size),
                                             desc="interests", unit=" batch",
                                             disable=None if progress else True):
        batches.append(user_interests(tower, *latest_clicks(hist, seq_len, history_len)))
        lens = np.asarray(seq_len).reshape(-1)
        histories.append([[int(x) for x in row[:n] if x > 0] for row, n in zip(np.asarray(hist), lens)])
        truths.extend(evals)
    return batches, histories, truths


# The grid ``recall.history_bonus: auto`` chooses from on the validation split, in units of the
# users' mean score spread over their top-N list (first minus N-th score). 8 spreads put every
# history item first in practice.
BONUS_STEPS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


@dataclass
class Recalled:
    """Every user's search hits ([B, K x k] per batch) and scored history items, unmerged: one
    search serves every history bonus tried."""

    k: int
    ids: list[np.ndarray]
    scores: list[np.ndarray]
    hits: list[list[HistoryHits] | None]
    truths: list[list[int]]

    def lists(self, bonus: float = 0.0) -> list[UserRecall]:
        out = []
        for ids, scores, hits in zip(self.ids, self.scores, self.hits):
            n = len(ids)
            out.extend(merge_rows(ids, scores, [self.k] * n, [()] * n, hits if bonus else None, bonus))
        return out

    def boosted_top(self, steps: Sequence[float]) -> Iterator[tuple[float, np.ndarray]]:
        """Per step (in units of the users' mean first-minus-k-th score with no bonus), the bonus
        and every user's top-k ids at it ([users, k],
        0 = none), as ``lists`` ranks them, with one merge per user for all the steps: the plain
        list (k + |history| long, history items taken out) and the scored history items, padded
        into matrices and re-ranked per step."""
        cand_ids, cand_scores, hist_ids, hist_scores, gaps = [], [], [], [], []
        for ids, scores, hits in zip(self.ids, self.scores, self.hits):
            for u in range(len(ids)):
                h_ids, h_scores = hits[u] if hits is not None else (np.empty(0, np.int64), np.empty(0))
                plain = merge_interest_hits(ids[u], scores[u], self.k + len(h_ids))
                if len(plain.scores) >= self.k:
                    gaps.append(plain.scores[0] - plain.scores[self.k - 1])
                keep = ~np.isin(plain.ids, h_ids)
                cand_ids.append(np.asarray(plain.ids, dtype=np.int64)[keep][:self.k])
                cand_scores.append(np.asarray(plain.scores, dtype=np.float64)[keep][:self.k])
                hist_ids.append(np.asarray(h_ids, dtype=np.int64))
                hist_scores.append(np.asarray(h_scores, dtype=np.float64))
        ids = np.concatenate([_pad(cand_ids, 0), _pad(hist_ids, 0)], axis=1)
        c_scores, h_scores = _pad(cand_scores, -np.inf), _pad(hist_scores, -np.inf)
        unit = float(np.mean(gaps)) if gaps else 0.0
        for step in steps:
            if step and unit <= 0:
                return
            bonus = step * unit
            scores = np.concatenate([c_scores, h_scores + bonus], axis=1)
            order = np.lexsort((ids, -scores), axis=1)[:, :self.k]
            top = np.take_along_axis(ids, order, axis=1)
            top[np.isneginf(np.take_along_axis(scores, order, axis=1))] = 0
            yield bonus, top


def _pad(rows: list[np.ndarray], fill: float) -> np.ndarray:
    width = max((len(r) for r in rows), default=0)
    out = np.full((len(rows), width), fill, dtype=np.int64 if fill == 0 else np.float64)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


def recall_users(config: dict[str, Any], dm, model, reader, index, k: int, progress: bool = True,
                 workers: int | None = None, with_history: bool = False,
                 history_len: int | None = None) -> Recalled:
    """Fill ``index`` with the model's items (it must be empty or disposable: the caller checks)
    and search every user of ``reader`` for ``k`` items per interest."""
    t0 = time.perf_counter()
    ids, vecs = indexed_items(dm, model)
    tower = user_tower(dm, model)
    batch_size = int(config.get("runner.infer_batch_size", 256) or 256)
    # Every vector changes between checkpoints: a fresh collection is faster to fill and to
    # search than one whose rows were all replaced, and holds nothing but this checkpoint's items.
    # A server flushes, indexes and loads it for seconds: the interests are computed meanwhile.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="refill") as filler:
        filled = filler.submit(contextvars.copy_context().run, index.refill, ids, vecs)
        batches, histories, truths = user_batches(tower, reader, batch_size, progress, history_len)
        filled.result()
    t1 = time.perf_counter()

    def search(interests: np.ndarray, hist: list[list[int]]):
        found = index.search_vectors(interests.reshape(-1, interests.shape[-1]), k)
        hits = history_hits(index, interests, hist) if with_history else None
        n = len(interests)
        return found[0].reshape(n, -1), found[1].reshape(n, -1), hits

    # Milvus: two searches in flight, so one batch's merge overlaps the other's search. Exact numpy
    # search is CPU-bound here: one worker is faster (3.4 s against 3.9 s for the amazon-book-1m
    # validation users) and holds less memory.
    if workers is None:
        workers = 1 if isinstance(index, ExactIndex) else 2
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="recall") as pool:
        done = [f.result() for f in [pool.submit(search, b, h) for b, h in zip(batches, histories)]]
    logger.log(logging.INFO if progress else logging.DEBUG,
               "%d items indexed (and interests computed) in %.2f s; %d users searched in %.2f s",
               len(ids), t1 - t0, len(truths), time.perf_counter() - t1)
    return Recalled(k, [d[0] for d in done], [d[1] for d in done], [d[2] for d in done], truths)


def score_checkpoint(config: dict[str, Any], dm, model, reader, index, top_n: int,
                     paddlerec_metrics: bool = False, progress: bool = True,
                     workers: int | None = None, history_bonus: float = 0.0,
                     history_len: int | None = None) -> tuple[dict[str, float], int]:
    """Recall every user of ``reader`` through ``index`` (filled with the model's items; see
    ``recall_users``), ranking their own history items ``history_bonus`` higher, and score them;
    returns (metrics, users)."""
    rec = recall_users(config, dm, model, reader, index, max(top_n, 20), progress, workers,
                       with_history=history_bonus > 0, history_len=history_len)
    t0 = time.perf_counter()
    recalled = [r.ids for r in rec.lists(history_bonus)]
    scores = score_users(recalled, rec.truths, cutoffs_for(top_n), paddlerec_metrics)
    logger.log(logging.INFO if progress else logging.DEBUG, "%d users merged and scored in %.2f s%s",
               len(recalled), time.perf_counter() - t0,
               f" (history bonus {history_bonus:.4g})" if history_bonus else "")
    return scores, len(recalled)


@dataclass
class BonusChoice:
    bonus: float  # in score units: what recall adds to a history item's score
    value: float  # the metric at that bonus
    metrics: dict[str, float]
    tried: dict[float, float] = field(default_factory=dict)  # step (in spreads) -> metric


def choose_history_bonus(config: dict[str, Any], dm, model, reader, index, top_n: int, metric: str,
                         progress: bool = False, history_len: int | None = None) -> BonusChoice:
    """Score the users at each bonus of ``BONUS_STEPS`` (one search) and keep the best by
    ``metric`` (the smaller bonus on a tie): users who click their own items again get them back."""
    rec = recall_users(config, dm, model, reader, index, max(top_n, 20), progress, with_history=True,
                       history_len=history_len)
    name, n = metric.split("@")
    fn = {"Recall": recall_at_n, "NDCG": ndcg_at_n, "HitRate": hitrate_at_n}[name]
    tried: dict[float, float] = {}
    best_bonus, best_value, best_top = 0.0, float("-inf"), None
    for step, (bonus, top) in zip(BONUS_STEPS, rec.boosted_top(BONUS_STEPS)):
        value = float(np.mean([fn(row[row > 0].tolist(), t, int(n)) for row, t in zip(top, rec.truths)])) \
            if rec.truths else 0.0
        tried[step] = value
        if value > best_value:  # ties keep the smaller bonus
            best_bonus, best_value, best_top = bonus, value, top
    metrics = score_users([row[row > 0].tolist() for row in best_top], rec.truths, cutoffs_for(top_n))
    return BonusChoice(best_bonus, best_value, metrics, tried)


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
