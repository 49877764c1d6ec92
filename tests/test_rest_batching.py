"""The REST API under concurrent load, through a real uvicorn process and load from another
process: micro-batched answers equal the answers each request gets alone, a full queue answers
429 with Retry-After and the service recovers, and a request's deadline is honoured."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from test_rest_api import ApiProcess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow


def load(url: str, bodies: list[dict], concurrency: int, per_client: int) -> list[list]:
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tests", "http_load_child.py"), url,
                           str(concurrency), str(per_client)], input=json.dumps(bodies),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


def mixed_bodies(export_dir: str) -> list[dict]:
    with open(os.path.join(export_dir, "item_map.tsv")) as f:
        next(f)
        raw = [int(line.split("\t")[1]) for line in f]
    rng = np.random.default_rng(11)
    h = [rng.choice(raw, size=int(rng.integers(3, 25)), replace=False).tolist() for _ in range(10)]
    mid = sorted(raw)[len(raw) // 2]
    return [
        {"hist_item": [h[0]], "top_k": 50, "with_scores": True},
        {"hist_item": [h[1]], "top_k": 7, "with_scores": True},
        {"hist_item": [h[2], h[3], h[4]], "top_k": 20, "with_scores": True},
        {"hist_item": [h[5]], "top_k": 30, "exclude_history": True, "with_scores": True},
        {"hist_item": [h[6]], "top_k": 25, "filter": f"item_id > {mid}", "with_scores": True},
        {"hist_item": [h[7], h[8]], "top_k": 15, "filter": f"item_id <= {mid}", "exclude_history": True,
         "with_scores": True},
        {"hist_item": [h[9] + [987654321987]], "top_k": 40, "with_scores": True},
        {"hist_item": [[987654321987]], "top_k": 10},  # no known id: 400, alone
    ]


@pytest.fixture(scope="module")
def served(exported_demo, tmp_path_factory):
    base = tmp_path_factory.mktemp("rest-batching")
    db = str(base / "items.db")
    shutil.copy(exported_demo["milvus_uri"], db)
    return {"export_dir": exported_demo["export_dir"], "uri": db, "base": base,
            "collection": exported_demo["collection"]}


def start(served: dict, name: str, **limits: str) -> ApiProcess:
    db = str(served["base"] / f"{name}.db")
    shutil.copy(served["uri"], db)
    return ApiProcess(str(served["base"] / f"{name}.log"), export_dir=served["export_dir"], uri=db,
                      collection=served["collection"], **limits).start()


def test_batched_answers_equal_the_unbatched_ones_under_concurrency(served):
    bodies = mixed_bodies(served["export_dir"])
    alone = start(served, "unbatched", batch_max_users="0")
    try:
        want = [(r.status_code, r.json()) for r in (alone.post("/rec/recall", b) for b in bodies)]
        assert alone.get("/health").json()["batching"] == {}  # no batcher in the unbatched path
    finally:
        alone.stop()
    assert want[7][0] == 400 and "hist_item[0]" in want[7][1]["detail"]
    assert any("unknown item ids ignored" in n for n in want[6][1]["notes"])
    api = start(served, "batched", batch_max_users="64", batch_window_ms="2")
    try:
        got = load(api.url + "/rec/recall", bodies, concurrency=16, per_client=12)
        stats = api.get("/health").json()["batching"]
    finally:
        api.stop()
    assert len(got) == 16 * 12
    for i, status, _, body, _ in got:
        assert status == want[i][0], (i, body)
        if status != 200:
            assert body["detail"] == want[i][1]["detail"]
            continue
        w = want[i][1]
        assert body["items"] == w["items"], i
        for g, e in zip(body["scores"], w["scores"]):
            np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)
        assert body["notes"] == w["notes"] and body["model_version"] == w["model_version"]
    assert stats["recall"]["jobs"] == 14 * 12  # the 24 bad requests never reached a stage
    assert stats["recall"]["mean_batch_jobs"] > 1.5, stats  # they really shared searches


def test_a_full_queue_answers_429_with_retry_after_and_recovers(served):
    bodies = mixed_bodies(served["export_dir"])[:2]
    api = start(served, "tiny-queue", batch_max_users="2", queue_max_users="1", batch_window_ms="0")
    try:
        single = api.post("/rec/recall", bodies[0]).json()
        got = load(api.url + "/rec/recall", bodies, concurrency=24, per_client=15)
        refused = [g for g in got if g[1] == 429]
        ok = [g for g in got if g[1] == 200]
        assert refused and ok, [g[1] for g in got][:50]
        assert {g[1] for g in got} <= {200, 429}
        assert all(g[2] == "1" for g in refused)  # Retry-After
        assert "queued" in refused[0][3]["detail"] and "retry" in refused[0][3]["detail"]
        assert all(g[3]["items"] == single["items"] for g in ok if g[0] == 0)
        health = api.get("/health").json()
        assert sum(stage["refused"] for stage in health["batching"].values()) == len(refused)
        again = api.post("/rec/recall", bodies[0])  # the load is gone: served at once
        assert again.status_code == 200 and again.json()["items"] == single["items"]
    finally:
        api.stop()
    assert api.proc.returncode == 0, api.tail()


def test_timeout_ms_is_checked_and_a_passed_deadline_is_503(served):
    bodies = mixed_bodies(served["export_dir"])
    api = start(served, "deadline", batch_max_users="64")
    try:
        r = api.post("/rec/recall", {**bodies[0], "timeout_ms": 0})
        assert r.status_code == 422 and "timeout_ms" in r.json()["detail"]
        r = api.post("/rec/recall", {**bodies[0], "timeout_ms": "soon"})
        assert r.status_code == 422
        assert api.post("/rec/recall", {**bodies[0], "timeout_ms": 5000}).status_code == 200
        # 1 ms: under concurrent load some requests pass their deadline in a queue; those are
        # not run and answer 503 with Retry-After, the others answer in full
        got = load(api.url + "/rec/recall", [{**bodies[0], "timeout_ms": 1}], concurrency=16, per_client=10)
        codes = {g[1] for g in got}
        assert codes <= {200, 429, 503}, codes
        late = [g for g in got if g[1] == 503]
        assert late, "no request passed a 1 ms deadline under 16-way load"
        assert all(g[2] == "1" and "deadline" in g[3]["detail"] for g in late)
        assert api.post("/rec/recall", bodies[0]).status_code == 200
    finally:
        api.stop()


def test_past_max_inflight_a_recall_is_refused_at_once_on_a_kept_connection(served):
    bodies = mixed_bodies(served["export_dir"])[:1]
    api = start(served, "inflight", max_inflight="2", queue_max_users="1000")
    try:
        got = load(api.url + "/rec/recall", bodies, concurrency=16, per_client=15)
        refused = [g for g in got if g[1] == 429]
        assert refused and {g[1] for g in got} <= {200, 429}
        assert all(g[2] == "1" and "2 recall requests already in progress" in g[3]["detail"] for g in refused)
        # the body was read, so the connection stays open: a reconnect per refusal would cost
        # the overloaded server more than the refusal itself
        assert all((g[4] or "").lower() != "close" for g in refused), {g[4] for g in refused}
        assert api.post("/rec/recall", bodies[0]).status_code == 200
        assert api.get("/health").status_code == 200  # other endpoints are not counted
    finally:
        api.stop()
