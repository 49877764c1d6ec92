"""The vector search benchmark at a tiny size: numpy exact + Milvus Lite (no server, to stay fast)."""

from __future__ import annotations

import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from benchmarks.search import lite_pids, markdown_table, run, size_label  # noqa: E402


def test_size_label():
    assert [size_label(n) for n in (1_000_000, 38_500, 100_000, 500)] == ["1m", "38k", "100k", "500"]


@pytest.mark.slow
def test_search_benchmark_tiny(tmp_path):
    img = tmp_path / "img"
    res = run(n_synthetic=3000, n_users=12, n_batches=2, engines=["lite_flat", "lite_ivf_flat"],
              out_img_dir=str(img), budget_s=120, work_dir=str(tmp_path))
    assert set(res) == {"figures", "rows", "notes", "plots"}
    rows, fig = res["rows"], res["figures"]
    assert [r["error"] for r in rows] == [None] * len(rows), res["notes"]
    assert [(r["engine"].split()[0], r["index"]) for r in rows] == \
        [("numpy", "EXACT"), ("milvus-lite", "FLAT"), ("milvus-lite", "IVF_FLAT")]
    assert fig["search_recall_numpy_3k"] == 1.0
    assert fig["search_recall_lite_flat_3k"] == 1.0  # FLAT is exact: same top-50 as numpy
    assert 0.5 < fig["search_recall_lite_ivf_flat_3k"] <= 1.0  # nprobe 16, the default
    for key, value in fig.items():
        if "_ms_" in key or key.startswith(("search_build_s", "search_memory_mb")):
            assert value > 0, key
    for r in rows:
        assert r["p99_ms"] >= r["p50_ms"] > 0 and r["batch64_ms"] > 0 and r["items"] == 3000
        assert r["users"] == 12 and r["memory_mb"] > 0
    assert res["plots"] == [str(img / "search_latency_recall.png")]
    assert os.path.getsize(res["plots"][0]) > 10_000
    assert markdown_table(rows).count("\n") == len(rows) + 1
    # everything it made is gone: temp dir, collections' files, milvus-lite processes
    assert not [p for p in os.listdir(tmp_path) if p.startswith("bench_search_")]
    assert not lite_pids(str(tmp_path))
