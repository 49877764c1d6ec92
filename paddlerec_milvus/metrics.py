"""Top-N recall metrics for one user, as small pure functions (averaged by the caller).

``ranked`` is the recalled list (best first), ``relevant`` the items the user went on to click.
Duplicates in ``relevant`` count once.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence


def _hits(ranked: Sequence[int], relevant: set[int], n: int) -> list[int]:
    """Positions (0-based) of relevant items among the first n recalled."""
    return [pos for pos, item in enumerate(ranked[:n]) if item in relevant]


def recall_at_n(ranked: Sequence[int], relevant: Iterable[int], n: int) -> float:
    rel = set(relevant)
    return len(_hits(ranked, rel, n)) / len(rel) if rel else 0.0


def hitrate_at_n(ranked: Sequence[int], relevant: Iterable[int], n: int) -> float:
    return 1.0 if _hits(ranked, set(relevant), n) else 0.0


def _dcg(positions: Iterable[int]) -> float:
    return sum(1.0 / math.log2(pos + 2) for pos in positions)


def ndcg_at_n(ranked: Sequence[int], relevant: Iterable[int], n: int) -> float:
    """DCG over the hits / ideal DCG of min(|relevant|, n) hits at the top."""
    rel = set(relevant)
    if not rel:
        return 0.0
    return _dcg(_hits(ranked, rel, n)) / _dcg(range(min(len(rel), n)))


def paddlerec_ndcg_at_n(ranked: Sequence[int], relevant: Iterable[int], n: int) -> float:
    """PaddleRec's variant: the ideal DCG is over the number of hits only (always >= ndcg)."""
    hits = _hits(ranked, set(relevant), n)
    return _dcg(hits) / _dcg(range(len(hits))) if hits else 0.0


METRICS = {
    "recall": recall_at_n,
    "ndcg": ndcg_at_n,
    "hitrate": hitrate_at_n,
}
