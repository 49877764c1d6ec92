"""The REST API through a real uvicorn process on a loopback port, with the exported demo model
in Milvus Lite: every endpoint, real-time upserts, bad requests, a schemathesis run over the
OpenAPI schema, and the demo page in headless Chromium.

The Lite file belongs to the server process while it runs: this module never opens it.
"""

from __future__ import annotations

import csv
import gzip
import html
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import defaultdict

import numpy as np
import pytest
import requests

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow
TITLES = os.path.join(REPO, "models", "mind", "data", "demo_titles.csv.gz")
CLICKS = os.path.join(REPO, "models", "mind", "data", "demo_clicks.csv.gz")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ApiProcess:
    """``uvicorn serving.main:app`` in a child process, configured by environment variables."""

    def __init__(self, log_path: str, **env: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, **{f"PADDLEREC_MILVUS_{k.upper()}": v for k, v in env.items()}}
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120) -> ApiProcess:
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "serving.main:app", "--host", "127.0.0.1",
             "--port", str(self.port), "--log-level", "warning"],
            cwd=REPO, env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"API exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                requests.get(self.url + "/openapi.json", timeout=2).raise_for_status()
                return self
            except requests.RequestException:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"API not up after {timeout} s:\n{self.tail()}")

    def tail(self) -> str:
        with open(self.log_path) as f:
            return f.read()[-4000:]

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        """Ctrl-C, as a person would; uvicorn finishes and the lifespan closes Milvus."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()

    def get(self, path: str, **kw):
        return requests.get(self.url + path, timeout=60, **kw)

    def post(self, path: str, body=None, **kw):
        """JSON, as the mutating endpoints require (an empty object when there is no body)."""
        if "data" in kw:
            return requests.post(self.url + path, timeout=60, **kw)
        return requests.post(self.url + path, json={} if body is None else body, timeout=60, **kw)


@pytest.fixture(scope="module")
def api(exported_demo, tmp_path_factory):
    srv = ApiProcess(str(tmp_path_factory.mktemp("api") / "api.log"),
                     export_dir=exported_demo["export_dir"], uri=exported_demo["milvus_uri"],
                     collection=exported_demo["collection"], titles=TITLES, max_users="256",
                     max_body_bytes=str(2**20)).start()
    yield srv
    srv.stop()
    assert srv.proc.returncode == 0, srv.tail()


@pytest.fixture(scope="module")
def demo(exported_demo) -> dict:
    """Raw ids, vectors and titles of the export, and real readers' histories (raw ids)."""
    export_dir = exported_demo["export_dir"]
    with open(os.path.join(export_dir, "item_map.tsv")) as f:
        next(f)
        raw_ids = np.array([int(line.split("\t")[1]) for line in f], dtype=np.int64)
    vectors = np.load(os.path.join(export_dir, "item_vectors.npy"))
    known = set(raw_ids.tolist())
    clicks = defaultdict(list)
    with gzip.open(CLICKS, "rt") as f:
        for row in csv.DictReader(f):
            if int(row["item"]) in known:
                clicks[row["user"]].append((int(row["timestamp"]), int(row["item"])))
    histories = []
    for user in sorted(clicks):
        items = list(dict.fromkeys(i for _, i in sorted(clicks[user])))
        if len(items) >= 12:
            histories.append(items[:12])
    with gzip.open(TITLES, "rt") as f:
        titles = {int(r["item"]): html.unescape(r["title"]).strip() for r in csv.DictReader(f)}
    return {"raw_ids": raw_ids, "vectors": vectors, "known": known, "histories": histories[:50],
            "titles": titles}


def exact_recall(interests: np.ndarray, raw_ids: np.ndarray, vectors: np.ndarray, top_k: int):
    """The same merge over an exact numpy search: what FLAT Milvus must return."""
    from paddlerec_milvus.recall import ExactIndex, recall_top_k

    index = ExactIndex(vectors.shape[1])
    index.upsert(raw_ids, vectors)
    return recall_top_k(index, interests, top_k)


# -- the endpoints ----------------------------------------------------------------------------
def test_health_count_and_docs(api, demo, exported_demo):
    h = api.get("/health")
    assert h.status_code == 200, h.text
    body = h.json()
    assert body["status"] == "ok" and body["model_loaded"] and body["milvus_reachable"]
    assert body["collection"] == exported_demo["collection"]
    assert body["count"] == len(demo["raw_ids"]) == 1940
    assert body["limits"]["max_users"] == 256
    c = api.post("/rec/count")
    assert c.status_code == 200 and c.json()["count"] == 1940
    assert api.get("/docs").status_code == 200
    paths = api.get("/openapi.json").json()["paths"]
    for p in ("/rec/insert_data", "/rec/recall", "/rec/count", "/rec/drop", "/qa/drop", "/health",
              "/items/search", "/items"):
        assert p in paths, p


def test_recall_contract_and_exact(api, demo):
    rows = demo["histories"][:2]
    r = api.post("/rec/recall", {"top_k": 50, "hist_item": rows, "with_scores": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["items"]) == 2 and body["top_k"] == 50
    interests = np.array(api.post("/rec/interests", {"hist_item": rows}).json()["interests"])
    assert interests.shape[:2] == (2, 4)
    truth = exact_recall(interests, demo["raw_ids"], demo["vectors"], 50)
    for items, scores, exact in zip(body["items"], body["scores"], truth):
        assert len(items) == 50 == len(set(items)) and set(items) <= demo["known"]
        assert scores == sorted(scores, reverse=True)
        # FLAT search = exact: the same list (up to float ties), the same scores
        np.testing.assert_allclose(scores, exact.scores, rtol=1e-4, atol=1e-3)
        assert len(set(items[:20]) & set(exact.ids[:20])) >= 19

    # defaults: top_k 50, no scores; one list per row; ids as the design's contract
    r = api.post("/rec/recall", {"hist_item": [rows[0]]}).json()
    assert len(r["items"]) == 1 and len(r["items"][0]) == 50 and r["scores"] is None

    # exclude_history drops clicked items; titles come along on request
    r = api.post("/rec/recall", {"top_k": 30, "hist_item": [rows[0]], "exclude_history": True,
                                 "with_titles": True}).json()
    assert not set(r["items"][0]) & set(rows[0]) and len(r["items"][0]) == 30
    assert r["titles"][0] == [demo["titles"].get(i) for i in r["items"][0]]

    # unknown ids in a row are ignored (and said so); the design's example has only unknown ids
    r = api.post("/rec/recall", {"top_k": 5, "hist_item": [rows[0] + [987654321]]})
    assert r.status_code == 200 and "987654321" in r.json()["notes"][0]
    r = api.post("/rec/recall", {"top_k": 50, "hist_item": [[43, 23, 65], [675, 3456]]})
    assert r.status_code == 400 and "none of its item ids is known" in r.json()["detail"]

    # a filter on the collection's fields is passed to Milvus
    cut = int(np.median(demo["raw_ids"]))
    r = api.post("/rec/recall", {"top_k": 20, "hist_item": [rows[0]], "filter": f"item_id < {cut}"})
    assert r.status_code == 200 and all(i < cut for i in r.json()["items"][0])


def test_full_batch_at_the_limit(api, demo):
    rows = [demo["histories"][i % len(demo["histories"])] for i in range(256)]
    r = api.post("/rec/recall", {"top_k": 10, "hist_item": rows})
    assert r.status_code == 200, r.text
    items = r.json()["items"]
    assert len(items) == 256 and items[0] == items[len(demo["histories"])]


def test_insert_data_is_idempotent(api):
    before = api.post("/rec/count").json()["count"]
    for _ in range(2):
        r = api.post("/rec/insert_data")
        assert r.status_code == 200, r.text
        assert r.json()["written"] == 1940 and r.json()["count"] == before


def test_new_item_is_recalled_by_the_next_request(api, demo):
    """Journey 6: an item upserted now is found by the next recall (no rebuild, no restart)."""
    history = demo["histories"][3]
    interests = np.array(api.post("/rec/interests", {"hist_item": [history]}).json()["interests"][0])
    strongest = interests[np.argmax(np.linalg.norm(interests, axis=1))]
    before = api.post("/rec/recall", {"top_k": 10, "hist_item": [history], "with_scores": True}).json()
    best = before["scores"][0][0]
    new_id = 10**12 + 7
    # a vector along the user's strongest interest, scoring twice the current best item
    vec = strongest / np.linalg.norm(strongest) ** 2 * (2 * abs(best) + 1)
    r = api.post("/rec/upsert_items", {"item_id": [new_id], "embedding": [vec.tolist()]})
    assert r.status_code == 200, r.text
    assert r.json()["written"] == 1 and r.json()["count"] == 1941
    after = api.post("/rec/recall", {"top_k": 10, "hist_item": [history], "with_scores": True}).json()
    assert after["items"][0][0] == new_id
    assert after["scores"][0][0] == pytest.approx(2 * abs(best) + 1, rel=1e-3)
    assert after["items"][0][1:] == before["items"][0][:9]
    # the same item, moved away from the user: gone from the top at once
    r = api.post("/rec/upsert_items", {"item_id": [new_id], "embedding": [(-vec).tolist()]})
    assert r.json()["count"] == 1941
    again = api.post("/rec/recall", {"top_k": 10, "hist_item": [history]}).json()
    assert again["items"][0] == before["items"][0]


def test_drop_then_count_zero_then_insert(api, demo):
    history = demo["histories"][0]
    r = api.post("/rec/drop")
    assert r.status_code == 200 and r.json()["count"] == 0
    assert api.post("/rec/count").json()["count"] == 0
    r = api.post("/rec/recall", {"top_k": 10, "hist_item": [history]})  # never a silent empty answer
    assert r.status_code == 503 and "POST /rec/insert_data" in r.json()["detail"], r.text
    h = api.get("/health")
    assert h.status_code == 503 and h.json()["status"] == "degraded" and "demo_serving" in h.json()["error"]
    r = api.post("/rec/insert_data")
    assert r.status_code == 200 and r.json()["count"] == 1940  # the new item of the last test is gone
    assert api.post("/qa/drop").json()["count"] == 0
    assert api.post("/rec/insert_data").json()["count"] == 1940
    r = api.post("/rec/recall", {"top_k": 10, "hist_item": [history]})
    assert r.status_code == 200 and len(r.json()["items"][0]) == 10


def test_items_search_and_titles(api, demo):
    r = api.get("/items/search", params={"q": "harry potter", "limit": 5})
    assert r.status_code == 200
    found = r.json()["items"]
    assert found and all("harry potter" in it["title"].lower() and it["known"] for it in found)
    assert all(it["item_id"] in demo["known"] for it in found)
    assert r.json()["total_matches"] >= len(found)
    some = sorted(demo["known"])[:3]
    r = api.get("/items", params={"ids": some + [5]})
    items = r.json()["items"]
    assert [it["item_id"] for it in items] == some + [5]
    assert items[0]["title"] == demo["titles"].get(some[0]) and items[-1]["known"] is False
    assert api.get("/items/search", params={"q": str(some[0])}).json()["items"][0]["item_id"] == some[0]
    assert api.get("/items/search", params={"q": "zzzz-no-such-book"}).json()["items"] == []


BAD = [
    # (body or raw text, status, words the message must contain)
    ({"top_k": "5", "hist_item": [[1]]}, 422, "top_k"),
    ({"top_k": 5, "hist_item": "12991"}, 422, "hist_item"),
    ({"top_k": 5, "hist_item": [["12991"]]}, 422, "hist_item[0][0]"),
    ({"top_k": 5, "hist_item": [[True]]}, 422, "hist_item[0][0]"),
    ({"top_k": 5, "hist_item": [[1.5]]}, 422, "hist_item[0][0]"),
    ({"top_k": 5, "hist_item": [[-3]]}, 422, "greater than or equal to 0"),
    ({"top_k": 5, "hist_item": [[2**64]]}, 422, "hist_item[0][0]"),
    ({"top_k": 5, "hist_item": [[]]}, 422, "hist_item[0]"),
    ({"top_k": 5, "hist_item": []}, 422, "hist_item"),
    ({"top_k": 5}, 422, "hist_item: Field required"),
    ({"top_k": 0, "hist_item": [[1]]}, 422, "top_k"),
    ({"top_k": 10**9, "hist_item": [[1]]}, 422, "less than or equal to 16384"),
    ({"top_k": 1001, "hist_item": [[1]]}, 400, "out of range 1..1000"),
    ({"top_k": 5, "hist_item": [[1]], "histitem": 1}, 422, "histitem"),
    ({"top_k": 5, "hist_item": [[1]] * 10000}, 400, "the limit is 256"),
    ({"top_k": 5, "hist_item": [list(range(1, 1002))]}, 400, "the limit is 1000"),
    ({"top_k": 5, "hist_item": [[1]], "filter": "item_id < 1000 adn item_id > 500"}, 400, "'adn'"),
    ({"top_k": 5, "hist_item": [[1]], "filter": "item_id < 0; drop"}, 400, "';'"),
    ({"top_k": 5, "hist_item": [[1, 2]]}, 400, "none of its item ids is known"),
    ("{not json", 422, "JSON"),
    ([1, 2], 422, "body"),
]


@pytest.mark.parametrize("body,status,words", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_bad_recall_requests_get_4xx(api, body, status, words):
    if isinstance(body, str):
        r = requests.post(api.url + "/rec/recall", data=body, timeout=30,
                          headers={"Content-Type": "application/json"})
    else:
        r = api.post("/rec/recall", body)
    assert r.status_code == status, r.text
    assert words in r.json()["detail"], r.json()["detail"]


def test_recall_content_types_and_empty_bodies(api, demo):
    """/rec/recall is answered by plain ASGI code beside FastAPI: it must read what FastAPI
    would, refuse what it cannot read with a reason, and keep the schema on /docs."""
    body = json.dumps({"top_k": 3, "hist_item": [demo["histories"][0]]})
    want = api.post("/rec/recall", json.loads(body)).json()["items"]
    for ctype in ("application/json", "application/json; charset=utf-8", "application/vnd.api+json",
                  None):
        headers = {"Content-Type": ctype} if ctype else {}
        r = requests.post(api.url + "/rec/recall", data=body.encode(), headers=headers, timeout=30)
        assert r.status_code == 200 and r.json()["items"] == want, (ctype, r.text)
    r = requests.post(api.url + "/rec/recall", data=body, headers={"Content-Type": "text/plain"}, timeout=30)
    assert r.status_code == 415 and "text/plain" in r.json()["detail"]
    for empty in (b"", b"  \n"):
        r = requests.post(api.url + "/rec/recall", data=empty, timeout=30,
                          headers={"Content-Type": "application/json"})
        assert r.status_code == 422 and "empty" in r.json()["detail"], r.text
    r = requests.post(api.url + "/rec/recall", data=b"\xff\xfe", timeout=30,
                      headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and "not valid JSON" in r.json()["detail"]
    assert api.get("/rec/recall").status_code == 405
    op = api.get("/openapi.json").json()["paths"]["/rec/recall"]["post"]
    assert op["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/RecallRequest")
    assert "429" in op["responses"] and "422" in op["responses"]


def test_other_bad_requests_and_the_service_keeps_answering(api, demo):
    history = demo["histories"][0]
    r = api.post("/rec/recall", {"top_k": 5, "hist_item": [history], "filter": "no_such_field > 3"})
    assert r.status_code == 400 and "filter" in r.json()["detail"]
    r = api.post("/rec/upsert_items", {"item_id": [5], "embedding": [[1.0, 2.0]]})
    assert r.status_code == 400 and "embedding[0] has 2 values" in r.json()["detail"]
    r = api.post("/rec/upsert_items", {"item_id": [5, 6], "embedding": [[0.1] * 64]})
    assert r.status_code == 400 and "2 item ids but 1 embeddings" in r.json()["detail"]
    r = api.post("/rec/upsert_items", {"item_id": [5, 5], "embedding": [[0.1] * 64] * 2})
    assert r.status_code == 400 and "duplicates" in r.json()["detail"]
    r = api.post("/rec/upsert_items", {"item_id": [5], "embedding": [[1e300] * 64]})
    assert r.status_code == 400 and "float32" in r.json()["detail"]
    nan = '{"item_id": [5], "embedding": [[NaN' + ",0" * 63 + "]]}"
    r = requests.post(api.url + "/rec/upsert_items", data=nan,
                      headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 422, r.text
    r = api.post("/rec/upsert_items", {"item_id": [0], "embedding": [[0.1] * 64]})
    assert r.status_code == 422 and "item_id[0]" in r.json()["detail"]
    big = b'{"top_k": 5, "hist_item": [[' + b"1," * 600_000 + b'1]]}'
    r = requests.post(api.url + "/rec/recall", data=big, headers={"Content-Type": "application/json"},
                      timeout=60)
    assert r.status_code == 413 and "over the limit" in r.json()["detail"]
    assert api.get("/items/search", params={"q": ""}).status_code == 422
    assert api.get("/items", params={"ids": "x"}).status_code == 422
    assert api.post("/rec/nothing").status_code == 404
    # nothing above hurt the service or the collection
    assert api.alive()
    assert api.post("/rec/count").json()["count"] == 1940
    r = api.post("/rec/recall", {"top_k": 5, "hist_item": [history]})
    assert r.status_code == 200 and len(r.json()["items"][0]) == 5


# -- a real Milvus server: the serving name is an alias of the exported version ------------------
@pytest.mark.server
def test_on_a_milvus_server_drop_keeps_the_alias(exported_demo_server, demo, tmp_path):
    srv = ApiProcess(str(tmp_path / "api-server.log"), export_dir=exported_demo_server["export_dir"],
                     titles=TITLES).start()  # uri and collection from the export's manifest
    try:
        history = demo["histories"][0]
        h = srv.get("/health").json()
        assert h["status"] == "ok" and h["milvus_uri"].startswith("http://") and h["count"] == 1940
        first = srv.post("/rec/recall", {"top_k": 10, "hist_item": [history]}).json()["items"][0]
        assert len(first) == 10
        r = srv.post("/rec/drop")
        assert r.status_code == 200 and r.json()["count"] == 0, r.text
        r = srv.post("/rec/recall", {"top_k": 10, "hist_item": [history]})
        assert r.status_code == 503 and "empty" in r.json()["detail"], r.text
        assert srv.post("/rec/insert_data").json()["count"] == 1940
        assert srv.post("/rec/recall", {"top_k": 10, "hist_item": [history]}).json()["items"][0] == first
    finally:
        srv.stop()
    assert srv.proc.returncode == 0, srv.tail()


# -- Milvus down: 503, and the service stays up -------------------------------------------------
def test_milvus_down_gives_503_and_service_stays_up(exported_demo, demo, tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"
    srv = ApiProcess(str(tmp_path / "api-down.log"), export_dir=exported_demo["export_dir"], uri=dead,
                     collection="demo_serving", titles=TITLES, timeout="1").start()
    try:
        h = srv.get("/health")
        assert h.status_code == 503 and h.json()["status"] == "degraded"
        assert h.json()["model_loaded"] and not h.json()["milvus_reachable"]
        for path, body in (("/rec/recall", {"top_k": 5, "hist_item": [demo["histories"][0]]}),
                           ("/rec/count", None), ("/rec/insert_data", None), ("/rec/drop", None)):
            r = srv.post(path, body)
            assert r.status_code == 503, (path, r.text)
            assert "cannot reach Milvus" in r.json()["detail"]
        # what needs no Milvus still works; bad input is still a 4xx
        assert srv.post("/rec/interests", {"hist_item": [demo["histories"][0]]}).status_code == 200
        assert srv.get("/items/search", params={"q": "harry"}).json()["items"]
        assert srv.post("/rec/recall", {"hist_item": [[]]}).status_code == 422
        assert srv.alive()
    finally:
        srv.stop()
    assert srv.proc.returncode == 0, srv.tail()


# -- property-based: schemathesis over the OpenAPI schema -------------------------------------
def _fuzz(op, mode, base_url: str, session: requests.Session, checks: list, examples: int) -> int:
    """Run ``examples`` generated cases of one operation against the server; returns calls made."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    made = []

    @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=op.as_strategy(generation_mode=mode))
    def run(case) -> None:
        case.call_and_validate(base_url=base_url, session=session, checks=checks, timeout=60)
        made.append(1)

    try:
        run()
    except Unsatisfiable:  # an operation without parameters has no invalid input to generate
        if mode != GenerationMode.NEGATIVE or op.body or op.query:
            raise
    return len(made)


def test_schemathesis_finds_no_server_errors(exported_demo, tmp_path):
    """Generated valid and invalid requests for every operation: never a 5xx, responses as
    documented. Own server on a fresh Lite file (it drops and upserts at random)."""
    import schemathesis
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        negative_data_rejection,
        response_schema_conformance,
        status_code_conformance,
    )

    srv = ApiProcess(str(tmp_path / "api-st.log"), export_dir=exported_demo["export_dir"],
                     uri=str(tmp_path / "fresh.db"), collection="st_items", titles=TITLES).start()
    try:
        assert srv.post("/rec/insert_data").json()["count"] == 1940  # creates the collection
        schema = schemathesis.openapi.from_dict(srv.get("/openapi.json").json())
        @schemathesis.check
        def invalid_data_rejected(ctx, response, case):
            """negative_data_rejection, counting 413 (body over the size limit) as a rejection too."""
            if response.status_code == 413:
                return None
            return negative_data_rejection(ctx, response, case)

        checks = [not_a_server_error, status_code_conformance, content_type_conformance,
                  response_schema_conformance, invalid_data_rejected]
        session = requests.Session()
        calls = defaultdict(int)
        for result in schema.get_all_operations():
            op = result.ok()
            for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
                calls[op.label] += _fuzz(op, mode, srv.url, session, checks, examples=25)
        assert len(calls) >= 10 and sum(calls.values()) >= 200, dict(calls)
        assert srv.alive() and srv.get("/health").status_code == 200
    finally:
        srv.stop()
    assert srv.proc.returncode == 0, srv.tail()


# -- the demo page in headless Chromium --------------------------------------------------------
def _chromium() -> tuple[str, str]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not browser or not driver:
        why = "needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)"
        if os.environ.get("CI"):
            pytest.fail(why)  # CI installs them: a missing browser there is a broken setup, not a skip
        pytest.skip(why)
    return browser, driver


def test_demo_page_shows_recommendations(api, demo, tmp_path):
    browser, driver_path = _chromium()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", "--window-size=1280,900", f"--user-data-dir={tmp_path / 'profile'}"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    drv = webdriver.Chrome(service=Service(executable_path=driver_path,
                                           log_output=str(tmp_path / "chromedriver.log")), options=opts)
    try:
        wait = WebDriverWait(drv, 30)
        drv.get(api.url + "/")
        wait.until(lambda d: "item vectors" in d.find_element(By.ID, "status").text)
        picked = []
        for query in ("harry potter", "hunger games", "divergent"):
            box = drv.find_element(By.ID, "search")
            box.clear()
            box.send_keys(query)
            wait.until(lambda d, q=query: (lambda lis: lis and all(q in li.text.lower() for li in lis))(
                d.find_elements(By.CSS_SELECTOR, "#matches li[data-item]")))
            first = drv.find_elements(By.CSS_SELECTOR, "#matches li[data-item]")[0]
            picked.append(int(first.get_attribute("data-item")))
            first.click()
            wait.until(lambda d, n=len(picked): len(d.find_elements(By.CSS_SELECTOR, "#history li")) == n)
        box.clear()
        drv.find_element(By.ID, "search").send_keys("harry")
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#matches li[data-item]")))
        wait.until(lambda d: f"history of {len(picked)}" in d.find_element(By.ID, "message").text)
        rows = drv.find_elements(By.CSS_SELECTOR, "#results tbody tr")
        assert len(rows) == 20
        shown = [int(r.get_attribute("data-item")) for r in rows]
        titles = [r.find_element(By.CSS_SELECTOR, "td.title").text for r in rows]
        assert not set(shown) & set(picked)  # "hide items already in the history" is on
        assert all(titles) and titles[0] == demo["titles"].get(shown[0])
        # the page shows what the API answers for that history
        expect = api.post("/rec/recall", {"top_k": 20, "hist_item": [picked], "exclude_history": True}).json()
        assert shown == expect["items"][0]
        shot = os.environ.get("PADDLEREC_MILVUS_SCREENSHOT") or str(tmp_path / "demo_page.png")
        drv.save_screenshot(shot)
        assert os.path.getsize(shot) > 10_000
        errors = [e for e in drv.get_log("browser") if e.get("level") == "SEVERE"]
        assert not errors, json.dumps(errors)[:2000]
    finally:
        drv.quit()
