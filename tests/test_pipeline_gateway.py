"""The pipeline's own HTTP gateway (paddlerec_milvus.pipeline_gateway) and the checks in front of
the gRPC servicer: unit checks of the request parsing, then `paddlerec-milvus serve` for real
(subprocess, free loopback ports, Milvus Lite) over HTTP, raw sockets and gRPC."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time

import pytest
import requests

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "serving"))
from http_client import decode_http, recall_http  # noqa: E402
from test_serving_pipeline import (  # noqa: E402
    ENV,
    Pipeline,
    RpcClientProcess,
    alive,
    demo_histories,
    run_cli,
    stop_and_check,
)

from benchmarks.common import descendants  # noqa: E402
from paddlerec_milvus.pipeline_gateway import (  # noqa: E402
    ERR_BAD_REQUEST,
    BadRequest,
    messages,
    parse_body,
    request_problem,
)

MB = 1024 * 1024
BIG = 20 * MB


# -- no pipeline ----------------------------------------------------------------------------
@pytest.mark.slow
def test_messages_match_paddle_serving_proto():
    """Our private declaration of the pipeline's messages is Paddle Serving's, field for field;
    the error numbers agree with serving_pipeline's (in a subprocess: loading the pipeline
    changes process-wide state)."""
    code = """
import json
from paddlerec_milvus import paddle_serving_compat as compat, serving_pipeline as sp
from paddlerec_milvus import pipeline_gateway as gw
compat.load_pipeline()
from paddle_serving_server.pipeline.proto import pipeline_service_pb2 as pb
def fields(d):
    return sorted((f.name, f.number, f.type, f.is_repeated, f.message_type and f.message_type.full_name)
                  for f in d.fields)
out = {}
for ours, theirs in zip(gw.messages(), (pb.Request, pb.Response, pb.Tensor)):
    a, b = ours.DESCRIPTOR, theirs.DESCRIPTOR
    out[b.full_name] = [a.full_name == b.full_name, fields(a) == fields(b) and len(fields(a)) > 4]
svc = pb.DESCRIPTOR.services_by_name["PipelineService"]
out["rpc"] = f"/{svc.full_name}/inference" == gw.RPC_METHOD
out["errors"] = [gw.ERR_BAD_REQUEST == sp.ERR_BAD_REQUEST, gw.ERR_INTERNAL == sp.ERR_INTERNAL]
out["overload"] = [gw.ERR_OVERLOADED == sp.ERR_OVERLOADED, gw.GRPC_LIMIT_DETAILS == compat.GRPC_LIMIT_DETAILS]
print(json.dumps(out))
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(out) == 6 and all(v is True or v == [True, True] for v in out.values()), out


@pytest.mark.slow
def test_paddle_serving_pb2_modules_load_on_upb_protobuf():
    """Paddle Serving's old generated _pb2 modules are rebuilt from their serialized descriptors
    (compat.OldPb2Finder), so the serving process keeps protobuf's fast upb backend: every one of
    them imports, and messages round-trip on upb (pymilvus's replies are parsed by the same)."""
    code = """
import glob, importlib, json, os
from google.protobuf.internal import api_implementation
from paddlerec_milvus import paddle_serving_compat as compat
compat.load_pipeline()
import paddle_serving_server as pss
root = os.path.dirname(pss.__file__)
names = sorted(os.path.relpath(p, os.path.dirname(root))[:-3].replace(os.sep, ".")
               for p in glob.glob(os.path.join(root, "**", "proto", "*_pb2.py"), recursive=True))
mods = [importlib.import_module(n) for n in names]
from paddle_serving_server.pipeline.proto import pipeline_service_pb2 as pb
r = pb.Response(err_no=54, err_msg="x", key=["items"], value=["[[1,2]]"])
back = pb.Response.FromString(r.SerializeToString())
print(json.dumps({"backend": api_implementation.Type(), "modules": names,
                  "messages": sum(len(m.DESCRIPTOR.message_types_by_name) for m in mods),
                  "round_trip": [back.err_no, back.err_msg, list(back.key), list(back.value)]}))
"""
    env = {k: v for k, v in ENV.items() if k != "PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["backend"] == "upb", out
    assert "paddle_serving_server.pipeline.proto.pipeline_service_pb2" in out["modules"]
    assert len(out["modules"]) >= 4 and out["messages"] >= 10, out
    assert out["round_trip"] == [54, "x", ["items"], ["[[1,2]]"]]


def _request(**kwargs):
    Request, _, Tensor = messages()
    tensors = kwargs.pop("tensors", [])
    req = Request(**kwargs)
    for t in tensors:
        req.tensors.append(Tensor(**t))
    return req


@pytest.mark.parametrize("kwargs, message", [
    ({"key": ["hist_item", "top_k"], "value": ["[[1]]"]}, "key has 2 entries but value has 1"),
    ({"key": [], "value": ["[[1]]"]}, "key has 0 entries but value has 1"),
    ({"key": ["top_k", "top_k"], "value": ["1", "2"]}, "key 'top_k' is given twice"),
    ({"key": ["hist_item"], "value": ["[[1]]"], "tensors": [{"name": "hist_item", "elem_type": 0,
                                                             "int64_data": [1], "shape": [1]}]},
     "key 'hist_item' is given twice"),
    ({"tensors": [{"name": "hist_item", "elem_type": 13, "byte_data": b"x"}]},
     "13, pickled bytes, is refused"),
    ({"tensors": [{"name": "hist_item", "elem_type": 10}]}, "elem_type 10 is not supported"),
    ({"tensors": [{"name": "hist_item", "elem_type": 0, "int64_data": [1, 2], "shape": [1, 3]}]},
     "shape [1, 3] holds 3 values but int64_data has 2"),
    ({"tensors": [{"name": "hist_item", "elem_type": 0, "int64_data": [1], "shape": [1], "lod": [0]}]},
     "lod has 1 values"),
])
def test_request_problem_names_it(kwargs, message):
    problem = request_problem(_request(**kwargs))
    assert problem is not None and message in problem, problem


def test_request_problem_passes_good_requests():
    assert request_problem(_request(key=["hist_item", "top_k"], value=["[[1, 2]]", "5"])) is None
    assert request_problem(_request(key=[], value=[])) is None
    assert request_problem(_request(key=["top_k"], value=["5"], tensors=[
        {"name": "hist_item", "elem_type": 0, "int64_data": [1, 2, 3, 4], "shape": [2, 2]},
        {"name": "filter", "elem_type": 12, "str_data": ["item_id > 3"]}])) is None


@pytest.mark.parametrize("body, message", [
    (b"", "empty body"),
    (b"not json", "body is not valid JSON: Expecting value"),
    (b'{"key": ["a"], "value": ["b"]', "body is not valid JSON"),
    (b"\xff\xfe\x00", "body is not valid JSON"),
    (b"[" * 100000 + b"]" * 100000, "body is not valid JSON"),
    (b"[1]", "body must be a JSON object"),
    (b'{"key": "a", "value": "b"}', "key must be a JSON list of strings, got str"),
    (b'{"key": ["a"], "value": [1]}', "value[0] must be a string"),
    (b'{"key": ["a", "b"], "value": ["1"]}', "key has 2 entries but value has 1"),
    (b'{"keys": ["a"], "value": ["1"]}', "unknown fields ['keys']"),
    (b'{"key": [], "value": [], "logid": "x"}', "logid must be a 64-bit integer"),
    (b'{"key": [], "value": [], "logid": 99999999999999999999}', "logid must be a 64-bit integer"),
    (b'{"key": [], "value": [], "tensors": {"a": 1}}', "tensors must be a JSON list"),
    (b'{"key": [], "value": [], "tensors": [{"nam": "a"}]}', "tensors:"),
])
def test_parse_body_rejects_with_a_reason(body, message):
    with pytest.raises(BadRequest) as info:
        parse_body(body, "recall")
    assert info.value.status == 400 and message in str(info.value), str(info.value)


def test_parse_body_builds_the_pipeline_request():
    req = parse_body(b'{"key": ["hist_item", "top_k"], "value": ["[[5, 6]]", "3"], "logid": "17", '
                     b'"tensors": [{"name": "x", "elem_type": 0, "int64_data": ["1", 2], "shape": [2]}]}',
                     "recall", "10.0.0.9")
    assert list(req.key) == ["hist_item", "top_k"] and list(req.value) == ["[[5, 6]]", "3"]
    assert req.name == "recall" and req.logid == 17 and req.clientip == "10.0.0.9"
    assert list(req.tensors[0].int64_data) == [1, 2]


def test_http_client_decodes_gateway_errors():
    body = json.dumps({"err_no": ERR_BAD_REQUEST, "err_msg": "bad request: body is over the limit"})
    assert decode_http(413, body) == {"err_no": 51, "err_msg": "bad request: body is over the limit"}
    assert decode_http(503, json.dumps({"err_no": 53, "err_msg": "gateway: UNAVAILABLE"}))["err_no"] == 53
    go = json.dumps({"error": "x", "code": 3, "message": "invalid character"})  # the Go gateway's
    assert decode_http(400, go) == {"err_no": 400, "err_msg": "HTTP 400: invalid character"}


# -- a real pipeline ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gw_export(trained_demo, tmp_path_factory) -> dict:
    base = str(tmp_path_factory.mktemp("gateway"))
    export_dir = os.path.join(base, "model")
    uri = os.path.join(base, "served.db")
    run_cli("export", "-m", trained_demo["config_path"], "-o", *trained_demo["overrides"],
            f"milvus.uri={uri}", "--collection", "gateway_items", "--output", export_dir)
    return {"base": base, "export_dir": export_dir, "uri": uri, "collection": "gateway_items"}


@pytest.fixture(scope="module")
def gw_pipe(gw_export):
    pipe = Pipeline(os.path.join(gw_export["base"], "serve"), gw_export["export_dir"], gw_export["uri"],
                    gw_export["collection"])
    pipe.start()
    yield pipe
    pipe.kill()


@pytest.fixture(scope="module")
def gw_rpc(gw_pipe):
    client = RpcClientProcess(gw_pipe.endpoint)
    yield client
    client.close()


@pytest.fixture(scope="module")
def raw_rpc(gw_pipe):
    """The pipeline's gRPC method with hand-made Requests (what PipelineClient cannot send)."""
    import grpc

    from paddlerec_milvus.pipeline_gateway import RPC_METHOD

    Request, Response, _ = messages()
    channel = grpc.insecure_channel(gw_pipe.endpoint)
    call = channel.unary_unary(RPC_METHOD, request_serializer=Request.SerializeToString,
                               response_deserializer=Response.FromString)
    yield lambda **kw: call(_request(name="recall", **kw), timeout=30)
    channel.close()


def _fields_answer(pipe: Pipeline, fields: dict) -> dict:
    return decode_http(*_post(pipe, {"key": list(fields), "value": list(fields.values())}))


def _post(pipe: Pipeline, body, path: str = "/recall/prediction", method: str = "POST") -> tuple[int, str]:
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    r = requests.request(method, f"http://127.0.0.1:{pipe.http_port}{path}", data=data, timeout=30)
    return r.status_code, r.text


def _tree_rss_kb(pid: int) -> int:
    total = 0
    for p in [pid, *descendants(pid)]:
        try:
            with open(f"/proc/{p}/status") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))
        except (OSError, StopIteration):
            pass
    return total


def _listeners(port: int) -> list[str]:
    """Local addresses (hex, as /proc/net/tcp* has them) of sockets listening on ``port``."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                local, state = line.split()[1], line.split()[3]
                addr, p = local.rsplit(":", 1)
                if state == "0A" and int(p, 16) == port:
                    found.append(addr)
    return found


LOOPBACK = {"0100007F", "0000000000000000FFFF00000100007F", "00000000000000000000000001000000"}


def _send_big(port: int, chunked: bool, total: int = BIG, piece: int = 64 * 1024) -> tuple[bytes, float]:
    """POST ``total`` bytes (Content-Length, or chunked with no end), stop sending once an answer
    arrives; (the answer, seconds until it came)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=20)
    head = b"POST /recall/prediction HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    head += b"Transfer-Encoding: chunked\r\n\r\n" if chunked else f"Content-Length: {total}\r\n\r\n".encode()
    data = b"[" * piece
    t0 = time.monotonic()
    answer = b""
    try:
        s.sendall(head)
        sent = 0
        while sent < total:
            readable, _, _ = select.select([s], [s], [], 20)
            if readable:
                break
            s.sendall(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data)
            sent += piece
    except OSError:
        pass  # the server closed the connection: its answer is in our receive buffer
    try:
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = s.recv(65536)
            if not chunk:
                break
            answer += chunk
    except OSError:
        pass
    elapsed = time.monotonic() - t0
    s.close()
    return answer, elapsed


@pytest.mark.slow
def test_http_answers_as_rpc(gw_pipe, gw_rpc, gw_export):
    hists = demo_histories(gw_export["export_dir"])
    cases = [{"hist_item": hists, "top_k": 10},
             {"hist_item": hists[:1], "top_k": 25, "exclude_history": True}, {"hist_item": hists[1:2]},
             {"hist_item": [[987654321]]}, {"hist_item": hists[:1], "top_k": 0}]
    for case in cases:
        want = gw_rpc.call(case)
        got = recall_http(gw_pipe.url, case["hist_item"], case.get("top_k"), case.get("exclude_history"))
        assert got == want, case
    ok = [c for c in cases if gw_rpc.call(c)["err_no"] == 0]
    assert len(ok) >= 3 and any(gw_rpc.call(c)["err_no"] == ERR_BAD_REQUEST for c in cases)
    # the raw JSON, as the Go gateway wrote it
    status, text = _post(gw_pipe, {"key": ["hist_item", "top_k"], "value": [json.dumps(hists[:1]), "5"],
                                   "logid": 42})
    body = json.loads(text)
    assert status == 200 and set(body) == {"err_no", "err_msg", "key", "value", "tensors"}, body
    assert body["err_no"] == 0 and body["key"] == ["items", "scores", "notes", "model_version"]
    # a chunked body that is fine is answered like any other
    payload = json.dumps({"key": ["hist_item", "top_k"], "value": [json.dumps(hists[:1]), "7"]}).encode()
    r = requests.post(gw_pipe.url, data=iter([payload[:10], payload[10:]]), timeout=30)
    assert decode_http(r.status_code, r.text) == gw_rpc.call({"hist_item": hists[:1], "top_k": 7})


@pytest.mark.slow
def test_ports_listen_on_loopback_only(gw_pipe):
    for port in (gw_pipe.http_port, gw_pipe.rpc_port):
        found = _listeners(port)
        assert found and set(found) <= LOOPBACK, (port, found)
    ready = requests.get(f"http://127.0.0.1:{gw_pipe.http_port}/-/ready", timeout=10).json()
    assert ready["ready"] is True and ready["pid"] in descendants(gw_pipe.proc.pid)


@pytest.mark.slow
def test_big_bodies_get_413_fast_without_memory_growth(gw_pipe, gw_rpc, gw_export):
    hists = demo_histories(gw_export["export_dir"])[:1]
    want = gw_rpc.call({"hist_item": hists, "top_k": 10})
    for _ in range(5):
        assert recall_http(gw_pipe.url, hists, 10) == want
    time.sleep(0.5)
    before = _tree_rss_kb(gw_pipe.proc.pid)
    for chunked in (False, True, False, True):
        answer, elapsed = _send_big(gw_pipe.http_port, chunked)
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 413"), answer[:300]
        assert elapsed < 3.0, elapsed
        got = json.loads(body)
        assert got["err_no"] == ERR_BAD_REQUEST and "over the limit" in got["err_msg"], got
        assert recall_http(gw_pipe.url, hists, 10) == want
    # over gRPC, a message over the limit is refused before it is read in full
    too_big = gw_rpc.call({"raw": {"hist_item": "[" * BIG}})
    assert too_big["err_no"] == ERR_BAD_REQUEST and "larger than max" in too_big["err_msg"], too_big
    assert gw_rpc.call({"hist_item": hists, "top_k": 10}) == want
    time.sleep(1.0)
    grown_mb = (_tree_rss_kb(gw_pipe.proc.pid) - before) / 1024
    assert grown_mb < 8, f"the server's processes grew by {grown_mb:.1f} MB"


@pytest.mark.slow
def test_bad_requests_get_400_and_serving_goes_on(gw_pipe, gw_rpc, raw_rpc, gw_export):
    hists = demo_histories(gw_export["export_dir"])[:1]
    want = gw_rpc.call({"hist_item": hists, "top_k": 10})
    good = json.dumps(hists)
    bad_bodies = [
        ({"key": ["hist_item", "top_k"], "value": [good]}, "key has 2 entries but value has 1"),
        ({"key": ["hist_item"], "value": [good, "10"]}, "key has 1 entries but value has 2"),
        ({"key": ["hist_item", "hist_item"], "value": [good, good]}, "given twice"),
        ({"key": ["hist_item"], "value": [hists]}, "value[0] must be a string"),
        ({"key": ["hist_item"], "value": [good], "tensors": [{"name": "x", "elem_type": 13}]}, "refused"),
        ("not json", "invalid character 'n'"),
        ('{"key": ["hist_item"], "value": [', "body is not valid JSON"),
        ("[1, 2]", "body must be a JSON object"),
    ]
    for body, message in bad_bodies:
        status, text = _post(gw_pipe, body)
        got = json.loads(text)
        assert status == 400 and got["err_no"] == ERR_BAD_REQUEST, (body, status, text)
        assert got["err_msg"].startswith("bad request: ") and message in got["err_msg"], (body, got)
        assert decode_http(status, text) == got
        assert recall_http(gw_pipe.url, hists, 10) == want
    for path, method, status in (("/recall/predict", "POST", 404), ("/other/prediction", "POST", 404),
                                 ("/recall/prediction", "GET", 405), ("/recall/prediction", "PUT", 405)):
        code, text = _post(gw_pipe, "{}", path, method)
        assert code == status and json.loads(text)["err_no"] == ERR_BAD_REQUEST, (path, method, code, text)
    # the same structural checks answer RPC callers, before the DAG runs
    for kwargs, message in (({"key": ["hist_item", "top_k"], "value": [good]}, "key has 2 entries"),
                            ({"key": ["top_k", "top_k"], "value": ["1", "2"]}, "given twice"),
                            ({"tensors": [{"name": "hist_item", "elem_type": 13, "byte_data": b"x"}]},
                             "pickled bytes")):
        resp = raw_rpc(**kwargs)
        assert resp.err_no == ERR_BAD_REQUEST and message in resp.err_msg, resp
    resp = raw_rpc(key=["hist_item", "top_k"], value=[good, "10"])
    assert resp.err_no == 0 and json.loads(resp.value[list(resp.key).index("items")]) == want["items"]
    assert recall_http(gw_pipe.url, hists, 10) == want
    assert gw_rpc.call({"hist_item": hists, "top_k": 10}) == want


@pytest.mark.slow
def test_sigterm_stops_the_gateway_too(gw_pipe, gw_rpc):
    gw_rpc.close()
    stop_and_check(gw_pipe)


@pytest.mark.slow
def test_gateway_dies_with_a_killed_server(gw_export, tmp_path):
    pipe = Pipeline(str(tmp_path), gw_export["export_dir"], gw_export["uri"], gw_export["collection"])
    pipe.start()
    kids = descendants(pipe.proc.pid)
    try:
        assert kids
        os.kill(pipe.proc.pid, signal.SIGKILL)
        pipe.proc.wait(10)
        deadline = time.monotonic() + 10
        while any(alive(p) for p in kids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [p for p in kids if alive(p)], "the gateway outlived its server"
    finally:
        pipe.kill()
        for p in kids:
            if alive(p):
                os.kill(p, signal.SIGKILL)
