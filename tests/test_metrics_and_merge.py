"""Metrics and the multi-interest merge against hand-computed cases."""

import math

import numpy as np
import pytest

from paddlerec_milvus.metrics import hitrate_at_n, ndcg_at_n, paddlerec_ndcg_at_n, recall_at_n
from paddlerec_milvus.recall import ExactIndex, merge_interest_hits, recall_top_k


def test_recall_hitrate_hand_computed():
    ranked = [5, 3, 8, 1, 9]
    assert recall_at_n(ranked, [3, 9, 42], 5) == pytest.approx(2 / 3)
    assert recall_at_n(ranked, [3, 9, 42], 2) == pytest.approx(1 / 3)
    assert recall_at_n(ranked, [3, 3, 9], 5) == pytest.approx(1.0)  # duplicates count once
    assert hitrate_at_n(ranked, [42], 5) == 0.0
    assert hitrate_at_n(ranked, [1], 5) == 1.0 and hitrate_at_n(ranked, [1], 3) == 0.0
    assert recall_at_n(ranked, [], 5) == 0.0


def test_ndcg_hand_computed():
    ranked = [5, 3, 8, 1, 9]
    # hits at positions 1 and 4 (0-based): DCG = 1/log2(3) + 1/log2(6)
    dcg = 1 / math.log2(3) + 1 / math.log2(6)
    # 3 relevant items, N = 5: IDCG over 3 ideal positions
    idcg3 = 1 + 1 / math.log2(3) + 1 / math.log2(4)
    assert ndcg_at_n(ranked, [3, 9, 42], 5) == pytest.approx(dcg / idcg3)
    # PaddleRec's variant: IDCG over the 2 hits only
    assert paddlerec_ndcg_at_n(ranked, [3, 9, 42], 5) == pytest.approx(dcg / (1 + 1 / math.log2(3)))
    # IDCG is capped at N positions
    assert ndcg_at_n([1, 2], [1, 2, 3, 4], 2) == pytest.approx(1.0)
    assert ndcg_at_n([7, 1], [1], 2) == pytest.approx(1 / math.log2(3))
    assert ndcg_at_n(ranked, [42], 5) == 0.0 and paddlerec_ndcg_at_n(ranked, [42], 5) == 0.0


def test_merge_dedups_by_best_score_orders_and_drops_padding():
    ids = np.array([[7, 3, 0, 5], [3, 9, 7, -1]])
    scores = np.array([[0.9, 0.5, 2.0, 0.5], [0.8, 0.5, 0.1, -np.inf]])
    r = merge_interest_hits(ids, scores, top_k=10)
    # 3 takes its best score 0.8; 5 and 9 tie at 0.5 -> smaller id first; 0 and -1 dropped
    assert r.ids == [7, 3, 5, 9]
    assert r.scores == pytest.approx([0.9, 0.8, 0.5, 0.5])
    assert merge_interest_hits(ids, scores, top_k=2).ids == [7, 3]
    assert merge_interest_hits(ids, scores, top_k=10, exclude={7, 9}).ids == [3, 5]


def test_recall_top_k_exclude_history_still_returns_top_k():
    index = ExactIndex(2)
    index.upsert(np.arange(1, 11), np.array([[i, 0.0] for i in range(1, 11)], dtype=np.float32))
    interests = np.array([[[1.0, 0.0], [0.5, 0.1]]], dtype=np.float32)
    plain = recall_top_k(index, interests, 3)[0]
    assert plain.ids == [10, 9, 8]
    excl = recall_top_k(index, interests, 3, histories=[{10, 8}], exclude_history=True)[0]
    assert excl.ids == [9, 7, 6]
    with pytest.raises(ValueError, match="dim 3"):
        recall_top_k(index, np.zeros((1, 2, 3), dtype=np.float32), 3)


def test_exact_index_matches_brute_force():
    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(500, 8)).astype(np.float32)
    index = ExactIndex(8)
    index.upsert(np.arange(1, 501), vecs)
    q = rng.normal(size=(5, 8)).astype(np.float32)
    ids, scores = index.search_vectors(q, 10)
    brute = np.argsort(-(q @ vecs.T), axis=1)[:, :10] + 1
    np.testing.assert_array_equal(ids, brute)
    short_ids, short_scores = index.search_vectors(q, 600)
    assert (short_ids[:, 500:] == -1).all() and np.isinf(short_scores[:, 500:]).all()
