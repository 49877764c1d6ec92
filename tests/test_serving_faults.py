"""The REST service under faults, with real processes: browser-origin and chunked requests, a
Milvus Lite child and a Milvus server killed with -9 and restarted, re-export under load, an
export that meets a dead Milvus or a SIGTERM, and version pruning. Waits are bounded."""

from __future__ import annotations

import glob
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import requests
from milvus_lite_children import kill_milvus_lite_children
from test_rest_api import TITLES, ApiProcess, exact_recall

pytestmark = pytest.mark.slow
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _histories(export_dir: str, n: int = 8) -> list[list[int]]:
    with open(os.path.join(export_dir, "item_map.tsv")) as f:
        next(f)
        raw = [int(line.split("\t")[1]) for line in f]
    rng = np.random.default_rng(7)
    return [rng.choice(raw, size=6, replace=False).tolist() for _ in range(n)]


def _offline(export_dir: str, histories: list[list[int]], top_k: int) -> list[list[int]]:
    """What exactly this export must answer: its user tower, exact search over its vectors."""
    from paddlerec_milvus.recall import latest_clicks
    from paddlerec_milvus.service import UserTowerPredictor
    from paddlerec_milvus.serving_contract import Manifest, read_export_item_map

    m = Manifest.load(export_dir)
    raw = read_export_item_map(export_dir, m.item_count)
    dense = {int(r): d for d, r in enumerate(raw) if d > 0}
    hist = np.zeros((len(histories), m.maxlen), dtype=np.int64)
    for i, h in enumerate(histories):
        d = [dense[x] for x in h][-m.maxlen:]
        hist[i, :len(d)] = d
    lens = np.array([min(len(h), m.maxlen) for h in histories], dtype=np.int64)
    interests = UserTowerPredictor(export_dir, m)(*latest_clicks(hist, lens, m.history_len or None))
    vectors = np.load(os.path.join(export_dir, "item_vectors.npy"))
    return [r.ids for r in exact_recall(interests, raw[1:], vectors, top_k)]


def _cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "paddlerec_milvus.cli", *args], capture_output=True,
                          text=True, timeout=kw.pop("timeout", 300), cwd=REPO, **kw)


@pytest.fixture
def lite_api(exported_demo, tmp_path):
    """A REST API on its own copy of the exported Lite file, with an API token."""
    db = tmp_path / "own.db"
    shutil.copy(exported_demo["milvus_uri"], db)
    srv = ApiProcess(str(tmp_path / "api.log"), export_dir=exported_demo["export_dir"], uri=str(db),
                     collection=exported_demo["collection"], titles=TITLES, api_token="s3cret",
                     max_body_bytes=str(2**20), timeout="3").start()
    yield srv
    srv.stop()


def test_other_sites_and_strangers_cannot_change_the_collection(lite_api, exported_demo):
    drop = lite_api.url + "/rec/drop"
    # the request a hostile page can send without CORS: a form-like POST with its Origin
    r = requests.post(drop, data="x", headers={"Origin": "http://evil.example", "Content-Type": "text/plain"})
    assert r.status_code == 403 and "Origin" in r.json()["detail"]
    r = requests.post(drop, json={}, headers={"Origin": "http://evil.example"})
    assert r.status_code == 403
    r = requests.post(drop, data="x", headers={"Content-Type": "text/plain"})
    assert r.status_code == 415 and "application/json" in r.json()["detail"]
    r = requests.post(drop, json={})  # no token
    assert r.status_code == 401 and r.headers.get("www-authenticate") == "Bearer"
    r = requests.post(drop, json={}, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401
    r = requests.get(lite_api.url + "/health", headers={"Host": "evil.example"})  # DNS rebinding
    assert r.status_code == 400 and "Host" in r.json()["detail"]
    assert lite_api.post("/rec/count").json()["count"] == 1940  # nothing was dropped
    # the demo page's own origin, with the token: allowed
    ok = {"Authorization": "Bearer s3cret", "Origin": lite_api.url}
    r = requests.post(drop, json={}, headers=ok)
    assert r.status_code == 200, r.text
    r = requests.post(lite_api.url + "/rec/insert_data", json={}, headers=ok)
    assert r.status_code == 200 and r.json()["count"] == 1940


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))


def test_a_chunked_body_cannot_pass_the_size_limit(lite_api, exported_demo):
    hist = _histories(exported_demo["export_dir"], 1)
    before = _rss_kb(lite_api.proc.pid)
    conn = http.client.HTTPConnection("127.0.0.1", lite_api.port, timeout=30)
    chunk = b"[" + b"1," * 50_000
    t0 = time.monotonic()

    def body():
        yield b'{"top_k": 5, "hist_item": [['
        for _ in range(200):  # 20 MB, no Content-Length
            yield chunk

    try:
        conn.request("POST", "/rec/recall", body=body(), headers={"Content-Type": "application/json"},
                     encode_chunked=True)
        resp = conn.getresponse()
        status, text = resp.status, resp.read()
    except (BrokenPipeError, ConnectionResetError):  # refused before we finished sending
        status, text = 413, b'{"detail": "over the limit"}'
    finally:
        conn.close()
    took = time.monotonic() - t0
    assert status == 413 and b"over the limit" in text, text
    assert _rss_kb(lite_api.proc.pid) - before < 30_000, "the server buffered the oversized body"
    assert took < 10
    r = lite_api.post("/rec/recall", {"top_k": 5, "hist_item": hist})
    assert r.status_code == 200 and len(r.json()["items"][0]) == 5


def test_a_killed_milvus_lite_child_is_restarted(lite_api, exported_demo):
    hist = _histories(exported_demo["export_dir"], 2)
    want = lite_api.post("/rec/recall", {"top_k": 10, "hist_item": hist}).json()["items"]
    assert kill_milvus_lite_children(lite_api.proc.pid), "no Milvus Lite child found"
    t0 = time.monotonic()
    first_error = None
    while time.monotonic() - t0 < 30:
        r = lite_api.post("/rec/recall", {"top_k": 10, "hist_item": hist})
        if r.status_code == 200:
            break
        assert r.status_code == 503, r.text
        first_error = first_error or time.monotonic() - t0
        time.sleep(0.2)
    recovered = time.monotonic() - t0
    assert r.status_code == 200 and r.json()["items"] == want, r.text
    assert recovered < 15, recovered
    assert lite_api.get("/health").json()["status"] == "ok"
    print(f"Lite child killed: first error after {first_error}, recovered after {recovered:.2f} s")


# -- a Milvus server of these tests' own: killed, restarted, re-exported into ----------------------
@pytest.fixture(scope="module")
def own_server(tmp_path_factory):
    from paddlerec_milvus.milvus_server import MilvusServer

    srv = MilvusServer(str(tmp_path_factory.mktemp("fault-milvus")))
    srv.start()
    yield srv
    srv.stop()


def _export(trained, uri: str, out: str, epoch: int, *extra: str) -> subprocess.CompletedProcess:
    return _cli("export", "-m", trained["config_path"], "-o", *trained["overrides"], f"milvus.uri={uri}",
                *extra, "--collection", "fault_serving", "--epoch", str(epoch), "--output", out)


def _server_kill(srv) -> None:
    os.killpg(srv.proc.pid, signal.SIGKILL)
    srv.proc.wait(10)
    srv.proc = None


@pytest.mark.server
def test_milvus_server_kill9_gives_bounded_errors_and_recovers(own_server, trained_demo, tmp_path):
    out = str(tmp_path / "export")
    p = _export(trained_demo, own_server.uri, out, 1)
    assert p.returncode == 0, p.stderr
    hist = _histories(out, 2)
    srv = ApiProcess(str(tmp_path / "api.log"), export_dir=out, titles=TITLES, timeout="3").start()
    try:
        want = srv.post("/rec/recall", {"top_k": 10, "hist_item": hist}).json()["items"]
        _server_kill(own_server)
        took = {}
        for method, path, body in (("GET", "/health", None), ("POST", "/rec/count", None),
                                   ("POST", "/rec/recall", {"top_k": 10, "hist_item": hist}),
                                   ("POST", "/rec/insert_data", None), ("POST", "/rec/drop", None)):
            t0 = time.monotonic()
            r = srv.get(path) if method == "GET" else srv.post(path, body)
            took[path] = round(time.monotonic() - t0, 2)
            assert r.status_code == 503, (path, r.text)
            assert "Milvus" in (r.json().get("detail") or r.json().get("error")), r.text
            assert took[path] < 3 + 2, (path, took)  # the documented limit is the worst case
        own_server.start()
        t0 = time.monotonic()
        while time.monotonic() - t0 < 90:
            r = srv.post("/rec/recall", {"top_k": 10, "hist_item": hist})
            if r.status_code == 200:
                break
            assert r.status_code == 503, r.text  # never a silent empty 200
            time.sleep(0.5)
        assert r.status_code == 200 and r.json()["items"] == want, r.text
        print(f"server killed: errors after {took}; recall back {time.monotonic() - t0:.1f} s after restart")
    finally:
        srv.stop()


@pytest.mark.server
def test_reexport_under_load_answers_from_exactly_one_version(own_server, trained_demo, tmp_path):
    out = str(tmp_path / "export")
    p = _export(trained_demo, own_server.uri, out, 0)
    assert p.returncode == 0, p.stderr
    hist = _histories(out, 4)
    versions = {json.load(open(os.path.join(out, "manifest.json")))["model_version"]:
                _offline(out, hist, 10)}
    srv = ApiProcess(str(tmp_path / "api.log"), export_dir=out, titles=TITLES).start()
    answers, stop = [], threading.Event()

    def load():
        with requests.Session() as s:
            while not stop.is_set():
                r = s.post(srv.url + "/rec/recall", json={"top_k": 10, "hist_item": hist}, timeout=30)
                answers.append((r.status_code, r.json()))

    loaders = [threading.Thread(target=load) for _ in range(3)]
    try:
        for t in loaders:
            t.start()
        for epoch in (1, 0, 1):
            p = _export(trained_demo, own_server.uri, out, epoch)
            assert p.returncode == 0, p.stderr
            versions[json.load(open(os.path.join(out, "manifest.json")))["model_version"]] = \
                _offline(out, hist, 10)
            time.sleep(2.5)  # the service notices the new manifest within its watch interval
        stop.set()
        for t in loaders:
            t.join(60)
        assert srv.get("/health").json()["model_version"] == list(versions)[-1]
    finally:
        stop.set()
        srv.stop()
    seen = {}
    assert len(answers) > 50
    for status, body in answers:
        assert status == 200, body
        v = body["model_version"]
        assert v in versions, v
        assert body["items"] == versions[v], f"answer of {v} differs from that version's offline answer"
        seen[v] = seen.get(v, 0) + 1
    assert len(seen) >= 3, seen  # the service moved through the versions as they were exported
    from pymilvus import MilvusClient

    names = [n for n in MilvusClient(uri=own_server.uri).list_collections()
             if n.startswith("fault_serving_v")]
    assert len(names) == 2, names  # the served version and the one before; older ones pruned


@pytest.mark.server
def test_a_request_whose_versions_collection_is_pruned_is_redone_on_the_newer_export(
        own_server, trained_demo, tmp_path):
    """Its interests came from the old tower: searched in the newer collection they made an
    answer of neither version, labelled with the old one."""
    from pymilvus import MilvusClient

    from paddlerec_milvus.service import RecallAnswer, RecallService

    out = str(tmp_path / "export")
    p = _export(trained_demo, own_server.uri, out, 0)
    assert p.returncode == 0, p.stderr
    hist = _histories(out, 3)
    svc = RecallService(out, watch_interval_s=3600)  # stays on the first version until told
    try:
        old = svc.current()
        job = svc.prepare(hist, top_k=10)
        p = _export(trained_demo, own_server.uri, out, 1)
        assert p.returncode == 0, p.stderr
        want = _offline(out, hist, 10)
        newer = json.load(open(os.path.join(out, "manifest.json")))["model_version"]
        MilvusClient(uri=own_server.uri).drop_collection(old.collection)  # as an export elsewhere would
        job.deadline = time.monotonic() + 30  # the export took longer than a request may
        (answer,) = svc.run_recall([job])
        assert isinstance(answer, RecallAnswer), answer
        assert answer.model_version == newer != old.version
        assert answer.items == want
    finally:
        svc.close()


@pytest.mark.server
def test_export_fails_fast_and_cleanly_when_milvus_is_dead_or_on_sigterm(own_server, trained_demo, tmp_path):
    from paddlerec_milvus.milvus_server import free_port

    out = str(tmp_path / "export")
    dead = f"http://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    p = _export(trained_demo, dead, out, 1, "milvus.timeout=3")
    took = time.monotonic() - t0
    assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr
    assert "cannot reach Milvus" in p.stderr and took < 60, (took, p.stderr)
    assert not glob.glob(str(tmp_path / ".export.tmp-*")) and not os.path.exists(out)
    # SIGTERM in the middle: no temp folder and no half-filled collection stay behind
    proc = subprocess.Popen([sys.executable, "-m", "paddlerec_milvus.cli", "export", "-m",
                             trained_demo["config_path"], "-o", *trained_demo["overrides"],
                             f"milvus.uri={own_server.uri}", "--collection", "term_serving",
                             "--output", out], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not glob.glob(str(tmp_path / ".export.tmp-*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)
    assert proc.returncode != 0
    assert not glob.glob(str(tmp_path / ".export.tmp-*")) and not os.path.exists(out)
    from pymilvus import MilvusClient

    left = [n for n in MilvusClient(uri=own_server.uri).list_collections() if n.startswith("term_serving")]
    assert left == [], left
