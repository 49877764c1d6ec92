"""The recall core shared by evaluation, the Paddle Serving Ops and the REST API:
K interest vectors per user -> K searches -> one merged top-k list per user.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np


class VectorSearcher(Protocol):
    """What the core needs of an index: top-``limit`` (ids, scores) per query vector.

    Rows shorter than ``limit`` are padded with id -1 and score -inf.
    """

    dim: int

    def search_vectors(self, queries: np.ndarray, limit: int,
                       filter: str | None = None) -> tuple[np.ndarray, np.ndarray]: ...


@dataclass
class UserRecall:
    ids: list[int]
    scores: list[float]


def merge_interest_hits(ids: np.ndarray, scores: np.ndarray, top_k: int,
                        exclude: Collection[int] = ()) -> UserRecall:
    """Union of the K per-interest lists: an item's score is its best score; padding (id <= 0)
    and ``exclude`` are dropped; ordered by score (desc), then id (asc); cut at ``top_k``."""
    ids = np.asarray(ids, dtype=np.int64).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    keep = ids > 0
    if len(exclude):
        keep &= ~np.isin(ids, np.fromiter(exclude, dtype=np.int64, count=len(exclude)))
    ids, scores = ids[keep], scores[keep]
    order = np.lexsort((ids, -scores))
    ids, scores = ids[order], scores[order]
    _, first = np.unique(ids, return_index=True)  # first = best-scored occurrence
    first.sort()
    first = first[:top_k]
    return UserRecall(ids[first].tolist(), scores[first].tolist())


def recall_top_k(index: VectorSearcher, interests: np.ndarray, top_k: int,
                 histories: Sequence[Collection[int]] | None = None,
                 exclude_history: bool = False, filter: str | None = None) -> list[UserRecall]:
    """Search every user's K interests in one batched call and merge per user."""
    excludes = [set(h) for h in histories] if exclude_history and histories is not None else None
    return recall_rows(index, interests, top_k, excludes, filter)


def recall_rows(index: VectorSearcher, interests: np.ndarray, top_k: int | Sequence[int],
                excludes: Sequence[Collection[int]] | None = None,
                filter: str | None = None) -> list[UserRecall]:
    """Like ``recall_top_k`` with a top_k and a set of ids to leave out per row: the rows of
    several requests in one search. The search asks for the largest top_k + |exclude| of any
    row; a row's answer is the same as with its own limit, since an item in a row's merged top_k
    ranks within top_k + |exclude| in the interest list where it scores best."""
    interests = np.asarray(interests, dtype=np.float32)
    if interests.ndim == 2:
        interests = interests[:, None, :]
    n, k, dim = interests.shape
    if dim != index.dim:
        raise ValueError(f"interest vectors have dim {dim}, the index holds dim {index.dim}")
    top_ks = [int(top_k)] * n if isinstance(top_k, (int, np.integer)) else [int(t) for t in top_k]
    excludes = list(excludes) if excludes is not None else [()] * n
    if len(top_ks) != n or len(excludes) != n:
        raise ValueError(f"{n} rows but {len(top_ks)} top_k values and {len(excludes)} exclude sets")
    limit = max(t + len(e) for t, e in zip(top_ks, excludes))
    ids, scores = index.search_vectors(interests.reshape(n * k, dim), limit, filter)
    ids, scores = ids.reshape(n, -1), scores.reshape(n, -1)
    return [merge_interest_hits(ids[u], scores[u], top_ks[u], excludes[u]) for u in range(n)]


class ExactIndex:
    """Exact inner-product top-k in numpy: the ground truth Milvus results are checked against."""

    def __init__(self, dim: int, block_rows: int = 64):
        self.dim = dim
        self.block_rows = block_rows
        self.ids = np.empty(0, dtype=np.int64)
        self.vectors = np.empty((0, dim), dtype=np.float32)

    def upsert(self, ids: Sequence[int], vectors: np.ndarray, **_: object) -> int:
        ids = np.asarray(ids, dtype=np.int64)
        vectors = np.asarray(vectors, dtype=np.float32)
        keep = ~np.isin(self.ids, ids)
        self.ids = np.concatenate([self.ids[keep], ids])
        self.vectors = np.concatenate([self.vectors[keep], vectors])
        return len(ids)

    def count(self) -> int:
        return len(self.ids)

    def drop(self) -> None:
        self.__init__(self.dim, self.block_rows)

    reset = drop

    def refill(self, ids: Sequence[int], vectors: np.ndarray, **_: object) -> int:
        self.drop()
        return self.upsert(ids, vectors)

    def close(self) -> None:
        pass

    def search_vectors(self, queries: np.ndarray, limit: int,
                       filter: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        if filter:
            raise ValueError("ExactIndex does not evaluate filters; use Milvus")
        q = np.asarray(queries, dtype=np.float32)
        limit_eff = min(limit, len(self.ids))
        ids = np.full((len(q), limit), -1, dtype=np.int64)
        scores = np.full((len(q), limit), -np.inf, dtype=np.float32)
        if limit_eff == 0:
            return ids, scores
        n = len(self.ids)
        # Small row blocks bound the memory (a block's scores and argpartition positions are
        # rows x items) and stay in cache: 8,192 queries x 38.5k items take 1.4 s in blocks of 64
        # against 3.0 s (and 750 MB more) in blocks of 1024.
        for s in range(0, len(q), self.block_rows):
            sc = q[s:s + self.block_rows] @ self.vectors.T
            part = np.argpartition(sc, n - limit_eff, axis=1)[:, n - limit_eff:]
            ps = np.take_along_axis(sc, part, axis=1)
            pid = self.ids[part]
            order = np.lexsort((pid, -ps), axis=1)
            ids[s:s + self.block_rows, :limit_eff] = np.take_along_axis(pid, order, axis=1)
            scores[s:s + self.block_rows, :limit_eff] = np.take_along_axis(ps, order, axis=1)
        return ids, scores
