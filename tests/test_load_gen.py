"""The external load generators (benchmarks/load_gen.py) against tiny real servers: an asyncio HTTP
server and a gRPC server answering the Paddle Serving pipeline's method with its real messages."""

from __future__ import annotations

import ast
import asyncio
import json
import os
import shutil
import threading
import time
from concurrent import futures
from importlib.util import find_spec

import pytest

from benchmarks import load_gen, serving_load

STALL_S = 0.2


# -- a tiny HTTP/1.1 keep-alive server ---------------------------------------------------------------
class TinyHttp:
    """Serves one request at a time (a lock across connections); the first request stalls
    ``STALL_S``, the others take 2 ms; a body with ``"reject": true`` answers 429 at once."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.seen = 0
        self.bodies: list[dict] = []
        started = threading.Event()

        def serve() -> None:
            asyncio.set_event_loop(self.loop)
            self.lock = asyncio.Lock()
            self.server = self.loop.run_until_complete(asyncio.start_server(self.handle, "127.0.0.1", 0))
            self.port = self.server.sockets[0].getsockname()[1]
            started.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=serve, daemon=True)
        self.thread.start()
        started.wait(10)
        self.url = f"http://127.0.0.1:{self.port}/rec/recall"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length"))
                body = json.loads(await reader.readexactly(length))
                self.bodies.append(body)
                if body.get("hang"):
                    await asyncio.sleep(2)
                    status, text = "200 OK", b"{}"
                elif body.get("reject"):
                    status, text = "429 Too Many Requests", b'{"detail": "overloaded"}'
                else:
                    async with self.lock:
                        self.seen += 1
                        await asyncio.sleep(STALL_S if self.seen == 1 else 0.002)
                    status, text = "200 OK", b'{"items": [[1, 2, 3]]}'
                writer.write(f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
                             f"Content-Length: {len(text)}\r\n\r\n".encode() + text)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def http_server():
    srv = TinyHttp()
    yield srv
    srv.close()


def test_http_open_loop_measures_from_schedule(http_server):
    rec = load_gen.run_load("http-open", url=http_server.url, bodies=[{"hist_item": [[1, 2]]}],
                            phases=[(100, 0.5)], processes=2, timeout=5)
    assert len(rec["st"]) == 50 and set(rec["st"]) == {"200"}
    assert sorted(rec["t"]) == pytest.approx([k / 100 for k in range(50)])
    # the requests scheduled during the 200 ms stall waited behind it: from their scheduled time
    # their latency is large, and falls off towards the end of the stall
    slow = [lat for t, lat in zip(rec["t"], rec["lat"]) if t < 0.15]
    assert len(slow) == 15 and min(slow) > 40
    assert sum(lat > 100 for lat in rec["lat"]) >= 8
    assert max(rec["lat"]) >= STALL_S * 1000 * 0.9
    s = load_gen.summarize(rec, seconds=0.5)
    assert s["status"] == {"200": 50} and s["ok"]["n"] == 50 and s["errors"] == 0
    assert s["ok_rps"] == pytest.approx(100)
    tl = load_gen.timeline(rec, bin_s=0.25)
    assert sum(b["offered/s"] * 0.25 for b in tl) == 50
    assert sum(b["ok/s"] * 0.25 for b in tl) == 50


def test_http_closed_loop_hides_the_stall(http_server):
    # the same stall seen by a closed loop: only the one stalled request is slow
    rec = load_gen.run_load("http-closed", url=http_server.url, bodies=[{"hist_item": [[1]]}],
                            concurrency=1, requests=20, timeout=5)
    assert rec["st"] == ["200"] * 20
    assert sum(lat > 100 for lat in rec["lat"]) == 1


def test_http_status_split(http_server):
    bodies = [{"hist_item": [[1]]}, {"hist_item": [[2]], "reject": True}, {"hist_item": [[1]]},
              {"hist_item": [[2]], "reject": True}, {"hist_item": [[3]], "hang": True}]
    http_server.seen = 1  # no stall
    rec = load_gen.run_load("http-open", url=http_server.url, bodies=bodies, phases=[(100, 0.5)],
                            processes=1, timeout=0.4)
    s = load_gen.summarize(rec, seconds=0.5)
    assert s["status"] == {"200": 20, "429": 20, "timeout": 10}
    assert s["ok"]["n"] == 20 and s["rejected"]["n"] == 20 and s["errors"] == 10
    assert s["rejected"]["p99_ms"] < 100
    assert s["ok_rps"] == pytest.approx(40)
    # from the send: the generator's own lateness left out, never more than from the schedule
    assert s["rejected_from_send"]["n"] == 20
    assert s["rejected_from_send"]["p99_ms"] <= s["rejected"]["p99_ms"]
    assert len(rec["lag"]) == len(rec["st"]) and min(rec["lag"]) >= 0


@pytest.mark.skipif(not shutil.which("wrk"), reason="wrk not installed (make bench installs it)")
def test_wrk_closed_loop_counts_statuses_and_rotates_bodies(http_server):
    http_server.seen = 1  # no stall
    bodies = [{"hist_item": [[1]]}, {"hist_item": [[2]], "reject": True}]
    s = load_gen.run_wrk(http_server.url, bodies, concurrency=2, seconds=1, timeout=5)
    assert s["generator"] == "wrk" and s["seconds"] == pytest.approx(1.0, abs=0.3)
    n = s["requests"]
    assert n > 20 and s["errors"] == 0
    assert s["ok"]["n"] + s["rejected"]["n"] == n == sum(s["status"].values())
    assert abs(s["ok"]["n"] - s["rejected"]["n"]) <= 4  # the two bodies alternate
    assert s["ok_rps"] == pytest.approx(s["ok"]["n"] / s["seconds"])
    assert 0 < s["ok"]["p50_ms"] <= s["ok"]["p99_ms"] <= s["ok"]["max_ms"]
    assert {json.dumps(b, sort_keys=True) for b in http_server.bodies} == \
        {json.dumps(b, sort_keys=True) for b in bodies}
    # the load benchmark's table row is built from it
    row = serving_load._row("demo", "lite", "rest", "batched", "closed c=2", s)
    assert row["expired"] == 0 and row["rejected"] == s["rejected"]["n"]


def test_http_unreachable_server_fails_to_start():
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    bodies = [{"hist_item": [[1]]}]
    with pytest.raises(RuntimeError, match="failed to start"):  # the warm-up connect fails
        load_gen.run_load("http-open", url=f"http://127.0.0.1:{port}/", bodies=bodies,
                          phases=[(10, 0.2)], timeout=1)


# -- gRPC: the pipeline's method with its real messages ----------------------------------------------
def _pipeline_messages():
    """Request and Response classes built from the descriptor inside Paddle Serving's generated
    pipeline_service_pb2.py (read as text: importing it needs protobuf's pure-Python backend)."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    spec = find_spec("paddle_serving_server")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("paddle_serving_server is not installed")
    path = os.path.join(spec.submodule_search_locations[0], "pipeline", "proto", "pipeline_service_pb2.py")
    tree = ast.parse(open(path).read())
    blob = next(kw.value for node in ast.walk(tree) if isinstance(node, ast.Call)
                for kw in node.keywords if kw.arg == "serialized_pb")
    fdp = descriptor_pb2.FileDescriptorProto.FromString(ast.literal_eval(blob))
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    pkg = fdp.package
    assert load_gen.PIPELINE_METHOD == f"/{pkg}.{fdp.service[0].name}/{fdp.service[0].method[0].name}"
    return (message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{pkg}.Request")),
            message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{pkg}.Response")), pkg)


def test_pipeline_wire_format_matches_the_proto():
    Request, Response, _ = _pipeline_messages()
    fields = load_gen.pipeline_fields({"hist_item": [[5, 7]], "top_k": 50, "filter": "item_id > 3"})
    req = Request.FromString(load_gen.encode_pipeline_request(fields, logid=9))
    assert list(req.key) == ["hist_item", "top_k", "filter"]
    assert list(req.value) == ["[[5, 7]]", "50", "item_id > 3"]
    assert req.clientip == "127.0.0.1" and req.logid == 9
    for err in (0, 54, -1):
        resp = Response(err_no=err, err_msg="x", key=["items"], value=["[[1]]"]).SerializeToString()
        assert load_gen.response_err_no(resp) == err
        assert load_gen.decode_pipeline_response(resp) == {"err_no": err, "err_msg": "x",
                                                           "key": ["items"], "value": ["[[1]]"]}
    # err_no after the other fields (any order is valid protobuf)
    late = Response(key=["a"], value=["b"]).SerializeToString() + b"\x08\x36"
    assert load_gen.response_err_no(late) == 54


@pytest.fixture
def grpc_server():
    import grpc

    Request, Response, pkg = _pipeline_messages()
    seen: list[list[str]] = []

    def inference(raw: bytes, context) -> bytes:
        req = Request.FromString(raw)
        seen.append(list(req.key))
        hist = json.loads(dict(zip(req.key, req.value))["hist_item"])
        if hist[0][0] == 99:  # a slow answer
            time.sleep(0.3)
        err = 54 if hist[0][0] == 54 else 0
        return Response(err_no=err, key=["items"], value=["[[1, 2]]"]).SerializeToString()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        f"{pkg}.PipelineService", {"inference": grpc.unary_unary_rpc_method_handler(inference)})])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", seen
    server.stop(0)


def test_grpc_open_and_closed(grpc_server):
    target, seen = grpc_server
    bodies = [{"hist_item": [[1, 2]], "top_k": 50}, {"hist_item": [[54]], "top_k": 50}]
    rec = load_gen.run_load("grpc-open", target=target, bodies=bodies, phases=[(100, 0.4)],
                            processes=2, timeout=5)
    s = load_gen.summarize(rec, seconds=0.4)
    assert s["status"] == {"err54": 20, "ok": 20}
    assert s["ok"]["n"] == 20 and s["rejected"]["n"] == 20 and s["errors"] == 0
    assert sorted(rec["t"]) == pytest.approx([k / 100 for k in range(40)])
    assert seen[0] == ["hist_item", "top_k"]
    rec = load_gen.run_load("grpc-closed", target=target, bodies=bodies[:1], concurrency=4,
                            requests=30, processes=2, timeout=5)
    assert rec["processes"] == 2 and rec["st"] == ["ok"] * 30


def test_grpc_timeout_ms_is_the_calls_deadline(grpc_server):
    target, _ = grpc_server
    bodies = [{"hist_item": [[99]], "top_k": 50, "timeout_ms": 50}, {"hist_item": [[1]], "top_k": 50}]
    rec = load_gen.run_load("grpc-open", target=target, bodies=bodies, phases=[(20, 0.5)], timeout=5)
    s = load_gen.summarize(rec)
    assert s["status"] == {"expired": 5, "ok": 5}
    assert s["expired"]["n"] == 5 and s["errors"] == 0 and s["rejected"]["n"] == 0
    assert s["expired"]["max_ms"] < 250  # answered at its 50-ms deadline, not after the 300-ms reply


# -- hey -------------------------------------------------------------------------------------------
HEY_CSV = """response-time,DNS+dialup,DNS,Request-write,Response-delay,Response-read,status-code,offset
0.0262,0.0021,0.0000,0.0001,0.0233,0.0006,200,0.0003
0.0441,0.0040,0.0000,0.0001,0.0396,0.0003,200,0.0017
0.0046,0.0002,0.0000,0.0000,0.0037,0.0006,429,0.0266
0.0174,0.0002,0.0000,0.0001,0.0168,0.0003,200,0.0458
"""


def test_hey_csv_parser():
    rec = load_gen.parse_hey_csv(HEY_CSV, requested=5)
    assert rec["st"] == ["200", "200", "429", "200", "conn"]
    assert rec["lat"][:4] == pytest.approx([26.2, 44.1, 4.6, 17.4])
    assert rec["t"][:4] == pytest.approx([0.0003, 0.0017, 0.0266, 0.0458])
    s = load_gen.summarize(rec)
    assert s["status"] == {"200": 3, "429": 1, "conn": 1} and s["errors"] == 1
    assert s["ok"]["p50_ms"] == pytest.approx(26.2) and s["rejected"]["max_ms"] == pytest.approx(4.6)
    assert s["seconds"] == pytest.approx(0.0458 + 0.0174 - 0.0003)  # first send to last reply
    with pytest.raises(ValueError):
        load_gen.parse_hey_csv("Summary:\n  Total: 1 s\n")


def test_schedule_split_is_one_even_schedule():
    phases = [(10, 1.0), (4, 1.0)]
    whole = load_gen.schedule(phases)
    assert whole == pytest.approx([k / 10 for k in range(10)] + [1 + k / 4 for k in range(4)])
    parts = sorted(load_gen.schedule(phases, 0, 3) + load_gen.schedule(phases, 1, 3)
                   + load_gen.schedule(phases, 2, 3))
    assert parts == whole
    assert load_gen.parse_phases(load_gen.format_phases(phases)) == phases
