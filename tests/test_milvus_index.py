"""The item index against embedded Milvus Lite and a real Milvus server."""

import numpy as np
import pytest

from paddlerec_milvus.errors import MilvusIndexError
from paddlerec_milvus.milvus_index import ItemIndex
from paddlerec_milvus.recall import ExactIndex, recall_top_k

DIM = 16


@pytest.fixture
def data():
    rng = np.random.default_rng(42)
    ids = np.arange(1, 1201, dtype=np.int64)
    return ids, rng.normal(size=(len(ids), DIM)).astype(np.float32), rng


def _index(uri, name="items", **kw):
    return ItemIndex(uri, name, DIM, batch_size=500, **kw)


def test_create_upsert_count_search_drop(milvus_uri, data):
    ids, vecs, rng = data
    idx = _index(milvus_uri, "crud")
    assert idx.count() == 0
    assert idx.upsert(ids, vecs, progress=False) == len(ids)
    assert idx.count() == len(ids)
    idx.upsert(ids[:300], vecs[:300] * 2, progress=False)  # re-upsert: replaced, not duplicated
    assert idx.count() == len(ids)
    exact = ExactIndex(DIM)
    exact.upsert(ids, np.concatenate([vecs[:300] * 2, vecs[300:]]))
    interests = rng.normal(size=(6, 4, DIM)).astype(np.float32)
    got = idx.search(interests, 20)
    want = recall_top_k(exact, interests, 20)
    assert [g.ids for g in got] == [w.ids for w in want]
    np.testing.assert_allclose([g.scores for g in got], [w.scores for w in want], rtol=1e-4)
    idx.drop()
    idx.close()
    assert _index(milvus_uri, "crud").count() == 0


def test_persistence_across_reopen(milvus_uri, data, tmp_path):
    ids, vecs, _ = data
    idx = _index(milvus_uri, "persist")
    idx.upsert(ids[:100], vecs[:100], progress=False)
    idx.close()
    again = _index(milvus_uri, "persist")
    assert again.count() == 100
    hit = again.search(vecs[5][None, None, :], 1)[0]
    assert hit.ids == [int(np.argmax(vecs[:100] @ vecs[5])) + 1]
    again.drop()


def test_dimension_mismatch_is_a_clear_error_and_keeps_data(milvus_uri, data):
    ids, vecs, _ = data
    idx = _index(milvus_uri, "dims")
    idx.upsert(ids[:10], vecs[:10], progress=False)
    with pytest.raises(MilvusIndexError, match=r"holds dim 16 vectors but the model has dim 32"):
        ItemIndex(milvus_uri, "dims", 32)
    assert idx.count() == 10  # never silently dropped
    with pytest.raises(MilvusIndexError, match="vectors have dim 8"):
        idx.upsert([1], np.zeros((1, 8)))
    idx.drop()


@pytest.mark.parametrize("ids, vecs, message", [
    (np.array([1.5]), np.zeros((1, DIM)), "integer"),
    (np.array([-2]), np.zeros((1, DIM)), "negative item id -2"),
    (np.array([1, 1]), np.zeros((2, DIM)), "duplicate"),
    (np.array([1]), np.full((1, DIM), np.nan), "NaN"),
    (np.array([1, 2]), np.zeros((1, DIM)), "shape"),
])
def test_bad_upserts_are_rejected_before_writing(tmp_path, ids, vecs, message):
    idx = _index(str(tmp_path / "bad.db"), "bad")
    with pytest.raises(MilvusIndexError, match=message):
        idx.upsert(ids, vecs, progress=False)
    assert idx.count() == 0


def test_filter_and_exclude_history(milvus_uri, data):
    ids, vecs, rng = data
    idx = _index(milvus_uri, "filtered", scalar_fields=["category"])
    idx.upsert(ids, vecs, fields={"category": ids % 5}, progress=False)
    q = rng.normal(size=(3, 4, DIM)).astype(np.float32)
    res = idx.search(q, 30, filter="category == 3")
    assert all(len(r.ids) == 30 and all(i % 5 == 3 for i in r.ids) for r in res)
    plain = idx.search(q, 30)
    hist = [set(plain[u].ids[:5]) for u in range(3)]
    excl = idx.search(q, 30, histories=hist, exclude_history=True)
    for u in range(3):
        assert len(excl[u].ids) == 30 and not hist[u] & set(excl[u].ids)
        assert excl[u].ids[:25] == plain[u].ids[5:30]
    idx.drop()


def test_collection_name_rules(tmp_path):
    with pytest.raises(MilvusIndexError, match="letters, digits and underscores"):
        ItemIndex(str(tmp_path / "x.db"), "bad-name", DIM)


def test_unreachable_uri_is_one_clear_error():
    with pytest.raises(MilvusIndexError, match=r"cannot reach Milvus at http://127.0.0.1:1"):
        ItemIndex("http://127.0.0.1:1", "items", DIM, timeout=2, retries=0)


def test_top_k_limits(tmp_path):
    idx = _index(str(tmp_path / "k.db"), "k")
    with pytest.raises(MilvusIndexError, match=r"top_k 0 \(with the history .*\) out of range"):
        idx.search_vectors(np.zeros((1, DIM)), 0)
    with pytest.raises(MilvusIndexError, match=r"top_k 20000 \(with the history .*\) out of range"):
        idx.search_vectors(np.zeros((1, DIM)), 20000)


def test_fast_search_path_equals_milvus_client_search(milvus_uri, data):
    """The numpy reply reader returns what MilvusClient.search returns, padding included."""
    ids, vecs, rng = data
    idx = _index(milvus_uri, "fastpath")
    idx.upsert(ids, vecs, progress=False)
    queries = rng.normal(size=(40, DIM)).astype(np.float32)
    for limit, filt in ((30, None), (30, "item_id < 11")):  # the filter leaves 10 rows: padding
        fast = idx.search_vectors(queries, limit, filter=filt)
        assert idx._raw_search_ok
        idx._raw_search_ok = False
        slow = idx.search_vectors(queries, limit, filter=filt)
        idx._raw_search_ok = True
        np.testing.assert_array_equal(fast[0], slow[0])
        np.testing.assert_array_equal(fast[1], slow[1])
    assert (fast[0][:, 10:] == -1).all() and (fast[0][:, :10] > 0).all()
    idx.drop()


def test_reset_and_clear(milvus_uri, data):
    ids, vecs, _ = data
    idx = _index(milvus_uri, "resets", upsert_workers=3)
    assert idx.upsert(ids, vecs, progress=False) == len(ids)  # 3 batches in flight
    assert idx.count() == len(ids)
    idx.reset()
    assert idx.count() == 0
    empty_ids, empty_scores = idx.search_vectors(vecs[:3], 5)
    assert (empty_ids == -1).all() and np.isneginf(empty_scores).all() and idx._raw_search_ok
    idx.upsert(ids[:50], vecs[:50], progress=False)
    assert idx.search(vecs[7][None, None, :], 1)[0].ids == [int(np.argmax(vecs[:50] @ vecs[7])) + 1]
    idx.clear()
    assert idx.count() == 0
    idx.drop()


@pytest.mark.parametrize("index_type, params", [("FLAT", {}), ("IVF_FLAT", {"nlist": 16})])
def test_refill_replaces_every_row_and_serves_them_from_the_index(milvus_uri, data, index_type,
                                                                  params):
    ids, vecs, rng = data
    idx = _index(milvus_uri, f"refill_{index_type.lower()}", index_type=index_type,
                 index_params=params, search_params={"nprobe": 16} if params else {},
                 scalar_fields=["category"])
    idx.upsert(ids + 5000, vecs, fields={"category": ids % 4}, progress=False)  # to be removed
    assert idx.refill(ids, vecs * 3, fields={"category": ids % 4}, progress=False) == len(ids)
    assert idx.count() == len(ids)
    got_ids, got_scores = idx.search_vectors(vecs[:8], 3, filter="category >= 0")
    np.testing.assert_array_equal(got_ids[:, 0], np.argmax(vecs[:8] @ vecs.T, axis=1) + 1)
    np.testing.assert_allclose(got_scores[:, 0], (vecs[:8] * 3 * vecs[got_ids[:, 0] - 1]).sum(1),
                               rtol=1e-4)
    if not milvus_uri.startswith("http"):
        return
    # the server's bulk path: every row sits in a sealed segment, indexed, when refill returns
    segments = idx._client._get_connection().get_query_segment_info(idx.collection)
    assert sum(s.num_rows for s in segments) == len(ids)
    assert all(s.state == 3 for s in segments), [s.state for s in segments]  # Sealed
    client = idx._client
    (info,) = [client.describe_index(idx.collection, n) for n in client.list_indexes(idx.collection)]
    assert info["index_type"] == index_type and int(info["indexed_rows"]) == len(ids)
    idx.drop()


def test_a_failed_batch_fails_the_upsert(tmp_path, data, monkeypatch):
    ids, vecs, _ = data
    idx = _index(str(tmp_path / "fail.db"), "failing", upsert_workers=2)
    real, calls = idx._client.upsert, []

    def flaky(collection, rows, **kw):
        calls.append(len(rows))
        if len(calls) == 2:
            raise RuntimeError("disk full")
        return real(collection, rows, **kw)

    monkeypatch.setattr(idx._client, "upsert", flaky)
    with pytest.raises(MilvusIndexError, match="Milvus upsert failed: disk full"):
        idx.upsert(ids, vecs, progress=False)
    idx.close()


def test_bad_batch_settings(tmp_path):
    with pytest.raises(MilvusIndexError, match="must be positive"):
        ItemIndex(str(tmp_path / "b.db"), "b", DIM, batch_size=0)


@pytest.mark.parametrize("keys, bulk, want", [
    ({}, False, 10.0),                                            # every call: milvus.timeout
    ({}, True, 120.0),                                            # export: 120 s per call
    ({"milvus.timeout": 300}, True, 300.0),                       # never shorter than milvus.timeout
    ({"milvus.timeout": 5, "milvus.write_timeout": 30}, True, 30.0),
    ({"milvus.timeout": 5, "milvus.write_timeout": 30}, False, 5.0),
])
def test_bulk_writes_get_the_write_timeout_per_call(tmp_path, keys, bulk, want):
    cfg = {"milvus.uri": str(tmp_path / "m.db"), **keys}
    with ItemIndex.from_config(cfg, 8, collection="t", bulk_write=bulk, open_collection=False) as index:
        assert index.call_timeout == want
        assert index.timeout == float(keys.get("milvus.timeout", 10.0))
