"""The Paddle Serving pipeline, for real: `paddlerec-milvus serve` as a subprocess on free loopback
ports, the small trained model, Milvus Lite and a real Milvus server; called over RPC
(PipelineClient, in a client subprocess: this process may already hold the upb protobuf that
Paddle Serving cannot use) and over HTTP; answers checked against the in-process RecallService.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import requests

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "serving"))
if REPO not in sys.path:
    sys.path.insert(0, REPO)
from http_client import post_fields, recall_http  # noqa: E402
from milvus_lite_children import kill_milvus_lite_children  # noqa: E402

from benchmarks.common import descendants  # noqa: E402
from paddlerec_milvus.milvus_server import free_port  # noqa: E402
from paddlerec_milvus.serving_contract import ServingLimits  # noqa: E402

ENV = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
MAX_TOP_K, MAX_USERS = 200, 8
UNKNOWN_ID = 987654321


# -- helpers --------------------------------------------------------------------------------
def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return True
    return False


def run_cli(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "paddlerec_milvus.cli", *args], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


class Pipeline:
    """``paddlerec-milvus serve -c <generated config>`` in a subprocess, in its own empty cwd."""

    def __init__(self, base: str, export_dir: str, milvus_uri: str, collection: str, **extra: object):
        self.base = base
        self.cwd = os.path.join(base, "cwd")
        os.makedirs(self.cwd, exist_ok=True)
        self.rpc_port, self.http_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.http_port}/recall/prediction"
        self.endpoint = f"127.0.0.1:{self.rpc_port}"
        conf = {
            "host": "127.0.0.1", "rpc_port": self.rpc_port, "http_port": self.http_port,
            "worker_num": 8, "log_dir": "logs",  # relative: to the config's folder
            "op": {"user_tower": {"concurrency": 4}, "recall": {"concurrency": 4}},
            "recall": {"export_dir": export_dir, "milvus_uri": milvus_uri, "collection": collection,
                       "max_top_k": MAX_TOP_K, "max_users": MAX_USERS, "milvus_timeout": 2,
                       "milvus_retries": 0},
        }
        for key, value in extra.items():
            conf[key] = {**conf.get(key, {}), **value} if isinstance(value, dict) else value
        self.config = os.path.join(base, "config.yml")
        with open(self.config, "w") as f:
            json.dump(conf, f)  # JSON is YAML
        self.log = os.path.join(base, "serve.log")
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120) -> Pipeline:
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "paddlerec_milvus.cli", "serve", "-c", self.config],
                cwd=self.cwd, env=ENV, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log_text()
            if "recall pipeline ready" in text:
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        self.kill()
        raise AssertionError(f"pipeline did not start:\n{self.log_text()[-4000:]}")

    def log_text(self) -> str:
        with open(self.log, errors="replace") as f:
            return f.read()

    def stop(self, timeout: float = 30) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            for pid in descendants(self.proc.pid):
                os.kill(pid, signal.SIGKILL)
            self.proc.kill()
            self.proc.wait(10)


class RpcClientProcess:
    """``serving/rpc_client.py --stdin``: one JSON request per line in, one answer per line out."""

    def __init__(self, endpoint: str):
        self.proc = subprocess.Popen(
            [sys.executable, os.path.join(REPO, "serving", "rpc_client.py"), "--endpoint", endpoint,
             "--stdin", "--timeout", "20"], env=ENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, text=True)
        self.lock = threading.Lock()

    def call(self, request: dict) -> dict:
        with self.lock:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        assert line, "rpc client process died"
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(10)


class TcpRelay:
    """A TCP forwarder in front of the Milvus server: stopping it is a real network outage."""

    def __init__(self, target_port: int):
        self.target, self.port = target_port, free_port()
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()

    def start(self) -> TcpRelay:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(64)
        s.settimeout(0.2)
        self._listener = s
        threading.Thread(target=self._accept, args=(s,), daemon=True).start()
        return self

    def _accept(self, listener: socket.socket) -> None:
        while self._listener is listener:
            try:
                conn, _ = listener.accept()
            except (TimeoutError, OSError):
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                conn.close()
                continue
            conn.settimeout(None)
            with self._lock:
                self._conns += [conn, upstream]
            for a, b in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def stop(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        with self._lock:
            conns, self._conns = self._conns, []
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()


def demo_histories(export_dir: str, n: int = 3) -> list[list[int]]:
    """Real test-split histories of the demo data, as raw item ids (the ids users know)."""
    raw = {}
    with open(os.path.join(export_dir, "item_map.tsv")) as f:
        next(f)
        for line in f:
            d, r = line.split("\t")
            raw[int(d)] = int(r)
    test_dir = os.path.join(REPO, "models", "mind", "data", "demo", "test")
    rows = []
    with open(os.path.join(test_dir, sorted(os.listdir(test_dir))[0])) as f:
        for line in f:
            hist = [raw[int(t.split(":")[1])] for t in line.split() if t.startswith("hist_item:")]
            if hist:
                rows.append(hist)
            if len(rows) == n:
                break
    rows.append(rows[0] + rows[1])  # longer than maxlen: the latest maxlen are used
    return rows


def assert_same_recall(answer: dict, expected, where: str) -> None:
    assert answer["err_no"] == 0, f"{where}: {answer}"
    assert answer["items"] == expected.items, where
    for got, want in zip(answer["scores"], expected.scores):
        assert got == pytest.approx(want, rel=1e-4, abs=1e-4), where


def stop_and_check(pipe: Pipeline) -> None:
    """SIGTERM: exit 0, no process left behind, no port left listening, no files in the cwd."""
    kids = descendants(pipe.proc.pid)
    assert kids, "the pipeline should have children (HTTP gateway)"
    t0 = time.monotonic()
    assert pipe.stop() == 0, pipe.log_text()[-3000:]
    assert time.monotonic() - t0 < 20
    deadline = time.monotonic() + 10
    while any(alive(p) for p in kids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in kids if alive(p)], "child processes left running"
    assert not listening(pipe.rpc_port) and not listening(pipe.http_port)
    assert os.listdir(pipe.cwd) == [], "Paddle Serving wrote into the working directory"
    assert os.path.isdir(os.path.join(pipe.base, "logs", "PipelineServingLogs"))
    assert not os.path.exists(os.path.join(pipe.base, "logs", "ProcessInfo.json"))
    assert "recall pipeline stopped" in pipe.log_text()


# -- Milvus Lite ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lite_export(trained_demo, tmp_path_factory) -> dict:
    """An export into a Lite file only this module's server opens; a copy of the file (Lite opens a
    .db in one process only) backs the in-process reference service."""
    base = str(tmp_path_factory.mktemp("pipeline-lite"))
    served, ref = os.path.join(base, "served.db"), os.path.join(base, "reference.db")
    export_dir = os.path.join(base, "model")
    run_cli("export", "-m", trained_demo["config_path"], "-o", *trained_demo["overrides"],
            f"milvus.uri={served}", "--collection", "pipeline_items", "--output", export_dir)
    shutil.copy(served, ref)
    return {"base": base, "export_dir": export_dir, "served_uri": served, "ref_uri": ref,
            "collection": "pipeline_items"}


@pytest.fixture(scope="module")
def lite_ref(lite_export):
    from paddlerec_milvus.service import RecallService

    svc = RecallService(lite_export["export_dir"], milvus_uri=lite_export["ref_uri"],
                        limits=ServingLimits(max_top_k=MAX_TOP_K, max_users=MAX_USERS))
    yield svc
    svc.close()


@pytest.fixture(scope="module")
def lite_pipe(lite_export):
    pipe = Pipeline(os.path.join(lite_export["base"], "serve"), lite_export["export_dir"],
                    lite_export["served_uri"], lite_export["collection"])
    pipe.start()
    yield pipe
    pipe.kill()


@pytest.fixture(scope="module")
def lite_rpc(lite_pipe):
    client = RpcClientProcess(lite_pipe.endpoint)
    yield client
    client.close()


def test_lite_rpc_and_http_answer_as_in_process(lite_pipe, lite_rpc, lite_ref, lite_export):
    hists = demo_histories(lite_export["export_dir"])
    for top_k in (10, 50):
        want = lite_ref.recall(hists, top_k)
        assert_same_recall(recall_http(lite_pipe.url, hists, top_k), want, f"http top_k={top_k}")
        assert_same_recall(lite_rpc.call({"hist_item": hists, "top_k": top_k}), want, f"rpc top_k={top_k}")
    # one user at a time, exclude_history, default top_k
    for h in hists:
        want = lite_ref.recall([h], 20, exclude_history=True)
        got = recall_http(lite_pipe.url, [h], 20, exclude_history=True)
        assert_same_recall(got, want, "http exclude_history")
        assert not set(got["items"][0]) & set(h)
        assert_same_recall(lite_rpc.call({"hist_item": [h], "top_k": 20, "exclude_history": True}),
                           want, "rpc exclude_history")
    got = recall_http(lite_pipe.url, hists[:1])
    assert got["err_no"] == 0 and len(got["items"][0]) == 50  # default_top_k
    assert got["model_version"] == lite_ref.manifest.model_version
    # a flat list is one user's history
    flat = post_fields(lite_pipe.url, {"hist_item": json.dumps(hists[0]), "top_k": "5"})
    assert_same_recall(flat, lite_ref.recall([hists[0]], 5), "flat history")


def test_unknown_ids_are_ignored_and_said_so(lite_pipe, lite_rpc, lite_ref, lite_export):
    h = demo_histories(lite_export["export_dir"])[0]
    for got in (recall_http(lite_pipe.url, [h + [UNKNOWN_ID]], 10),
                lite_rpc.call({"hist_item": [h + [UNKNOWN_ID]], "top_k": 10})):
        assert_same_recall(got, lite_ref.recall([h], 10), "unknown id ignored")
        assert any("unknown item ids ignored" in n and str(UNKNOWN_ID) in n for n in got["notes"]), got


BAD_REQUESTS = [
    ({"hist_item": "[[1.5]]"}, "is not an integer item id"),
    ({"hist_item": '[["abc"]]'}, "is not an integer item id"),
    ({"hist_item": "[[5468, -3]]"}, "is negative"),
    ({"hist_item": "[[]]"}, "is empty"),
    ({"hist_item": "[]"}, "non-empty list"),
    ({"hist_item": f"[[{UNKNOWN_ID}]]"}, "none of its item ids is known"),
    ({"hist_item": "GOOD", "top_k": "0"}, f"top_k = 0 out of range 1..{MAX_TOP_K}"),
    ({"hist_item": "GOOD", "top_k": str(MAX_TOP_K + 1)}, "out of range"),
    ({"hist_item": "GOOD", "top_k": '"ten"'}, "must be an integer"),
    ({"hist_item": "[[5468, 30460"}, "hist_item is not valid JSON"),
    ({"top_k": "5"}, 'missing key "hist_item"'),
    ({"hist_item": "GOOD", "topk": "5"}, "unknown request keys ['topk']"),
    ({"hist_item": "GOOD", "exclude_history": '"yes"'}, "must be true or false"),
    ({"hist_item": json.dumps([[5468]] * (MAX_USERS + 1))}, f"the limit is {MAX_USERS}"),
    ({"hist_item": "GOOD", "filter": "item_id < 1000 adn item_id > 500"}, "'adn'"),
    ({"hist_item": "GOOD", "filter": "item_id < 0; drop"}, "';'"),
    ({"hist_item": "GOOD", "filter": "category == 3"}, "unknown field 'category'"),
]


def test_bad_requests_say_what_is_wrong_and_serving_goes_on(lite_pipe, lite_rpc, lite_ref, lite_export):
    good = demo_histories(lite_export["export_dir"])[:1]
    want = lite_ref.recall(good, 10)
    for fields, message in BAD_REQUESTS:
        fields = {k: json.dumps(good) if v == "GOOD" else v for k, v in fields.items()}
        for name, got in (("http", post_fields(lite_pipe.url, fields)),
                          ("rpc", lite_rpc.call({"raw": fields}))):
            assert got["err_no"] == 51, (name, fields, got)
            assert message in got["err_msg"], (name, fields, got)
            assert_same_recall(recall_http(lite_pipe.url, good, 10), want, f"after {name} {fields}")
    # a body that is not JSON at all: the HTTP gateway answers 400, the pipeline serves on
    r = requests.post(lite_pipe.url, data="not json", timeout=10)
    assert r.status_code == 400 and "invalid character" in r.text
    assert_same_recall(lite_rpc.call({"hist_item": good, "top_k": 10}), want, "after a garbage body")


def mixed_requests(export_dir: str) -> list[dict]:
    """Different top_k, filters, exclude_history, multi-row, an unknown id, and a bad request."""
    hists = demo_histories(export_dir, n=6)
    raw = sorted(lite_raw_ids(export_dir))
    mid = raw[len(raw) // 2]
    return [
        {"hist": [hists[0]], "top_k": 15},
        {"hist": [hists[1]], "top_k": 40},
        {"hist": [hists[2], hists[3]], "top_k": 10},
        {"hist": [hists[4]], "top_k": 20, "exclude_history": True},
        {"hist": [hists[5]], "top_k": 12, "filter": f"item_id > {mid}"},
        {"hist": [hists[0] + [UNKNOWN_ID]], "top_k": 9, "filter": f"item_id <= {mid}",
         "exclude_history": True},
        {"hist": [[UNKNOWN_ID]], "top_k": 5},  # err_no 51, alone
    ]


def lite_raw_ids(export_dir: str) -> list[int]:
    with open(os.path.join(export_dir, "item_map.tsv")) as f:
        next(f)
        return [int(line.split("\t")[1]) for line in f]


def test_concurrent_mixed_requests_are_batched_and_each_gets_its_own_answer(lite_pipe, lite_ref, lite_export):
    reqs = mixed_requests(lite_export["export_dir"])
    want = {}
    for i, r in enumerate(reqs[:-1]):
        want[i] = lite_ref.recall(r["hist"], r["top_k"], r.get("exclude_history", False), r.get("filter"))
    errors: list[str] = []
    start = threading.Barrier(8)

    def worker(seed: int) -> None:
        start.wait()
        with requests.Session() as s:
            for n in range(10):
                i = (seed + n) % len(reqs)
                r = reqs[i]
                got = recall_http(lite_pipe.url, r["hist"], r["top_k"], r.get("exclude_history"),
                                  r.get("filter"), session=s)
                if i == len(reqs) - 1:
                    if got["err_no"] != 51 or "none of its item ids is known" not in got["err_msg"]:
                        errors.append(f"bad request {seed}/{n}: {got}")
                elif got["err_no"] != 0 or got["items"] != want[i].items or got["notes"] != want[i].notes:
                    errors.append(f"{seed}/{n} request {i}: {got}")

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors[:3]


def test_a_full_queue_answers_err_no_54_and_the_pipeline_recovers(lite_export, lite_ref, tmp_path):
    import json as _json

    # its own Lite copy (the module's pipeline holds the served file)
    db = str(tmp_path / "items.db")
    shutil.copy(lite_export["ref_uri"], db)
    pipe = Pipeline(str(tmp_path / "serve"), lite_export["export_dir"], db, lite_export["collection"],
                    worker_num=24, op={"user_tower": {"concurrency": 12}, "recall": {"concurrency": 12}},
                    recall={"queue_max_users": 1, "batch_max_users": 2, "batch_window_ms": 0,
                            "max_inflight": 3}).start()
    try:
        h = demo_histories(lite_export["export_dir"])[:1]
        want = lite_ref.recall(h, 10)
        body = {"key": ["hist_item", "top_k"], "value": [_json.dumps(h), "10"]}
        proc = subprocess.run([sys.executable, os.path.join(REPO, "tests", "http_load_child.py"), pipe.url,
                               "20", "15"], input=_json.dumps([body]), capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        answers = [a[3] for a in _json.loads(proc.stdout)]
        codes = [a.get("err_no") for a in answers]
        assert 54 in codes and 0 in codes and set(codes) <= {0, 54}, codes
        refused = [a["err_msg"] for a in answers if a["err_no"] == 54]
        assert all(m.startswith("overloaded:") for m in refused), refused[:3]
        # at the gRPC servicer (3 in the DAG already) or at a stage's queue (1 user waiting)
        assert any("3 requests already in the pipeline" in m for m in refused), refused[:3]
        for a in answers:
            if a["err_no"] == 0:
                assert _json.loads(a["value"][a["key"].index("items")]) == want.items
        assert_same_recall(recall_http(pipe.url, h, 10), want, "after the overload")
    finally:
        pipe.kill()


def test_past_twice_worker_num_grpc_refuses_at_once_as_err_no_54(lite_export, lite_ref, tmp_path):
    """20 concurrent callers, 2 gRPC threads: past 2 x worker_num calls the server refuses the
    extra ones itself (maximum_concurrent_rpcs) instead of queueing them without bound; the HTTP
    gateway and the RPC client both answer that as err_no 54, and serving goes on."""
    import json as _json

    db = str(tmp_path / "items.db")
    shutil.copy(lite_export["ref_uri"], db)
    # max_inflight = worker_num: the servicer never refuses, so every refusal here is gRPC's
    pipe = Pipeline(str(tmp_path / "serve"), lite_export["export_dir"], db, lite_export["collection"],
                    worker_num=2, recall={"queue_max_users": 10000, "max_inflight": 2}).start()
    try:
        h = demo_histories(lite_export["export_dir"])[:1]
        want = lite_ref.recall(h, 10)
        body = {"key": ["hist_item", "top_k"], "value": [_json.dumps(h), "10"]}
        lines = "".join(_json.dumps({"hist_item": h, "top_k": 10}) + "\n" for _ in range(25))
        rpc = [subprocess.Popen([sys.executable, os.path.join(REPO, "serving", "rpc_client.py"),
                                 "--endpoint", pipe.endpoint, "--stdin", "--timeout", "30"], env=ENV,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
               for _ in range(4)]
        http = subprocess.Popen([sys.executable, os.path.join(REPO, "tests", "http_load_child.py"), pipe.url,
                                 "16", "15"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        for p in rpc:
            p.stdin.write(lines)
            p.stdin.close()
        out, err = http.communicate(_json.dumps([body]), timeout=300)
        assert http.returncode == 0, err[-2000:]
        answers = [a[3] for a in _json.loads(out)]
        for p in rpc:
            p.wait(300)
            assert p.returncode == 0, p.stderr.read()[-2000:]
            answers += [_json.loads(line) for line in p.stdout.read().splitlines()]
        codes = [a.get("err_no") for a in answers]
        assert 54 in codes and 0 in codes and set(codes) <= {0, 54}, codes
        refused = [a["err_msg"] for a in answers if a["err_no"] == 54]
        assert all("every gRPC thread of the pipeline is busy" in m for m in refused), refused[:3]
        assert len(answers) == 16 * 15 + 4 * 25
        assert_same_recall(recall_http(pipe.url, h, 10), want, "after the refusals")
        assert "max_inflight 2 >= worker_num 2" in pipe.log_text()
    finally:
        pipe.kill()


def test_the_calls_grpc_deadline_is_the_requests_deadline(lite_pipe, lite_rpc, lite_ref, lite_export):
    """A request's deadline is also its gRPC call's: gRPC measures it from the call's arrival, so
    time spent in the server's own queues counts; past it the request is dropped unrun (err_no 54)
    over RPC and over the HTTP gateway (which sends timeout_ms as the call's deadline)."""
    import grpc

    from benchmarks.load_gen import PIPELINE_METHOD, decode_pipeline_response, encode_pipeline_request

    h = demo_histories(lite_export["export_dir"])[:1]
    want = lite_ref.recall(h, 10)
    fields = {"hist_item": json.dumps(h), "top_k": "10"}
    with grpc.insecure_channel(lite_pipe.endpoint) as channel:
        call = channel.unary_unary(PIPELINE_METHOD, request_serializer=None, response_deserializer=None)
        # with a gRPC deadline the servicer adds it to the request as pipeline.call_deadline
        got = decode_pipeline_response(call(encode_pipeline_request(fields), timeout=30))
        assert got["err_no"] == 0, got
        assert json.loads(got["value"][got["key"].index("items")]) == want.items
        # a call deadline already past (the servicer's key; on a call without a gRPC deadline a
        # client's own is read, which can only shorten its own request's deadline)
        late = decode_pipeline_response(call(encode_pipeline_request(
            dict(fields, **{"pipeline.call_deadline": repr(time.monotonic() - 1)}))))
        assert late["err_no"] == 54 and "deadline" in late["err_msg"] and "not run" in late["err_msg"], late
        # with a gRPC deadline the servicer's value comes last and is the one read
        got = decode_pipeline_response(call(encode_pipeline_request(
            dict(fields, **{"pipeline.call_deadline": repr(time.monotonic() - 1)})), timeout=30))
        assert got["err_no"] == 0, got
        bad = decode_pipeline_response(call(encode_pipeline_request(
            dict(fields, **{"pipeline.call_deadline": "soon"}))))
        assert bad["err_no"] == 51 and "pipeline.call_deadline" in bad["err_msg"], bad
    # over HTTP: timeout_ms too short for anything = an answer at its deadline, err_no 54
    t0 = time.monotonic()
    got = post_fields(lite_pipe.url, dict(fields, timeout_ms="0.001"))
    assert got["err_no"] == 54 and "deadline exceeded" in got["err_msg"], got
    assert time.monotonic() - t0 < 5
    # the RPC client sends a gRPC deadline (PipelineClient itself sends none): with only its
    # --timeout that short (the request's own deadline is the server's 10 s), the answer is 54,
    # from the client's or the server's side of the deadline, whichever sees it first
    out = subprocess.run([sys.executable, os.path.join(REPO, "serving", "rpc_client.py"), "--endpoint",
                          lite_pipe.endpoint, "--hist", ",".join(map(str, h[0])), "--timeout", "0.0005"],
                         env=ENV, capture_output=True, text=True, timeout=60)
    got = json.loads(out.stdout)
    assert out.returncode == 1 and got["err_no"] == 54 and "deadline" in got["err_msg"], (got, out.stderr)
    roomy = lite_rpc.call({"hist_item": h, "top_k": 10, "timeout_ms": 20000})
    assert_same_recall(roomy, want, "rpc, timeout_ms")
    assert_same_recall(recall_http(lite_pipe.url, h, 10), want, "after the expired requests")


def test_a_killed_milvus_lite_child_is_restarted(lite_pipe, lite_ref, lite_export):
    hists = demo_histories(lite_export["export_dir"])[:2]
    want = lite_ref.recall(hists, 10)
    assert kill_milvus_lite_children(lite_pipe.proc.pid), "no Milvus Lite child found"
    t0 = time.monotonic()
    while time.monotonic() - t0 < 30:
        got = recall_http(lite_pipe.url, hists, 10, timeout=30)
        if got["err_no"] == 0:
            break
        assert got["err_no"] == 52 and "Milvus" in got["err_msg"], got  # a clear error, never items=[]
        time.sleep(0.2)
    assert time.monotonic() - t0 < 15
    assert_same_recall(got, want, "after the Lite child was restarted")


def test_lite_sigterm_leaves_no_process_port_or_file(lite_pipe, lite_rpc):
    lite_rpc.close()
    stop_and_check(lite_pipe)


def test_process_mode_with_milvus_lite_fails_at_start(lite_export, tmp_path):
    pipe = Pipeline(str(tmp_path), lite_export["export_dir"], lite_export["served_uri"],
                    lite_export["collection"], dag={"is_thread_op": False},
                    op={"user_tower": {"concurrency": 1}, "recall": {"concurrency": 2}})
    proc = subprocess.run([sys.executable, "-m", "paddlerec_milvus.cli", "serve", "-c", pipe.config],
                          cwd=pipe.cwd, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Lite opens a .db in one process only" in proc.stderr and "Use a Milvus server" in proc.stderr
    assert not listening(pipe.rpc_port) and not listening(pipe.http_port)


# -- a real Milvus server -------------------------------------------------------------------
@pytest.fixture(scope="module")
def relay(milvus_server):
    r = TcpRelay(milvus_server.port).start()
    yield r
    r.stop()


@pytest.fixture(scope="module")
def server_ref(exported_demo_server):
    from paddlerec_milvus.service import RecallService

    svc = RecallService(exported_demo_server["export_dir"],
                        limits=ServingLimits(max_top_k=MAX_TOP_K, max_users=MAX_USERS))
    yield svc
    svc.close()


@pytest.fixture(scope="module")
def server_pipe(exported_demo_server, relay, tmp_path_factory):
    pipe = Pipeline(str(tmp_path_factory.mktemp("pipeline-server")), exported_demo_server["export_dir"],
                    f"http://127.0.0.1:{relay.port}", exported_demo_server["collection"])
    pipe.start()
    yield pipe
    pipe.kill()


@pytest.mark.server
def test_server_rpc_and_http_answer_as_in_process(server_pipe, server_ref, exported_demo_server):
    hists = demo_histories(exported_demo_server["export_dir"])
    want = server_ref.recall(hists, 30)
    assert_same_recall(recall_http(server_pipe.url, hists, 30), want, "http")
    client = RpcClientProcess(server_pipe.endpoint)
    try:
        assert_same_recall(client.call({"hist_item": hists, "top_k": 30}), want, "rpc")
    finally:
        client.close()


@pytest.mark.server
def test_milvus_outage_is_a_clear_error_and_heals(server_pipe, server_ref, relay, exported_demo_server):
    hists = demo_histories(exported_demo_server["export_dir"])[:2]
    want = server_ref.recall(hists, 10)
    assert_same_recall(recall_http(server_pipe.url, hists, 10), want, "before")
    relay.stop()
    try:
        t0 = time.monotonic()
        for _ in range(2):  # the broken connection, then a failed reconnect
            got = recall_http(server_pipe.url, hists, 10, timeout=60)
            assert got["err_no"] == 52, got
            assert "cannot reach Milvus" in got["err_msg"], got
        assert time.monotonic() - t0 < 30
        bad = post_fields(server_pipe.url, {"hist_item": "[[-1]]"})  # validation still answers
        assert bad["err_no"] == 51
    finally:
        relay.start()
    deadline = time.monotonic() + 60
    while True:
        got = recall_http(server_pipe.url, hists, 10, timeout=60)
        if got["err_no"] == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert_same_recall(got, want, "after Milvus is back")


@pytest.mark.server
def test_reexport_alias_switch_loses_no_request(server_pipe, server_ref, exported_demo_server,
                                                 milvus_server, tmp_path):
    from pymilvus import MilvusClient

    hists = demo_histories(exported_demo_server["export_dir"])
    want = {i: server_ref.recall([h], 20).items for i, h in enumerate(hists)}
    alias = exported_demo_server["collection"]
    client = MilvusClient(uri=milvus_server.uri)
    before = client.describe_alias(alias)["collection_name"]
    answers: list[tuple[int, dict]] = []
    stop = threading.Event()

    def http_worker() -> None:
        with requests.Session() as s:
            n = 0
            while not stop.is_set():
                i = n % len(hists)
                answers.append((i, recall_http(server_pipe.url, [hists[i]], 20, session=s, timeout=30)))
                n += 1

    rpc = RpcClientProcess(server_pipe.endpoint)

    def rpc_worker() -> None:
        n = 0
        while not stop.is_set():
            i = n % len(hists)
            answers.append((i, rpc.call({"hist_item": [hists[i]], "top_k": 20})))
            n += 1

    threads = [threading.Thread(target=f) for f in (http_worker, http_worker, rpc_worker)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        run_cli("export", "-m", exported_demo_server["config_path"], "-o",
                *exported_demo_server["overrides"], f"milvus.uri={milvus_server.uri}",
                "--collection", alias, "--output", str(tmp_path / "model-v2"))
        after_switch = len(answers)
        time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
        rpc.close()
    after = client.describe_alias(alias)["collection_name"]
    # the alias is shared by the module's other tests and test_rest_api's: point it back at the
    # export folder they serve (/health is "degraded" while the alias names another export)
    client.alter_alias(before, alias)
    # no client.close(): pymilvus shares one connection per uri in a process, and closing it
    # would break the in-process reference service
    assert after != before, "the export should have switched the alias"
    assert len(answers) > after_switch > 10
    failed = [a for i, a in answers if a["err_no"] != 0 or a["items"] != want[i]]
    assert not failed, f"{len(failed)} of {len(answers)} requests failed: {failed[:2]}"


@pytest.mark.server
def test_an_emptied_collection_is_an_error_not_an_empty_list(server_pipe, server_ref, exported_demo_server,
                                                              milvus_server):
    import numpy as np

    from paddlerec_milvus.milvus_index import ItemIndex
    from paddlerec_milvus.serving_contract import Manifest, read_export_item_map

    export_dir = exported_demo_server["export_dir"]
    m = Manifest.load(export_dir)
    hists = demo_histories(export_dir)[:2]
    want = server_ref.recall(hists, 10)
    got = recall_http(server_pipe.url, hists, 10)
    assert got["err_no"] == 0 and got["model_version"] == m.model_version, got
    index = ItemIndex(milvus_server.uri, m.physical_collection, m.embedding_dim, create=False)

    def poll(done, seconds: float = 20.0) -> dict:
        t0 = time.monotonic()
        while True:
            answer = recall_http(server_pipe.url, hists, 10, timeout=30)
            if done(answer) or time.monotonic() - t0 > seconds:
                return answer
            assert answer["err_no"] in (0, 52), answer
            assert answer["err_no"] != 0 or all(answer["items"]), answer  # never a silent []
            time.sleep(0.2)

    try:
        index.clear()
        assert index.count() == 0
        got = poll(lambda a: a["err_no"] != 0)
        assert got["err_no"] == 52 and "empty" in got["err_msg"], got
        raw = read_export_item_map(export_dir, m.item_count)
        index.upsert(raw[1:], np.load(os.path.join(export_dir, "item_vectors.npy")), progress=False)
        assert index.count() == m.item_count - 1
    finally:
        index.close()
    assert_same_recall(poll(lambda a: a["err_no"] == 0), want, "after the rows are back")


@pytest.mark.server
def test_server_sigterm_leaves_no_process_or_port(server_pipe):
    stop_and_check(server_pipe)


@pytest.mark.server
def test_process_mode_on_a_milvus_server(exported_demo_server, server_ref, tmp_path):
    """Ops in processes (each builds its own RecallService) work against a Milvus server."""
    hists = demo_histories(exported_demo_server["export_dir"])[:2]
    pipe = Pipeline(str(tmp_path), exported_demo_server["export_dir"], exported_demo_server["milvus_uri"],
                    exported_demo_server["collection"], dag={"is_thread_op": False},
                    op={"user_tower": {"concurrency": 1}, "recall": {"concurrency": 2}})
    pipe.start()
    try:
        assert "process mode" in pipe.log_text()
        assert_same_recall(recall_http(pipe.url, hists, 10, timeout=60), server_ref.recall(hists, 10),
                           "process mode")
        stop_and_check(pipe)
    finally:
        pipe.kill()
