"""The pipeline's HTTP/JSON gateway: ``POST /{name}/prediction`` -> the gRPC ``PipelineService``.

It replaces Paddle Serving's Go gateway (``libproxy_server.so``), which binds every interface
whatever the config says and reads request bodies of any size. This one speaks the same JSON::

    request   {"key": ["hist_item", ...], "value": ["[[5468, 30460]]", ...], "logid": 7}
              (optional too: "tensors", "clientip", "method"; the service name is the path's)
    response  {"err_no": 0, "err_msg": "", "key": [...], "value": [...], "tensors": []}

A pipeline answer, error or not, is HTTP 200 with its ``err_no`` (as the Go gateway did). The
gateway itself answers, as JSON ``{"err_no", "err_msg"}``: 400 (err_no 51) for a body that is not
JSON, has the wrong shape, or whose ``key`` and ``value`` lists do not pair up; 413 (51) for a
body over ``--max-body-bytes``, counted as it streams in (chunked too; the rest is not read);
408 (51) for a body that does not arrive within ``--body-timeout``; 404 / 405 (51) for another
path or method; 503 / 504 / 502 (53) when the gRPC server is not there, too slow, or fails.
A request's ``timeout_ms`` is also its gRPC call's deadline: past it the answer is 200 with
err_no 54 ("deadline exceeded"), as the pipeline gives for a request it dropped unrun.
``GET /-/ready`` answers 200 once the gRPC server is connected (503 before).

It runs as its own process, a fresh interpreter (``python -m paddlerec_milvus.pipeline_gateway``,
started by ``paddle_serving_compat.PipelineRunner``): uvicorn with a raw ASGI app, one
``grpc.aio`` channel (or ``--channels`` N, round robin: one connection per worker process with
``build_dag_each_worker``). It imports no Paddle Serving: the pipeline's messages are declared
here, wire-compatible (``baidu.paddle_serving.pipeline_serving``), so protobuf keeps its fast
backend. SIGTERM: finish what is in flight, then exit; SIGINT is ignored (the server stops it);
it exits by itself when its parent process is gone.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import itertools
import json
import logging
import math
import os
import signal
import sys
from collections.abc import Iterator, Sequence
from typing import Any

logger = logging.getLogger(__name__)

ERR_BAD_REQUEST = 51  # = serving_pipeline.ERR_BAD_REQUEST (a test checks they agree)
ERR_INTERNAL = 53  # = serving_pipeline.ERR_INTERNAL
ERR_OVERLOADED = 54  # = serving_pipeline.ERR_OVERLOADED
GRPC_LIMIT_DETAILS = "Concurrent RPC limit exceeded!"  # = paddle_serving_compat.GRPC_LIMIT_DETAILS
DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
DEFAULT_BODY_TIMEOUT_S = 30.0
READY_PATH = "/-/ready"
PACKAGE = "baidu.paddle_serving.pipeline_serving"
RPC_METHOD = f"/{PACKAGE}.PipelineService/inference"
REQUEST_FIELDS = ("key", "value", "logid", "tensors", "clientip", "method", "name")

# Tensor.elem_type -> the field its data is in. 10/11 (complex) Paddle Serving cannot unpack;
# 13 (bytes) it unpacks with ``np.load(allow_pickle=True)``: code execution for any client.
_TENSOR_DATA_FIELD = {0: "int64_data", 1: "float_data", 2: "int_data", 3: "float64_data",
                      4: "int_data", 5: "float_data", 6: "uint32_data", 7: "uint32_data",
                      8: "int_data", 9: "bool_data", 12: "str_data"}
_INT64 = (-(2 ** 63), 2 ** 63 - 1)


# -- the pipeline's messages ------------------------------------------------------------------
@functools.cache
def messages() -> tuple[type, type, type]:
    """(Request, Response, Tensor): the messages of Paddle Serving's ``pipeline_service.proto``,
    declared in a private descriptor pool (same package, names, numbers and types)."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    F = descriptor_pb2.FieldDescriptorProto
    rep, opt = F.LABEL_REPEATED, F.LABEL_OPTIONAL
    tensor_ref = f".{PACKAGE}.Tensor"
    spec = {
        "Tensor": [("int64_data", 1, F.TYPE_INT64, rep), ("float_data", 2, F.TYPE_FLOAT, rep),
                   ("int_data", 3, F.TYPE_INT32, rep), ("float64_data", 4, F.TYPE_DOUBLE, rep),
                   ("uint32_data", 5, F.TYPE_UINT32, rep), ("bool_data", 6, F.TYPE_BOOL, rep),
                   ("complex64_data", 7, F.TYPE_FLOAT, rep), ("complex128_data", 8, F.TYPE_DOUBLE, rep),
                   ("str_data", 9, F.TYPE_STRING, rep), ("byte_data", 10, F.TYPE_BYTES, opt),
                   ("elem_type", 20, F.TYPE_INT32, opt), ("shape", 21, F.TYPE_INT32, rep),
                   ("lod", 22, F.TYPE_INT32, rep), ("name", 23, F.TYPE_STRING, opt)],
        "Request": [("key", 1, F.TYPE_STRING, rep), ("value", 2, F.TYPE_STRING, rep),
                    ("tensors", 3, F.TYPE_MESSAGE, rep), ("name", 4, F.TYPE_STRING, opt),
                    ("method", 5, F.TYPE_STRING, opt), ("logid", 6, F.TYPE_INT64, opt),
                    ("clientip", 7, F.TYPE_STRING, opt)],
        "Response": [("err_no", 1, F.TYPE_INT32, opt), ("err_msg", 2, F.TYPE_STRING, opt),
                     ("key", 3, F.TYPE_STRING, rep), ("value", 4, F.TYPE_STRING, rep),
                     ("tensors", 5, F.TYPE_MESSAGE, rep)],
    }
    fdp = descriptor_pb2.FileDescriptorProto(name="paddlerec_milvus/pipeline_service.proto",
                                             package=PACKAGE, syntax="proto3")
    for msg_name, fields in spec.items():
        msg = fdp.message_type.add(name=msg_name)
        for name, number, ftype, label in fields:
            field = msg.field.add(name=name, number=number, type=ftype, label=label,
                                  json_name=name)
            if ftype == F.TYPE_MESSAGE:
                field.type_name = tensor_ref
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(fdp.SerializeToString())
    return tuple(message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{PACKAGE}.{n}"))
                 for n in ("Request", "Response", "Tensor"))  # type: ignore[return-value]


def request_problem(request: Any) -> str | None:
    """What is structurally wrong with a pipeline ``Request`` (RPC or HTTP) that Paddle Serving
    would only trip over deep inside (``list index out of range``, a silently dropped duplicate,
    a reshape error), or would run (a pickled tensor); None if nothing."""
    keys, values = request.key, request.value
    if len(keys) != len(values):
        return (f"key has {len(keys)} entries but value has {len(values)}; they pair up one to one "
                "(key[i] names value[i])")
    seen: set[str] = set()
    for key in itertools.chain(keys, (t.name for t in request.tensors)):
        if key in seen:
            return f"key {key[:100]!r} is given twice"
        seen.add(key)
    for i, tensor in enumerate(request.tensors):
        where = f"tensors[{i}] ({tensor.name[:100]!r})"
        field = _TENSOR_DATA_FIELD.get(tensor.elem_type)
        if field is None:
            return (f"{where}: elem_type {tensor.elem_type} is not supported "
                    f"(supported: {sorted(_TENSOR_DATA_FIELD)}; 13, pickled bytes, is refused)")
        if field == "str_data":
            continue
        if any(d < 0 for d in tensor.shape):
            return f"{where}: shape {list(tensor.shape)[:10]} has a negative dimension"
        size, n = math.prod(tensor.shape), len(getattr(tensor, field))
        if size != n:
            return f"{where}: shape {list(tensor.shape)[:10]} holds {size} values but {field} has {n}"
        if len(tensor.lod) % 2:
            return f"{where}: lod has {len(tensor.lod)} values; it must be 2 rows (an even count)"
    return None


# -- HTTP ------------------------------------------------------------------------------------
class BadRequest(Exception):
    """An HTTP request the gateway answers itself (status, message)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _json_error(exc: ValueError | RecursionError, body: bytes | bytearray) -> str:
    if isinstance(exc, json.JSONDecodeError):
        where = f"{exc.msg} at line {exc.lineno} column {exc.colno} (char {exc.pos})"
        if exc.pos < len(exc.doc) and not exc.msg.startswith("Unterminated"):
            where += f": invalid character {exc.doc[exc.pos]!r}"
        return f"body is not valid JSON: {where}"
    if isinstance(exc, UnicodeDecodeError):
        return f"body is not valid JSON: not UTF-8 text ({exc.reason} at byte {exc.start})"
    if isinstance(exc, RecursionError):
        return "body is not valid JSON we accept: nested too deeply"
    return f"body is not valid JSON: {exc}"


def _str_list(data: dict, name: str) -> list[str]:
    value = data.get(name)
    if value is None:
        return []
    if not isinstance(value, list):
        raise BadRequest(400, f"{name} must be a JSON list of strings, got {type(value).__name__}")
    for i, v in enumerate(value):
        if not isinstance(v, str):
            raise BadRequest(400, f"{name}[{i}] must be a string (values are JSON-encoded strings, "
                                  f'e.g. "[[5468, 30460]]"), got {type(v).__name__}')
    return value


def request_deadline_s(request: Any) -> float | None:
    """The request's ``timeout_ms`` in seconds when it is a positive number (the pipeline
    judges any other value and answers 51), else None. It becomes the gRPC call's deadline, so
    the server can drop a call that waited past it in its own queues instead of running it."""
    for key, value in zip(request.key, request.value):
        if key == "timeout_ms":
            try:
                ms = float(value)
            except ValueError:
                return None
            return ms / 1e3 if math.isfinite(ms) and ms > 0 else None
    return None


def parse_body(body: bytes | bytearray, name: str, client_ip: str = "") -> Any:
    """An HTTP body -> the pipeline ``Request``; raises BadRequest (400) naming the problem."""
    Request, _, _ = messages()
    if not body.strip():
        raise BadRequest(400, 'empty body; expected {"key": [...], "value": [...]}')
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise BadRequest(400, _json_error(exc, body)) from None
    if not isinstance(data, dict):
        raise BadRequest(400, 'body must be a JSON object {"key": [...], "value": [...]}, got '
                              f"{type(data).__name__}")
    unknown = [k for k in data if k not in REQUEST_FIELDS]
    if unknown:
        raise BadRequest(400, f"unknown fields {sorted(unknown)[:10]} in the body; expected "
                              f"{list(REQUEST_FIELDS[:2])} (optional: {list(REQUEST_FIELDS[2:6])})")
    keys, values = _str_list(data, "key"), _str_list(data, "value")
    req = Request(key=keys, value=values, name=name)
    logid = data.get("logid")
    if logid is not None:
        if isinstance(logid, str) and logid.strip().lstrip("-").isdigit():
            logid = int(logid)
        if isinstance(logid, bool) or not isinstance(logid, int) or not _INT64[0] <= logid <= _INT64[1]:
            raise BadRequest(400, f"logid must be a 64-bit integer, got {str(logid)[:40]!r}")
        req.logid = logid
    for field in ("clientip", "method"):
        value = data.get(field)
        if value is not None and not isinstance(value, str):
            raise BadRequest(400, f"{field} must be a string, got {type(value).__name__}")
    req.clientip = data.get("clientip") or client_ip
    req.method = data.get("method") or ""
    tensors = data.get("tensors")
    if tensors:
        from google.protobuf import json_format

        if not isinstance(tensors, list):
            raise BadRequest(400, f"tensors must be a JSON list, got {type(tensors).__name__}")
        try:
            json_format.ParseDict({"tensors": tensors}, req)
        except (json_format.ParseError, ValueError, TypeError) as exc:
            raise BadRequest(400, f"tensors: {str(exc)[:300]}") from None
    problem = request_problem(req)
    if problem:
        raise BadRequest(400, problem)
    return req


def _header(scope: dict, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return value
    return None


_JSON_HEADERS = [(b"content-type", b"application/json")]


async def _send(send: Any, status: int, payload: bytes, close: bool = False,
                extra: Sequence[tuple[bytes, bytes]] = ()) -> None:
    headers = [*_JSON_HEADERS, (b"content-length", str(len(payload)).encode()), *extra]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


def _error_body(status: int, message: str) -> bytes:
    err_no = ERR_BAD_REQUEST if status < 500 else ERR_INTERNAL
    prefix = "bad request: " if status < 500 else "gateway: "
    return json.dumps({"err_no": err_no, "err_msg": prefix + message}).encode()


class Gateway:
    """The ASGI app: one service name, its gRPC target, the body limit."""

    def __init__(self, name: str, rpc_target: str, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 body_timeout: float = DEFAULT_BODY_TIMEOUT_S, rpc_timeout: float | None = None,
                 channels: int = 1):
        if max_body_bytes < 1:
            raise ValueError("max_body_bytes must be >= 1")
        self.name, self.rpc_target = name, rpc_target
        self.path = f"/{name}/prediction"
        self.max_body_bytes, self.body_timeout, self.rpc_timeout = max_body_bytes, body_timeout, rpc_timeout
        self.n_channels = max(1, int(channels))
        self._channels: list[Any] = []
        self._calls: Iterator[Any] = iter(())

    async def open(self) -> None:
        """The gRPC channels (in the running event loop); they connect in the background and
        reconnect quickly (the gRPC server may start after the gateway)."""
        import grpc

        Request, Response, _ = messages()
        options = [("grpc.max_receive_message_length", 256 * 1024 * 1024),  # answers: our server
                   ("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
                   ("grpc.max_reconnect_backoff_ms", 1000), ("grpc.use_local_subchannel_pool", 1)]
        calls = []
        for _ in range(self.n_channels):
            channel = grpc.aio.insecure_channel(self.rpc_target, options=options)
            channel.get_state(try_to_connect=True)
            self._channels.append(channel)
            calls.append(channel.unary_unary(RPC_METHOD, request_serializer=Request.SerializeToString,
                                             response_deserializer=Response.FromString))
        self._calls = itertools.cycle(calls)

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()
        self._channels = []

    async def ready(self, timeout: float = 0.5) -> bool:
        if not self._channels:
            return False
        try:
            async with asyncio.timeout(timeout):
                for channel in self._channels:
                    await channel.channel_ready()
        except TimeoutError:
            return False
        return True

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":  # lifespan is off; websockets are not served
            return
        path, method = scope["path"], scope["method"]
        try:
            if path == self.path:
                if method != "POST":
                    raise BadRequest(405, f"{method} {path}: use POST")
                await self._predict(scope, receive, send)
            elif path == READY_PATH and method in ("GET", "HEAD"):
                ok = await self.ready()
                await _send(send, 200 if ok else 503, json.dumps(
                    {"ready": ok, "pid": os.getpid(), "rpc": self.rpc_target}).encode())
            else:
                raise BadRequest(404, f"no such path {path[:200]!r}; the service is POST {self.path}")
        except BadRequest as exc:
            extra = [(b"allow", b"POST")] if exc.status == 405 else []
            # after 413/408 the rest of the body is not read: the connection cannot be reused
            await _send(send, exc.status, _error_body(exc.status, str(exc)),
                        close=exc.status in (408, 413), extra=extra)

    async def _read_body(self, scope: dict, receive: Any) -> bytes | bytearray | None:
        limit = self.max_body_bytes
        length = _header(scope, b"content-length")
        if length is not None and int(length) > limit:  # h11/httptools checked it is a number
            raise BadRequest(413, f"body of {int(length)} bytes is over the limit of {limit} bytes")
        body: bytes | bytearray = b""
        try:
            async with asyncio.timeout(self.body_timeout):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return None
                    chunk = message.get("body", b"")
                    if chunk:
                        if len(body) + len(chunk) > limit:
                            raise BadRequest(413, f"body is over the limit of {limit} bytes "
                                                  "(stopped reading it there)")
                        if not body:
                            body = chunk
                        else:
                            if isinstance(body, bytes):
                                body = bytearray(body)
                            body += chunk
                    if not message.get("more_body", False):
                        return body
        except TimeoutError:
            raise BadRequest(408, f"body not received within {self.body_timeout:g} s") from None

    async def _predict(self, scope: dict, receive: Any, send: Any) -> None:
        import grpc

        body = await self._read_body(scope, receive)
        if body is None:
            return  # the client went away
        client = scope.get("client")
        request = parse_body(body, self.name, client[0] if client else "")
        own = request_deadline_s(request)
        timeout = self.rpc_timeout if own is None else min(own, self.rpc_timeout or own)
        try:
            resp = await next(self._calls)(request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.DEADLINE_EXCEEDED and own is not None and timeout == own:
                # the request's own timeout_ms, sent as the call's gRPC deadline, ran out: the
                # pipeline's answer for a request past its deadline (the server drops it unrun)
                await _send(send, 200, json.dumps({
                    "err_no": ERR_OVERLOADED, "err_msg": f"deadline exceeded: no answer within the "
                    f"request's timeout_ms ({own * 1e3:g} ms); retry shortly"}).encode())
                return
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED and GRPC_LIMIT_DETAILS in (exc.details() or ""):
                # the gRPC server's thread limit: the same answer as the servicer's own refusal
                await _send(send, 200, json.dumps({
                    "err_no": ERR_OVERLOADED, "err_msg": "overloaded: every gRPC thread of the pipeline "
                    "is busy; retry shortly"}).encode())
                return
            status = {grpc.StatusCode.RESOURCE_EXHAUSTED: 413, grpc.StatusCode.UNAVAILABLE: 503,
                      grpc.StatusCode.DEADLINE_EXCEEDED: 504}.get(code, 502)
            message = f"pipeline gRPC server at {self.rpc_target}: {code.name}: {exc.details()}"
            if status != 413:
                logger.warning("%s", message)
            await _send(send, status, _error_body(status, message))
            return
        out: dict[str, Any] = {"err_no": resp.err_no, "err_msg": resp.err_msg, "key": list(resp.key),
                               "value": list(resp.value), "tensors": []}
        if len(resp.tensors):
            from google.protobuf import json_format

            out["tensors"] = [json_format.MessageToDict(t, preserving_proto_field_name=True)
                              for t in resp.tensors]
        await _send(send, 200, json.dumps(out, ensure_ascii=False, separators=(",", ":")).encode())


# -- the process -----------------------------------------------------------------------------
def rpc_target(host: str, port: int) -> str:
    """Where a local gateway reaches a gRPC server bound to ``host``: loopback for a wildcard."""
    host = host.strip("[]")
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _parent_watch(parent_pid: int, server: Any) -> Any:
    async def watch() -> None:
        while not server.should_exit:
            await asyncio.sleep(0.5)
            if parent_pid and os.getppid() != parent_pid:
                logger.error("the pipeline server (pid %d) is gone; stopping", parent_pid)
                server.should_exit = True
                asyncio.get_running_loop().call_later(5.0, os._exit, 1)
    return watch()


def _server_class() -> type:
    import uvicorn

    class _Server(uvicorn.Server):
        """SIGTERM: graceful stop; SIGINT ignored (Ctrl-C reaches the whole process group, and the
        pipeline server stops the gateway itself)."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, self.handle_exit),
                        signal.SIGINT: signal.signal(signal.SIGINT, signal.SIG_IGN)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    return _Server


async def serve(args: argparse.Namespace) -> None:
    import uvicorn

    gateway = Gateway(args.name, args.rpc, args.max_body_bytes, args.body_timeout,
                      args.rpc_timeout or None, args.channels)
    await gateway.open()
    config = uvicorn.Config(gateway, host=args.host, port=args.port, lifespan="off", log_config=None,
                            log_level=args.log_level.lower(), access_log=False, server_header=False,
                            timeout_graceful_shutdown=args.grace, backlog=args.backlog)
    server = _server_class()(config)
    watch = asyncio.create_task(_parent_watch(args.parent_pid, server))
    try:
        await server.serve()
    finally:
        watch.cancel()
        await gateway.close()
    if not server.started:
        raise SystemExit(f"pipeline gateway: could not listen on {args.host}:{args.port}")


def _return_big_buffers_to_the_os() -> None:
    """glibc raises its mmap threshold after a big buffer is freed, so the next big bodies come
    from the heap and stay in RSS; a fixed threshold returns every buffer over 128 KiB."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None).mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m paddlerec_milvus.pipeline_gateway",
                                description=__doc__.split("\n")[0])
    p.add_argument("--name", required=True, help="service name: the path is /NAME/prediction")
    p.add_argument("--host", default="127.0.0.1", help="HTTP bind address")
    p.add_argument("--port", type=int, required=True, help="HTTP port")
    p.add_argument("--rpc", required=True, help="the pipeline's gRPC server, host:port")
    p.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES)
    p.add_argument("--body-timeout", type=float, default=DEFAULT_BODY_TIMEOUT_S,
                   help="seconds a request body may take to arrive")
    p.add_argument("--rpc-timeout", type=float, default=0, help="gRPC deadline per request; 0 = none")
    p.add_argument("--channels", type=int, default=1, help="gRPC connections (round robin)")
    p.add_argument("--grace", type=float, default=3.0, help="seconds to finish requests on SIGTERM")
    p.add_argument("--backlog", type=int, default=2048)
    p.add_argument("--parent-pid", type=int, default=0, help="exit when this process is gone")
    p.add_argument("--log-level", default="WARNING")
    args = p.parse_args(argv)
    _return_big_buffers_to_the_os()
    logging.basicConfig(level=args.log_level.upper(), datefmt="%H:%M:%S",
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
