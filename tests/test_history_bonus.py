"""The history bonus: a user's own items ranked higher, the same through every index and service
path, and chosen on the validation split (recall.history_bonus: auto)."""

import json
import time

import numpy as np
import pytest

from paddlerec_milvus.checkpoint import history_bonus_for
from paddlerec_milvus.config import history_bonus_setting
from paddlerec_milvus.errors import ConfigError
from paddlerec_milvus.milvus_index import ItemIndex
from paddlerec_milvus.recall import ExactIndex, recall_rows, recall_top_k
from paddlerec_milvus.serving_contract import Manifest


def _line_index() -> ExactIndex:
    index = ExactIndex(2)
    index.upsert(np.arange(1, 11), np.array([[i, 0.0] for i in range(1, 11)], dtype=np.float32))
    return index


def test_bonus_hand_computed():
    index = _line_index()
    interests = np.array([[[1.0, 0.0], [0.5, 0.1]]], dtype=np.float32)  # item i scores i
    assert recall_top_k(index, interests, 3)[0].ids == [10, 9, 8]
    # item 2 scores 2 + 7.5 = 9.5: between 10 and 9; item 4 scores 11.5: first; 99 is not indexed
    got = recall_top_k(index, interests, 3, histories=[[2, 4, 99]], history_bonus=7.5)[0]
    assert got.ids == [4, 10, 2] and got.scores == pytest.approx([11.5, 10.0, 9.5])
    # a bonus too small to lift an item past the cut changes nothing
    assert recall_top_k(index, interests, 3, histories=[[2]], history_bonus=1.0)[0].ids == [10, 9, 8]
    # exclude_history wins: history items are left out, never boosted
    excl = recall_top_k(index, interests, 3, histories=[[2, 10]], exclude_history=True, history_bonus=50)
    assert excl[0].ids == [9, 8, 7]
    # no bonus = no history look-up at all, even with histories given
    assert recall_top_k(index, interests, 3, histories=[[2]])[0].ids == [10, 9, 8]


def test_bonus_is_the_exact_top_k_of_boosted_scores():
    """Against brute force over every item: rows with their own top_k and excludes in one call."""
    rng = np.random.default_rng(3)
    n_items, dim = 300, 8
    vecs = rng.normal(size=(n_items, dim)).astype(np.float32)
    index = ExactIndex(dim)
    index.upsert(np.arange(1, n_items + 1), vecs)
    interests = rng.normal(size=(12, 3, dim)).astype(np.float32)
    histories = [rng.choice(np.arange(1, n_items + 1), size=rng.integers(1, 20), replace=False).tolist()
                 for _ in range(12)]
    top_ks = rng.integers(1, 40, size=12).tolist()
    excludes = [set(h) if u % 4 == 0 else set() for u, h in enumerate(histories)]
    boosted = [[] if e else h for e, h in zip(excludes, histories)]
    bonus = 1.3
    got = recall_rows(index, interests, top_ks, excludes, None, boosted, bonus)
    for u in range(12):
        score = (vecs @ interests[u].T).max(axis=1).astype(np.float64)
        score[np.asarray(boosted[u], dtype=np.int64) - 1] += bonus
        ids = np.arange(1, n_items + 1)
        keep = ~np.isin(ids, list(excludes[u]))
        order = np.lexsort((ids[keep], -score[keep]))[:top_ks[u]]
        assert got[u].ids == ids[keep][order].tolist(), u
        np.testing.assert_allclose(got[u].scores, score[keep][order], rtol=1e-5)
    # a row's answer is a prefix of the same row at a larger top_k
    small = recall_rows(index, interests[:1], 5, None, None, boosted[:1], bonus)[0]
    large = recall_rows(index, interests[:1], 30, None, None, boosted[:1], bonus)[0]
    assert large.ids[:5] == small.ids


def test_milvus_scores_history_from_the_collection(milvus_uri):
    """Milvus and numpy agree; the vectors come from the collection (an item replaced there since
    is scored as it is now, a deleted one is not brought back) and a filter holds for them too."""
    rng = np.random.default_rng(5)
    dim, n = 8, 400
    ids = np.arange(1, n + 1, dtype=np.int64)
    vecs = rng.normal(size=(n, dim)).astype(np.float32)
    idx = ItemIndex(milvus_uri, "bonus_items", dim, scalar_fields=["category"])
    idx.upsert(ids, vecs, {"category": (ids % 3).tolist()}, progress=False)
    exact = ExactIndex(dim)
    exact.upsert(ids, vecs)
    interests = rng.normal(size=(5, 4, dim)).astype(np.float32)
    histories = [rng.choice(ids, size=15, replace=False).tolist() for _ in range(5)]
    got = recall_rows(idx, interests, 20, None, None, histories, 2.0)
    want = recall_rows(exact, interests, 20, None, None, histories, 2.0)
    assert [g.ids for g in got] == [w.ids for w in want]
    np.testing.assert_allclose([g.scores for g in got], [w.scores for w in want], rtol=1e-4)
    # history items outside the filter stay out
    filtered = recall_rows(idx, interests, 20, None, "category == 1", histories, 100.0)
    for row, hist in zip(filtered, histories):
        assert row.ids and all(i % 3 == 1 for i in row.ids)
        lifted = sorted(i for i in set(hist) if i % 3 == 1)
        assert sorted(row.ids[:len(lifted)]) == lifted  # every admitted history item leads
    # deleted from the collection: not recalled through the bonus either
    gone = histories[0][0]
    idx.delete([gone])
    deadline = time.monotonic() + 20  # a server applies a delete asynchronously
    while len(idx.vectors_of([gone])[0]) or gone in idx.search(vecs[None, gone - 1], 20)[0].ids:
        assert time.monotonic() < deadline, "Milvus never applied the delete"
        time.sleep(0.2)
    again = recall_rows(idx, interests[:1], 20, None, None, histories[:1], 100.0)[0]
    assert gone not in again.ids and len(again.ids) == 20
    idx.drop()
    idx.close()


def test_setting_and_recorded_choice(tmp_path):
    assert history_bonus_setting({}) == 0.0
    assert history_bonus_setting({"recall.history_bonus": "AUTO"}) == "auto"
    assert history_bonus_setting({"recall.history_bonus": "0.25"}) == 0.25
    for bad in (-1, "much", True, float("inf")):
        with pytest.raises(ConfigError, match="recall.history_bonus"):
            history_bonus_setting({"recall.history_bonus": bad})
    (tmp_path / "best.json").write_text(json.dumps({"epoch": 2, "history_bonus": {"2": 0.75}}))
    auto = {"recall.history_bonus": "auto"}
    assert history_bonus_for(auto, str(tmp_path), 2) == 0.75
    assert history_bonus_for(auto, str(tmp_path), 1) == 0.0  # not chosen for that epoch
    assert history_bonus_for({"recall.history_bonus": 0.1}, str(tmp_path), 2) == 0.1
    assert history_bonus_for(auto, str(tmp_path / "none"), 2) == 0.0  # no validation run


def test_manifest_without_bonus_reads_as_off(tmp_path):
    fields = dict(model_version="v", epoch=0, embedding_dim=8, max_k=4, maxlen=20, item_count=5,
                  items_indexed=4, milvus_uri="x.db", collection="c", physical_collection="c",
                  model_file="m", params_file="p")
    (tmp_path / "manifest.json").write_text(json.dumps(fields))
    assert Manifest.load(str(tmp_path)).history_bonus == 0.0
    (tmp_path / "manifest.json").write_text(json.dumps(dict(fields, history_bonus=-2)))
    with pytest.raises(ConfigError, match="history_bonus"):
        Manifest.load(str(tmp_path))


@pytest.mark.slow
def test_service_applies_the_exported_bonus(trained_demo, tmp_path):
    """An export made with recall.history_bonus carries it in its manifest; the service ranks with
    it, batched or alone, and equals the exact boosted recall of the export's vectors."""
    from concurrent.futures import ThreadPoolExecutor

    from conftest import _run_cli

    from paddlerec_milvus.service import RecallService
    from paddlerec_milvus.serving_contract import ServingLimits

    uri, out = str(tmp_path / "bonus.db"), str(tmp_path / "model")
    _run_cli("export", "-m", trained_demo["config_path"], "-o", *trained_demo["overrides"],
             f"milvus.uri={uri}", "recall.history_bonus=3.0", "--collection", "bonus_serving",
             "--output", out)
    assert Manifest.load(out).history_bonus == 3.0
    svc = RecallService(out, limits=ServingLimits(batch_max_users=64, batch_window_ms=5.0))
    try:
        raw = svc.raw_ids[1:]
        exact = ExactIndex(int(svc.manifest.embedding_dim))
        exact.upsert(raw, np.load(f"{out}/item_vectors.npy"))
        rng = np.random.default_rng(11)
        reqs = [(rng.choice(raw, size=int(rng.integers(2, 30)), replace=False).tolist(),
                 int(rng.integers(5, 60)), bool(i % 5 == 4)) for i in range(24)]
        with ThreadPoolExecutor(8) as pool:  # concurrent: the micro-batcher merges them
            answers = list(pool.map(lambda r: svc.recall([r[0]], r[1], r[2]), reqs))
        lifted = 0
        for (hist, top_k, exclude), got in zip(reqs, answers):
            interests, _ = svc.interests([hist])
            seen = hist[-svc.manifest.maxlen:]  # the tower's view: the latest maxlen items
            want = recall_rows(exact, interests, top_k, [set(hist) if exclude else set()], None,
                               [[] if exclude else seen], 3.0)[0]
            assert got.items[0] == want.ids
            np.testing.assert_allclose(got.scores[0], want.scores, rtol=1e-4, atol=1e-4)
            plain = recall_rows(exact, interests, top_k)[0]
            lifted += len(set(got.items[0]) & set(seen)) - len(set(plain.ids) & set(seen))
            if exclude:
                assert not set(got.items[0]) & set(hist)
        assert lifted > 0  # the bonus brought history items in
    finally:
        svc.close()


def test_bonus_grid_ranks_as_the_merge_does():
    """Validation tries every bonus step from one set of matrices; each step's lists must be the
    ones the recall core (and so infer.py and the services) would answer at that bonus."""
    from paddlerec_milvus.recall import history_hits
    from paddlerec_milvus.scoring import BONUS_STEPS, Recalled

    rng = np.random.default_rng(8)
    n_items, dim, k = 500, 8, 20
    index = ExactIndex(dim)
    index.upsert(np.arange(1, n_items + 1), rng.normal(size=(n_items, dim)).astype(np.float32))
    batches = [rng.normal(size=(b, 4, dim)).astype(np.float32) for b in (7, 5)]
    hists = [[rng.choice(np.arange(1, n_items + 1), size=rng.integers(1, 25), replace=False).tolist()
              for _ in range(len(b))] for b in batches]
    found = [index.search_vectors(b.reshape(-1, dim), k) for b in batches]
    rec = Recalled(k, [f[0].reshape(len(b), -1) for f, b in zip(found, batches)],
                   [f[1].reshape(len(b), -1) for f, b in zip(found, batches)],
                   [history_hits(index, b, h) for b, h in zip(batches, hists)], [[1]] * 12)
    seen = []
    for bonus, top in rec.boosted_top(BONUS_STEPS):
        want = [r.ids for r in rec.lists(bonus)]
        assert [row[row > 0].tolist() for row in top] == want, bonus
        seen.append(bonus)
    assert seen[0] == 0 and len(seen) == len(BONUS_STEPS) and seen == sorted(seen) and seen[1] > 0
