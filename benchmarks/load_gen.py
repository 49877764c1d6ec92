"""Load generators that run in their own processes, so the load does not share the GIL (or the
event loop) of the process that measures, nor of the server.

    python -m benchmarks.load_gen http-open   --url URL --bodies B.json --phases 200:4,50:4 [--processes 2]
    python -m benchmarks.load_gen http-closed --url URL --bodies B.json -c 16 -n 2000 [--processes 2]
    python -m benchmarks.load_gen grpc-open   --target HOST:PORT --bodies B.json --phases 100:5
    python -m benchmarks.load_gen grpc-closed --target HOST:PORT --bodies B.json -c 64 -n 4000 --processes 4

``--bodies``: a JSON list of request objects (``{"hist_item": [[...]], "top_k": 50}``); requests
rotate over them. HTTP posts each as JSON; gRPC sends Paddle Serving's pipeline ``Request`` with
every value JSON-encoded (``filter`` as it is), the way ``serving/rpc_client.py`` does.

Open loop: requests leave on a fixed schedule (``rate:seconds`` phases; with P processes, process k
sends the k-th of every P scheduled requests, so together they keep one even schedule) whatever the
replies, and latency is measured from the *scheduled* send time, so a stalled server shows up as
growing latency of the requests queued behind it (no coordinated omission). HTTP uses raw
keep-alive HTTP/1.1 connections, a new one whenever none is idle, so a slow reply never delays the
next send. gRPC uses one ``grpc.aio`` channel per process, raw bytes in and out (the request is
serialized once; only ``err_no`` of a reply is decoded).

Closed loop: C workers, each sending its next request when the previous one answered; latency from
the actual send.

Each generator process writes its raw records (scheduled/sent offset, latency, status); the
caller merges them and summarizes with ``summarize`` / ``timeline``. Statuses: the HTTP status code
(``"200"``, ``"429"``, ...), for gRPC ``"ok"`` (``err_no`` 0) or ``"errNN"``, ``"grpc:CODE"`` for a
failed call, and ``"timeout"`` / ``"conn"`` for no reply within the client timeout / a broken
connection; ``"expired"``: a gRPC call whose request's ``timeout_ms`` (sent as the call's deadline)
ran out (an answer at the deadline, neither accepted nor a fast refusal). Only the standard
library here (and ``grpc`` for the gRPC modes).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any
from urllib.parse import urlsplit

PIPELINE_METHOD = "/baidu.paddle_serving.pipeline_serving.PipelineService/inference"
ACCEPTED = frozenset({"200", "ok"})
REJECTED = frozenset({"429", "503", "err54"})  # 54: ERR_OVERLOADED of serving_pipeline
EXPIRED = "expired"  # the call's own gRPC deadline (the request's timeout_ms) ran out
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- wire formats ---------------------------------------------------------------------------------
def _varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _len_field(number: int, data: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def pipeline_fields(body: dict[str, Any]) -> dict[str, str]:
    """A request object -> the pipeline's string fields (JSON values; ``filter`` verbatim)."""
    return {k: v if isinstance(v, str) and k == "filter" else json.dumps(v) for k, v in body.items()}


def encode_pipeline_request(fields: dict[str, str], clientip: str = "127.0.0.1", logid: int = 0) -> bytes:
    """Paddle Serving 0.9's ``pipeline_serving.Request``: key = 1, value = 2 (repeated string),
    tensors = 3, name = 4, method = 5, logid = 6 (int64), clientip = 7."""
    out = b"".join(_len_field(1, k.encode()) for k in fields)
    out += b"".join(_len_field(2, v.encode()) for v in fields.values())
    if logid:
        out += _varint(6 << 3) + _varint(logid)
    if clientip:
        out += _len_field(7, clientip.encode())
    return out


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _fields(buf: bytes) -> Iterable[tuple[int, int, Any]]:
    """(field number, wire type, value) of a protobuf message; length-delimited values as memoryview."""
    pos, n, view = 0, len(buf), memoryview(buf)
    while pos < n:
        tag, pos = _read_varint(buf, pos)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = _read_varint(buf, pos)
        elif wire == 2:
            size, pos = _read_varint(buf, pos)
            value, pos = view[pos:pos + size], pos + size
        elif wire == 1:
            value, pos = view[pos:pos + 8], pos + 8
        elif wire == 5:
            value, pos = view[pos:pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield number, wire, value


def response_err_no(buf: bytes) -> int:
    """``err_no`` (field 1, int32) of a pipeline ``Response``; 0 when absent (proto3 default)."""
    if buf[:1] == b"\x08":  # the usual case: fields in number order, err_no first
        value = _read_varint(buf, 1)[0]
    else:
        value = next((v for num, wire, v in _fields(buf) if num == 1 and wire == 0), 0)
    return value - (1 << 64) if value >= 1 << 63 else value  # a negative int32 is a 10-byte varint


def decode_pipeline_response(buf: bytes) -> dict[str, Any]:
    """``Response{err_no = 1, err_msg = 2, key = 3, value = 4}`` -> a dict (for checks, not the hot path)."""
    out: dict[str, Any] = {"err_no": 0, "err_msg": "", "key": [], "value": []}
    for num, wire, v in _fields(buf):
        if num == 1 and wire == 0:
            out["err_no"] = v - (1 << 64) if v >= 1 << 63 else v
        elif num == 2 and wire == 2:
            out["err_msg"] = bytes(v).decode()
        elif num in (3, 4) and wire == 2:
            out["key" if num == 3 else "value"].append(bytes(v).decode())
    return out


def http_request_bytes(url: str, body: dict[str, Any]) -> bytes:
    u = urlsplit(url)
    data = json.dumps(body).encode()
    path = (u.path or "/") + (f"?{u.query}" if u.query else "")
    head = (f"POST {path} HTTP/1.1\r\nHost: {u.netloc}\r\nContent-Type: application/json\r\n"
            f"Accept: application/json\r\nContent-Length: {len(data)}\r\n\r\n")
    return head.encode() + data


async def _read_http_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """Read one response (body drained); returns (status, connection reusable)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    status = int(parts[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip().lower()
    keep = headers.get("connection") != "close" and parts[0] == "HTTP/1.1"
    if "chunked" in headers.get("transfer-encoding", ""):
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    elif "content-length" in headers:
        await reader.readexactly(int(headers["content-length"]))
    else:
        await reader.read()  # till close
        keep = False
    return status, keep


# -- the senders ---------------------------------------------------------------------------------
Sender = Callable[[int, list], Awaitable[str]]  # (request index, stamp) -> status; stamp gets the send time


class HttpSender:
    """Raw keep-alive HTTP/1.1: an idle connection if there is one, else a new one."""

    def __init__(self, url: str, bodies: Sequence[dict[str, Any]], timeout: float):
        u = urlsplit(url)
        self.host, self.port = u.hostname or "127.0.0.1", u.port or 80
        self.requests = [http_request_bytes(url, b) for b in bodies]
        self.timeout = timeout
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.opened = 0
        self.busy = 0
        self.max_busy = 0

    async def __call__(self, i: int, stamp: list[float] | None = None) -> str:
        self.busy += 1
        self.max_busy = max(self.max_busy, self.busy)
        try:
            async with asyncio.timeout(self.timeout):
                return await self._send(self.requests[i % len(self.requests)], stamp)
        except TimeoutError:
            return "timeout"
        finally:
            self.busy -= 1

    async def _send(self, data: bytes, stamp: list[float] | None) -> str:
        for attempt in (0, 1):
            reused = bool(self.idle)
            conn = self.idle.pop() if reused else None
            try:
                if conn is None:
                    conn = await asyncio.open_connection(self.host, self.port)
                    self.opened += 1
                conn[1].write(data)
                if stamp is not None:  # the bytes are with the kernel (or queued on the transport)
                    stamp[:] = [asyncio.get_running_loop().time()]
                status, keep = await _read_http_response(conn[0])
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError,
                    IndexError):
                if conn is not None:
                    conn[1].close()
                if reused and attempt == 0:
                    continue  # a keep-alive connection the server had closed: once more, fresh
                return "conn"
            except BaseException:  # cancelled (the timeout): the connection is mid-reply
                if conn is not None:
                    conn[1].close()
                raise
            if keep:
                self.idle.append(conn)
            else:
                conn[1].close()
            return str(status)
        return "conn"

    async def warm(self, n: int) -> None:
        """Open ``n`` idle connections before the clock starts."""
        for _ in range(n):
            self.idle.append(await asyncio.open_connection(self.host, self.port))
            self.opened += 1

    async def close(self) -> None:
        for _, w in self.idle:
            w.close()
        self.idle.clear()


class GrpcSender:
    """The pipeline's unary method on one ``grpc.aio`` channel, raw bytes both ways."""

    def __init__(self, target: str, bodies: Sequence[dict[str, Any]], timeout: float,
                 method: str = PIPELINE_METHOD):
        import grpc

        self._grpc = grpc
        self.requests = [encode_pipeline_request(pipeline_fields(b)) for b in bodies]
        self.timeout = timeout
        # a body's timeout_ms is also its call's gRPC deadline (as the HTTP gateway sends it): the
        # server drops a call that waited past it unrun, and the reply comes by then ("expired")
        self.deadlines = [min(timeout, b["timeout_ms"] / 1e3) if b.get("timeout_ms") else None
                          for b in bodies]
        self.channel = grpc.aio.insecure_channel(
            target, options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)])
        self.call = self.channel.unary_unary(method, request_serializer=None, response_deserializer=None)
        self.opened = 1
        self.max_busy = self.busy = 0

    async def __call__(self, i: int, stamp: list[float] | None = None) -> str:
        self.busy += 1
        self.max_busy = max(self.max_busy, self.busy)
        if stamp is not None:
            stamp[:] = [asyncio.get_running_loop().time()]
        own = self.deadlines[i % len(self.requests)]
        try:
            reply = await self.call(self.requests[i % len(self.requests)],
                                    timeout=self.timeout if own is None else own)
        except self._grpc.aio.AioRpcError as exc:
            code = exc.code()
            if code == self._grpc.StatusCode.DEADLINE_EXCEEDED:
                return "timeout" if own is None else "expired"
            refused = "Concurrent RPC limit" in (exc.details() or "")
            if code == self._grpc.StatusCode.RESOURCE_EXHAUSTED and refused:
                return "err54"  # gRPC's own refusal past the server's thread limit: an overload answer
            return f"grpc:{code.name}"
        finally:
            self.busy -= 1
        err = response_err_no(reply)
        return "ok" if err == 0 else f"err{err}"

    async def close(self) -> None:
        await self.channel.close()


# -- the loops -----------------------------------------------------------------------------------
def schedule(phases: Sequence[tuple[float, float]], index: int = 0, of: int = 1) -> list[float]:
    """Send offsets (s) of an even schedule through ``(rate/s, seconds)`` phases; this process
    takes every ``of``-th of them starting at ``index``."""
    times: list[float] = []
    start = 0.0
    for rate, seconds in phases:
        n = int(round(rate * seconds))
        times += [start + j / rate for j in range(n)] if rate > 0 else []
        start += seconds
    return times[index::of]


async def open_loop(send: Sender, offsets: Sequence[float], first: int, stride: int,
                    t0: float) -> dict[str, Any]:
    """Send request ``first + k * stride`` at ``t0 + offsets[k]`` (loop clock) whatever the
    replies; latency from the scheduled time. ``send_lag_*``: scheduled time to the request's
    bytes handed to the connection (a new connection's set-up included): how late the generator
    itself was."""
    loop = asyncio.get_running_loop()
    lat = [0.0] * len(offsets)
    lag = [0.0] * len(offsets)  # ms from the scheduled time to the bytes handed to the connection
    status = [""] * len(offsets)
    lags: list[float] = []

    async def one(k: int, due: float) -> None:
        stamp: list[float] = []
        status[k] = await send(first + k * stride, stamp)
        lat[k] = (loop.time() - due) * 1000.0
        if stamp:
            lags.append(stamp[0] - due)
            lag[k] = (stamp[0] - due) * 1000.0

    tasks = []
    for k, off in enumerate(offsets):
        due = t0 + off
        delay = due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(k, due)))
    if tasks:
        await asyncio.gather(*tasks)
    lags.sort()
    return {"t": list(offsets), "lat": lat, "st": status, "lag": lag,
            "send_lag_p99_ms": _pct(lags, 99) * 1000 if lags else 0.0,
            "send_lag_max_ms": lags[-1] * 1000 if lags else 0.0}


async def closed_loop(send: Sender, concurrency: int, total: int, first: int, stride: int,
                      t0: float) -> dict[str, Any]:
    """``concurrency`` workers share ``total`` requests, each sends when its last one answered."""
    loop = asyncio.get_running_loop()
    t, lat, status = [], [], []
    counter = iter(range(total))
    delay = t0 - loop.time()
    if delay > 0:
        await asyncio.sleep(delay)

    async def worker() -> None:
        for k in counter:
            sent = loop.time()
            st = await send(first + k * stride, None)
            lat.append((loop.time() - sent) * 1000.0)
            t.append(sent - t0)
            status.append(st)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {"t": t, "lat": lat, "st": status}


# -- one generator process ---------------------------------------------------------------------
def _split(n: int, parts: int, k: int) -> int:
    return n // parts + (1 if k < n % parts else 0)


def _await_start(args: argparse.Namespace) -> float:
    """Wall-clock start: --start-at, else a line on stdin (after 'ready' on stdout), else now."""
    if args.start_at:
        return float(args.start_at)
    if args.sync:
        print("ready", flush=True)
        return float(sys.stdin.readline())
    return time.time()


async def _worker_async(args: argparse.Namespace) -> dict[str, Any]:
    with open(args.bodies) as f:
        bodies = json.load(f)
    if args.kind.startswith("http"):
        sender: HttpSender | GrpcSender = HttpSender(args.url, bodies, args.timeout)
        await sender.warm(2)
    else:
        sender = GrpcSender(args.target, bodies, args.timeout)
        await asyncio.wait_for(sender.channel.channel_ready(), 60)
    start_at = _await_start(args)
    loop = asyncio.get_running_loop()
    t0 = loop.time() + (start_at - time.time())
    try:
        if args.kind.endswith("open"):
            phases = parse_phases(args.phases)
            offsets = schedule(phases, args.index, args.of)
            out = await open_loop(sender, offsets, args.index, args.of, t0)
        else:
            out = await closed_loop(sender, args.concurrency, args.requests, args.index, args.of, t0)
    finally:
        await sender.close()
    out.update(connections=sender.opened, max_in_flight=sender.max_busy)
    return out


def parse_phases(text: str) -> list[tuple[float, float]]:
    """``"200:4,50:4"`` -> [(200.0, 4.0), (50.0, 4.0)] (rate per second : seconds)."""
    out = []
    for part in text.split(","):
        rate, seconds = part.split(":")
        out.append((float(rate), float(seconds)))
    return out


def format_phases(phases: Sequence[tuple[float, float]]) -> str:
    return ",".join(f"{r:g}:{s:g}" for r, s in phases)


# -- many processes --------------------------------------------------------------------------
def run_load(kind: str, *, bodies: Sequence[dict[str, Any]], url: str = "", target: str = "",
             phases: Sequence[tuple[float, float]] = (), concurrency: int = 1, requests: int = 0,
             processes: int = 1, timeout: float = 10.0, python: str = sys.executable) -> dict[str, Any]:
    """Run ``processes`` generator processes of ``kind`` (http-open, http-closed, grpc-open,
    grpc-closed) together and merge their records; the load is split evenly between them."""
    if kind not in ("http-open", "http-closed", "grpc-open", "grpc-closed"):
        raise ValueError(f"unknown load kind {kind!r}")
    if kind.endswith("closed"):
        processes = max(1, min(processes, concurrency))
    with tempfile.TemporaryDirectory(prefix="load_gen_") as tmp:
        path = os.path.join(tmp, "bodies.json")
        with open(path, "w") as f:
            json.dump(list(bodies), f)
        procs, outs, errs = [], [], []

        def stderr_of(k: int) -> str:
            errs[k].seek(0)
            return errs[k].read()[-2000:]

        for k in range(processes):
            out = os.path.join(tmp, f"out{k}.json")
            cmd = [python, "-m", "benchmarks.load_gen", kind, "--bodies", path, "--out", out, "--sync",
                   "--index", str(k), "--of", str(processes), "--timeout", str(timeout)]
            cmd += ["--url", url] if kind.startswith("http") else ["--target", target]
            if kind.endswith("open"):
                cmd += ["--phases", format_phases(phases)]
            else:
                cmd += ["--concurrency", str(_split(concurrency, processes, k)),
                        "--requests", str(_split(requests, processes, k))]
            err = open(os.path.join(tmp, f"err{k}.txt"), "w+")  # a file: a chatty child never blocks
            errs.append(err)
            path_env = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH", "")) if p)
            procs.append(subprocess.Popen(cmd, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                          stderr=err, text=True, env=dict(os.environ, PYTHONPATH=path_env)))
            outs.append(out)
        try:
            for k, p in enumerate(procs):  # every process set up (imports, channel) before the clock starts
                line = p.stdout.readline()
                if line.strip() != "ready":
                    p.wait(30)
                    raise RuntimeError(f"load generator failed to start: {stderr_of(k)}")
            start_at = time.time() + 0.2
            for p in procs:
                p.stdin.write(f"{start_at!r}\n")
                p.stdin.flush()
            longest = sum(s for _, s in phases) + timeout + 60 if kind.endswith("open") else 3600
            for k, p in enumerate(procs):
                p.wait(longest)
                if p.returncode != 0:
                    raise RuntimeError(f"load generator exited {p.returncode}: {stderr_of(k)}")
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
                p.stdin.close()
                p.stdout.close()
            for err in errs:
                err.close()
        parts = []
        for out in outs:
            with open(out) as f:
                parts.append(json.load(f))
    merged: dict[str, Any] = {"kind": kind, "processes": processes, "t": [], "lat": [], "st": []}
    if all("lag" in part for part in parts):
        merged["lag"] = []
    for part in parts:
        for key in ("t", "lat", "st", "lag"):
            if key in merged:
                merged[key] += part[key]
    merged["connections"] = sum(p["connections"] for p in parts)
    merged["max_in_flight"] = sum(p["max_in_flight"] for p in parts)
    for key in ("send_lag_p99_ms", "send_lag_max_ms"):
        if key in parts[0]:
            merged[key] = max(p[key] for p in parts)
    if kind.endswith("open"):
        merged["phases"] = [list(p) for p in phases]
    return merged


# -- summaries -----------------------------------------------------------------------------------
def _pct(sorted_values: Sequence[float], q: float) -> float:
    """Percentile with linear interpolation (numpy's default) of sorted values."""
    if not sorted_values:
        return float("nan")
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def _lat_stats(values: list[float]) -> dict[str, float]:
    values = sorted(values)
    return {"n": len(values), "p50_ms": _pct(values, 50), "p99_ms": _pct(values, 99),
            "max_ms": values[-1] if values else float("nan")}


def summarize(rec: dict[str, Any], t_from: float | None = None, t_to: float | None = None,
              seconds: float | None = None,
              rate_window: tuple[float, float] | None = None) -> dict[str, Any]:
    """Status counts and latency of accepted / rejected replies among requests scheduled (open
    loop) or sent (closed loop) in [t_from, t_to); ``rejected_from_send``: the rejections' latency
    from the request handed to its connection (the generator's own lateness left out).
    ``ok_rps``: those accepted per second over ``seconds`` (default: first send to last reply),
    or, with ``rate_window`` (w0, w1), the accepted replies *completed* within it (of any
    request, whenever scheduled) per second of it: the throughput of 200s while a phase lasts."""
    lo = -math.inf if t_from is None else t_from
    hi = math.inf if t_to is None else t_to
    idx = [i for i, t in enumerate(rec["t"]) if lo <= t < hi]
    counts: dict[str, int] = {}
    ok, rej, rej_sent, expired = [], [], [], []
    lag = rec.get("lag")
    for i in idx:
        st = rec["st"][i]
        counts[st] = counts.get(st, 0) + 1
        if st in ACCEPTED:
            ok.append(rec["lat"][i])
        elif st == EXPIRED:
            expired.append(rec["lat"][i])
        elif st in REJECTED:
            rej.append(rec["lat"][i])
            if lag is not None:
                rej_sent.append(rec["lat"][i] - lag[i])
    if rate_window is not None:
        w0, w1 = rate_window
        seconds = w1 - w0
        done = sum(1 for t, lat, st in zip(rec["t"], rec["lat"], rec["st"])
                   if st in ACCEPTED and w0 <= t + lat / 1000 < w1)
        return {"requests": len(idx), "status": dict(sorted(counts.items())), "ok": _lat_stats(ok),
                "rejected": _lat_stats(rej), "rejected_from_send": _lat_stats(rej_sent),
                "expired": _lat_stats(expired), "errors": len(idx) - len(ok) - len(rej) - len(expired),
                "ok_rps": done / seconds, "rps": len(idx) / seconds, "seconds": seconds}
    if seconds is None:
        if idx:
            first = min(rec["t"][i] for i in idx)
            last = max(rec["t"][i] + rec["lat"][i] / 1000.0 for i in idx)
            seconds = max(last - first, 1e-9)
        else:
            seconds = float("nan")
    return {"requests": len(idx), "status": dict(sorted(counts.items())), "ok": _lat_stats(ok),
            "rejected": _lat_stats(rej), "rejected_from_send": _lat_stats(rej_sent),
            "expired": _lat_stats(expired), "errors": len(idx) - len(ok) - len(rej) - len(expired),
            "ok_rps": len(ok) / seconds, "rps": len(idx) / seconds, "seconds": seconds}


def timeline(rec: dict[str, Any], bin_s: float = 1.0) -> list[dict[str, Any]]:
    """Per ``bin_s`` of the run: requests scheduled (offered), accepted / rejected / other replies
    completed in the bin (per second), and the accepted latency (p50/p99) of the requests completed
    in it."""
    if not rec["t"]:
        return []
    end = max(t + lat / 1000.0 for t, lat in zip(rec["t"], rec["lat"]))
    n = int(math.ceil(end / bin_s + 1e-9))
    bins = [{"offered": 0, "ok": 0, "rejected": 0, "other": 0, "lat": []} for _ in range(n)]
    for t, lat, st in zip(rec["t"], rec["lat"], rec["st"]):
        bins[min(int(t / bin_s), n - 1)]["offered"] += 1
        b = bins[min(int((t + lat / 1000.0) / bin_s), n - 1)]
        if st in ACCEPTED:
            b["ok"] += 1
            b["lat"].append(lat)
        elif st in REJECTED:
            b["rejected"] += 1
        else:
            b["other"] += 1
    out = []
    for k, b in enumerate(bins):
        lat = sorted(b["lat"])
        out.append({"second": round(k * bin_s, 3), "offered/s": b["offered"] / bin_s,
                    "ok/s": b["ok"] / bin_s, "rejected/s": b["rejected"] / bin_s,
                    "other/s": b["other"] / bin_s, "ok p50 ms": _pct(lat, 50), "ok p99 ms": _pct(lat, 99)})
    return out


# -- hey -----------------------------------------------------------------------------------------
def parse_hey_csv(text: str, requested: int | None = None) -> dict[str, Any]:
    """``hey -o csv`` output -> records (sent offset, latency, status) like ``run_load``'s.

    hey writes one row per request that got a reply (``response-time`` and ``offset`` in seconds);
    requests that failed (connection error, timeout) have no row: with ``requested`` they are
    counted as ``"conn"`` records at the end (without a latency)."""
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    if not lines or not lines[0].startswith("response-time"):
        raise ValueError(f"not hey CSV output: {text[:200]!r}")
    head = lines[0].split(",")
    i_rt, i_st, i_off = head.index("response-time"), head.index("status-code"), head.index("offset")
    rec: dict[str, Any] = {"t": [], "lat": [], "st": []}
    for line in lines[1:]:
        cells = line.split(",")
        rec["t"].append(float(cells[i_off]))
        rec["lat"].append(float(cells[i_rt]) * 1000.0)
        rec["st"].append(cells[i_st].strip())
    if requested is not None and requested > len(rec["t"]):
        missing = requested - len(rec["t"])
        end = max((t + lat / 1000.0 for t, lat in zip(rec["t"], rec["lat"])), default=0.0)
        rec["t"] += [end] * missing
        rec["lat"] += [0.0] * missing
        rec["st"] += ["conn"] * missing
    return rec


def run_hey(url: str, body: dict[str, Any], concurrency: int, requests: int, timeout: float = 20,
            hey: str = "hey") -> dict[str, Any]:
    """``hey -c C -n N -m POST -T application/json -d BODY -o csv URL``, parsed (one fixed body)."""
    requests = max(requests, concurrency)  # hey: n must be >= c
    cmd = [hey, "-c", str(concurrency), "-n", str(requests), "-t", str(int(math.ceil(timeout))),
           "-m", "POST", "-T", "application/json", "-d", json.dumps(body), "-o", "csv", url]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"hey failed ({proc.returncode}): {proc.stderr[-1000:]}")
    # hey -n N with c workers sends c * (N // c) requests
    return parse_hey_csv(proc.stdout, requested=concurrency * (requests // concurrency))


# -- wrk -----------------------------------------------------------------------------------------
WRK_SCRIPT = r"""
-- paddlerec-milvus closed-loop POSTs: bodies rotate (one JSON per line of the file in args[1]);
-- statuses counted per thread, summed in done() and printed as one JSON line
local bodies, i = {}, 0
local threads = {}
function setup(thread)
  thread:set("id", #threads)
  table.insert(threads, thread)
end
function init(args)
  for line in io.lines(args[1]) do
    if #line > 0 then table.insert(bodies, line) end
  end
  i = id or 0
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
end
function request()
  i = i % #bodies + 1
  return wrk.format(nil, nil, nil, bodies[i])
end
function response(status, headers, body)
  if status == 200 then ok = (ok or 0) + 1
  elseif status == 429 then r429 = (r429 or 0) + 1
  elseif status == 503 then r503 = (r503 or 0) + 1 end
end
function done(summary, latency, requests)
  local ok, r429, r503 = 0, 0, 0
  for _, t in ipairs(threads) do
    ok = ok + (t:get("ok") or 0); r429 = r429 + (t:get("r429") or 0); r503 = r503 + (t:get("r503") or 0)
  end
  local e = summary.errors
  io.write(string.format('WRKJSON {"requests": %d, "duration_us": %d, "ok": %d, "r429": %d, "r503": %d, '
    .. '"non2xx": %d, "connect": %d, "read": %d, "write": %d, "timeout": %d, '
    .. '"p50_us": %d, "p99_us": %d, "max_us": %d}\n',
    summary.requests, summary.duration, ok, r429, r503, e.status, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.max))
end
"""


def run_wrk(url: str, bodies: Sequence[dict[str, Any]], concurrency: int, seconds: float,
            timeout: float = 20, wrk: str = "wrk") -> dict[str, Any]:
    """``wrk`` closed loop (C, one event loop per thread: it takes a few percent of a core where
    hey, in Go, took a third of this 2-core machine at 1,000 req/s) over rotating bodies, as a
    ``summarize``-shaped dict. wrk keeps a latency histogram, not per-request records: its
    percentiles cover every reply (200 or not)."""
    with tempfile.TemporaryDirectory(prefix="wrk_") as tmp:
        script, data = os.path.join(tmp, "post.lua"), os.path.join(tmp, "bodies.jsonl")
        with open(script, "w") as f:
            f.write(WRK_SCRIPT)
        with open(data, "w") as f:
            f.writelines(json.dumps(b, separators=(",", ":")) + "\n" for b in bodies)
        threads = max(1, min(2, concurrency))
        cmd = [wrk, "-t", str(threads), "-c", str(concurrency), "-d", f"{max(1, round(seconds))}s",
               "--timeout", f"{int(math.ceil(timeout))}s", "-s", script, url, "--", data]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + timeout + 60)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("WRKJSON ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {(proc.stderr or proc.stdout)[-1000:]}")
    w = json.loads(line[len("WRKJSON "):])
    secs = w["duration_us"] / 1e6
    errors = w["connect"] + w["read"] + w["write"] + w["timeout"]
    lat = {"n": w["ok"], "p50_ms": w["p50_us"] / 1e3, "p99_ms": w["p99_us"] / 1e3,
           "max_ms": w["max_us"] / 1e3}
    rejected = w["r429"] + w["r503"]
    status = {"200": w["ok"], "429": w["r429"], "503": w["r503"],
              "other": w["requests"] - w["ok"] - rejected}
    return {"requests": w["requests"] + errors, "status": {k: v for k, v in status.items() if v},
            "ok": lat, "rejected": {"n": rejected, "p50_ms": float("nan"), "p99_ms": float("nan"),
                                    "max_ms": float("nan")},
            "expired": {"n": 0, "p50_ms": float("nan"), "p99_ms": float("nan"), "max_ms": float("nan")},
            "errors": w["requests"] - w["ok"] - rejected + errors, "ok_rps": w["ok"] / secs,
            "rps": w["requests"] / secs, "seconds": secs, "generator": "wrk"}


# -- CLI ------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.load_gen", description=__doc__.split("\n")[0])
    p.add_argument("kind", choices=("http-open", "http-closed", "grpc-open", "grpc-closed"))
    p.add_argument("--url", default="", help="HTTP: e.g. http://127.0.0.1:8000/rec/recall")
    p.add_argument("--target", default="", help="gRPC: host:port of the pipeline")
    p.add_argument("--bodies", required=True, help="JSON list of request objects")
    p.add_argument("--phases", default="", help="open loop: rate:seconds[,rate:seconds...]")
    p.add_argument("-c", "--concurrency", type=int, default=1, help="closed loop: workers")
    p.add_argument("-n", "--requests", type=int, default=0, help="closed loop: requests in all")
    p.add_argument("--processes", type=int, default=1, help="generator processes sharing the load")
    p.add_argument("--timeout", type=float, default=10.0, help="per-request client timeout, s")
    p.add_argument("--out", default="", help="write the records (JSON) here; default: a summary to stdout")
    p.add_argument("--index", type=int, default=-1, help=argparse.SUPPRESS)  # set: one worker process
    p.add_argument("--of", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--sync", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--start-at", type=float, default=0.0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.index >= 0:  # one of the processes
        out = asyncio.run(_worker_async(args))
        with open(args.out, "w") as f:
            json.dump(out, f)
        return 0
    with open(args.bodies) as f:
        bodies = json.load(f)
    rec = run_load(args.kind, bodies=bodies, url=args.url, target=args.target,
                   phases=parse_phases(args.phases) if args.phases else (), concurrency=args.concurrency,
                   requests=args.requests, processes=args.processes, timeout=args.timeout)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rec, f)
    seconds = sum(s for _, s in rec["phases"]) if "phases" in rec else None
    print(json.dumps(summarize(rec, seconds=seconds), indent=2))
    if "phases" in rec:
        for row in timeline(rec):
            print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
