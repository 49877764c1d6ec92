"""Serving under load, with the load from generators in their own processes.

    python -m benchmarks.serving_load [--quick] [--catalogues demo,book] [--backends lite,server]
                                      [--deadline-ms 200] [--out output/bench/serving_load.json]

Targets: the REST API (``uvicorn serving.main:app``) and the Paddle Serving pipeline's gRPC port
(``paddlerec-milvus serve``), each batched (the service's micro-batcher at its defaults) and
unbatched (``PADDLEREC_MILVUS_BATCH_MAX_USERS=0`` / ``recall.batch_max_users: 0``), each started as
its own process on free ports. Loads: closed loop at concurrency 1, 4, 16, 64 (REST: ``hey``;
gRPC: ``benchmarks.load_gen grpc-closed`` over 2 processes), and for the batched targets an open
loop (``benchmarks.load_gen http-open`` / ``grpc-open``, 2 processes, latency from the scheduled
send time) at 50/80/100/200% of the batched closed-loop capacity, then a recovery run (2x the
capacity, then 0.5x); and concurrency 1 on both modes side by side, in alternating turns (the
fair c=1 ratio on a shared machine). Beside them, the same recall called in-process (threads,
unbatched) as the floor. Catalogues: the demo export (trained in seconds) and amazon-book-1m
(38.5k items, 1 epoch); backends: Milvus Lite and a Milvus server (the PyPI ``milvus`` package).
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

from paddlerec_milvus.milvus_index import is_local_uri

from . import load_gen
from .common import BENCH_DIR, MODELS, REPO, machine

logger = logging.getLogger(__name__)

CONCURRENCY = (1, 4, 16, 64)
OPEN_FRACTIONS = (0.5, 0.8, 1.0, 2.0)
TOP_K = 50
TARGETS = ("rest", "rpc")
MODES = ("unbatched", "batched")
CATALOGUES = ("demo", "book")
BACKENDS = ("lite", "server")
GEN_PROCESSES = 2  # generator processes of the gRPC closed loop (c > 1) and of every open loop
PIPELINE_THREADS = int(os.environ.get("BENCH_WORKER_NUM", 64))  # worker_num (gRPC threads), in both modes
OP_CONCURRENCY = 2  # threads per Op, in both modes (each takes every queued request at once)
BOOK_BUDGET = ["runner.epochs=1", "runner.batches_per_epoch=1000"]
PB_ENV = "PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION"


def budget(quick: bool) -> dict[str, Any]:
    """Closed loop: about ``level_s`` seconds per level (requests = the last level's req/s x
    level_s, within ``closed_min``..``closed_max``); in-process requests per level; warm-up
    requests; seconds per open-loop phase."""
    if quick:
        return {"level_s": 1.5, "closed_min": 100, "closed_max": 500, "inprocess": 200, "warmup": 60,
                "open_s": 2.0, "recovery_s": (2.0, 2.0), "paired_rounds": 2, "paired_s": 1.0}
    return {"level_s": 8.0, "closed_min": 300, "closed_max": 5000, "inprocess": 500, "warmup": 200,
            "open_s": 5.0, "recovery_s": (5.0, 5.0), "paired_rounds": 6, "paired_s": 2.0}


def level_requests(b: dict[str, Any], last_rps: float, conc: int) -> int:
    n = int(last_rps * b["level_s"]) if math.isfinite(last_rps) else b["closed_min"]
    return max(b["closed_min"], 2 * conc, min(b["closed_max"], n))


def child_env(**extra: str | None) -> dict[str, str]:
    """The environment of a target or export: ours, protobuf's backend left to the child (the
    pipeline picks the pure-Python one itself), ``extra`` set (None: removed)."""
    env = {k: v for k, v in os.environ.items() if k != PB_ENV}
    env["PYTHONPATH"] = REPO + os.pathsep + os.environ.get("PYTHONPATH", "")
    for k, v in extra.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return env


def _cli(args: list[str], timeout: float = 1800, cwd: str = REPO) -> str:
    proc = subprocess.run([sys.executable, "-m", "paddlerec_milvus.cli", *args], cwd=cwd, env=child_env(),
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"paddlerec-milvus {args[0]} failed: {proc.stderr[-2000:]}")
    return proc.stdout


# -- catalogues -------------------------------------------------------------------------------------
class Catalogue:
    """A trained model that can be exported to any Milvus: ``config`` + ``overrides``."""

    def __init__(self, name: str, config: str, overrides: list[str]):
        self.name, self.config, self.overrides = name, config, overrides

    def export(self, uri: str, collection: str, out: str) -> dict[str, str]:
        _cli(["export", "-m", self.config, "-o", *self.overrides, f"milvus.uri={uri}",
              "--collection", collection, "--output", out])
        with open(os.path.join(out, "manifest.json")) as f:
            m = json.load(f)
        return {"export_dir": out, "uri": m["milvus_uri"], "collection": m["collection"],
                "items": m["items_indexed"]}


def demo_catalogue(work: str) -> Catalogue:
    """The demo model trained briefly (``bench_serving.demo_export``: it also exports it to Lite)."""
    from . import bench_serving

    bench_serving.demo_export(work)
    return Catalogue("demo", os.path.join(work, "mind", "config.yaml"),
                     ["runner.epochs=2", "runner.batches_per_epoch=60"])


def book_catalogue() -> Catalogue:
    """amazon-book-1m prepared (cached under output/bench/data, shared with the quality section) and
    trained one epoch (cached under output/bench/load/amazon_book_1m)."""
    from .quality import CONFIG, _overrides, prepared

    data = prepared("amazon_book_1m")
    run_dir = os.path.join(BENCH_DIR, "load", "amazon_book_1m")
    over = _overrides(data, run_dir) + BOOK_BUDGET
    if not os.path.isfile(os.path.join(run_dir, "ckpt", "0", "rec.pdparams")):
        logger.info("training amazon-book-1m for the load benchmark (%s)...", " ".join(BOOK_BUDGET))
        shutil.rmtree(os.path.join(run_dir, "ckpt"), ignore_errors=True)
        proc = subprocess.run([sys.executable, "-u", os.path.join(MODELS, "trainer.py"), "-m", CONFIG,
                               "-o", *over], cwd=MODELS, env=child_env(), capture_output=True, text=True,
                              timeout=3600)
        if proc.returncode != 0:
            raise RuntimeError(f"training amazon-book-1m failed: {proc.stderr[-2000:]}")
    return Catalogue("book", CONFIG, over)


# -- targets ----------------------------------------------------------------------------------------
def limits_config(mode: str) -> tuple[dict[str, Any], str | None]:
    """The serving limits from ``PADDLEREC_MILVUS_*`` (as the REST API reads them) for the
    pipeline's ``recall:`` section, unbatched: ``batch_max_users`` 0. Second: a note when this
    build has no batching knob (both modes then run the same code)."""
    from paddlerec_milvus.serving_contract import ServingLimits

    limits = ServingLimits.from_env().as_dict()
    if "batch_max_users" not in limits:
        return limits, "this build's ServingLimits has no batch_max_users: batched and unbatched " \
                       "targets ran the same code"
    if mode == "unbatched":
        limits["batch_max_users"] = 0
    return limits, None


def _tail(path: str) -> str:
    with open(path, errors="replace") as f:
        return f.read()[-2000:]


def _wait_http(base: str, proc: subprocess.Popen, log_path: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    u = urlsplit(base)
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"REST API exited with {proc.returncode}: {_tail(log_path)}")
        try:
            conn = http.client.HTTPConnection(u.hostname, u.port, timeout=2)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"REST API did not become healthy: {_tail(log_path)}")


@contextmanager
def rest_target(exp: dict[str, str], mode: str, work: str) -> Iterator[str]:
    """``uvicorn serving.main:app`` on a free port; yields the recall URL."""
    from paddlerec_milvus.milvus_server import free_port

    port = free_port()
    batch = "0" if mode == "unbatched" else os.environ.get("PADDLEREC_MILVUS_BATCH_MAX_USERS")
    env = child_env(PADDLEREC_MILVUS_EXPORT_DIR=exp["export_dir"], PADDLEREC_MILVUS_URI=exp["uri"],
                    PADDLEREC_MILVUS_COLLECTION=exp["collection"], PADDLEREC_MILVUS_BATCH_MAX_USERS=batch)
    log_path = os.path.join(work, f"rest-{mode}.log")
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "serving.main:app", "--host", "127.0.0.1",
                                 "--port", str(port), "--log-level", "warning", "--no-access-log"],
                                cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=log)
    try:
        _wait_http(f"http://127.0.0.1:{port}", proc, log_path)
        yield f"http://127.0.0.1:{port}/rec/recall"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def rpc_target(exp: dict[str, str], mode: str, work: str) -> Iterator[str]:
    """``paddlerec-milvus serve`` (thread mode, 64 gRPC threads, Op concurrency 64 + 64, no HTTP
    gateway); yields ``host:rpc_port``."""
    from paddlerec_milvus.milvus_server import free_port

    limits, _ = limits_config(mode)
    conf = {"host": "127.0.0.1", "rpc_port": free_port(), "http_port": None,
            "worker_num": PIPELINE_THREADS, "log_dir": os.path.join(work, f"serving-logs-{mode}"),
            "op": {"user_tower": {"concurrency": OP_CONCURRENCY},
                   "recall": {"concurrency": OP_CONCURRENCY}},
            "recall": {"export_dir": exp["export_dir"], "milvus_uri": exp["uri"],
                       "collection": exp["collection"], **limits}}
    path = os.path.join(work, f"serving-{mode}.yml")
    with open(path, "w") as f:
        json.dump(conf, f)
    log_path = os.path.join(work, f"serving-{mode}.log")
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "paddlerec_milvus.cli", "serve", "-c", path],
                                cwd=work, env=child_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline, text = time.monotonic() + 180, ""
        while time.monotonic() < deadline:
            with open(log_path) as f:
                text = f.read()
            if "recall pipeline ready" in text:
                break
            if proc.poll() is not None:
                raise RuntimeError(f"pipeline exited with {proc.returncode}: {text[-2000:]}")
            time.sleep(0.2)
        else:
            raise RuntimeError(f"pipeline did not start: {text[-2000:]}")
        yield f"127.0.0.1:{conf['rpc_port']}"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- probes (one request, from this process) ---------------------------------------------------------
def rest_call(url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    conn.request("POST", u.path, json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    return resp.status, json.loads(resp.read() or b"{}")


def rpc_call(target: str, body: dict[str, Any]) -> dict[str, Any]:
    import grpc

    with grpc.insecure_channel(target) as ch:
        call = ch.unary_unary(load_gen.PIPELINE_METHOD, request_serializer=None, response_deserializer=None)
        raw = call(load_gen.encode_pipeline_request(load_gen.pipeline_fields(body)), timeout=60)
    out = load_gen.decode_pipeline_response(raw)
    out["fields"] = dict(zip(out["key"], out["value"]))
    return out


def check_answer(target: str, endpoint: str, body: dict[str, Any]) -> None:
    """One request must answer top_k items (the load's statuses do not look at the items)."""
    if target == "rest":
        status, ans = rest_call(endpoint, body)
        items = ans.get("items", [[]])[0] if status == 200 else None
    else:
        ans = rpc_call(endpoint, body)
        items = json.loads(ans["fields"].get("items", "[[]]"))[0] if ans["err_no"] == 0 else None
    if items is None or len(items) != TOP_K:
        raise RuntimeError(f"{target} at {endpoint} did not answer {TOP_K} items: {str(ans)[:500]}")


def deadline_supported(target: str, endpoint: str, body: dict[str, Any], deadline_ms: int) -> bool:
    """Does the target accept a request deadline (``timeout_ms``)? Older builds reject the field."""
    probe = dict(body, timeout_ms=deadline_ms)
    time.sleep(1.0)  # the last closed-loop level's requests still in flight must not answer the probe
    # only a refusal of the field says no: a 429/503 (err_no 54) is a server still busy
    if target == "rest":
        status, ans = rest_call(endpoint, probe)
        return not (status == 422 and "timeout_ms" in str(ans))
    return rpc_call(endpoint, probe)["err_no"] != 51


# -- loads -----------------------------------------------------------------------------------------
def rest_generator() -> str:
    """wrk (C: a few percent of a core) where installed, else hey (Go: a third of this 2-core
    machine at 1,000 req/s, taken from the server it measures), else our own."""
    return next((g for g in ("wrk", "hey") if shutil.which(g)), "load_gen http-closed")


def closed(target: str, endpoint: str, bodies: list[dict[str, Any]], conc: int, n: int,
           seconds: float) -> dict[str, Any]:
    """A closed-loop level's summary: ``n`` requests (wrk: ``seconds`` of them)."""
    if target == "rest":
        gen = rest_generator()
        if gen == "wrk":
            return load_gen.run_wrk(endpoint, bodies, conc, seconds, timeout=30)
        if gen == "hey":
            return load_gen.summarize(load_gen.run_hey(endpoint, bodies[0], conc, n))
        return load_gen.summarize(load_gen.run_load(
            "http-closed", url=endpoint, bodies=bodies, concurrency=conc, requests=n,
            processes=1 if conc == 1 else GEN_PROCESSES, timeout=30))
    return load_gen.summarize(load_gen.run_load(
        "grpc-closed", target=endpoint, bodies=bodies, concurrency=conc, requests=n,
        processes=1 if conc == 1 else GEN_PROCESSES, timeout=30))


def open_loop(target: str, endpoint: str, bodies: list[dict[str, Any]],
              phases: Sequence[tuple[float, float]]) -> dict[str, Any]:
    time.sleep(1.0)  # what the server still does for the last run's timed-out requests settles
    if target == "rest":
        return load_gen.run_load("http-open", url=endpoint, bodies=bodies, phases=phases,
                                 processes=GEN_PROCESSES, timeout=10)
    return load_gen.run_load("grpc-open", target=endpoint, bodies=bodies, phases=phases,
                             processes=GEN_PROCESSES, timeout=10)


def inprocess(exp: dict[str, str], n: int) -> dict[str, Any]:
    """``RecallService.recall`` from threads in one process (bench_serving's worker), unbatched."""
    cmd = [sys.executable, os.path.join(REPO, "benchmarks", "bench_serving.py"), "--inprocess-worker",
           "--export-dir", exp["export_dir"], "--milvus-uri", exp["uri"], "--collection", exp["collection"],
           "--total", str(n), "--levels", *map(str, CONCURRENCY)]
    env = child_env(PADDLEREC_MILVUS_BATCH_MAX_USERS="0", **{PB_ENV: "upb"})
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"in-process run failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def paired_lone_requests(target: str, exp: dict[str, str], bodies: list[dict[str, Any]], work: str,
                         rounds: int, seconds: float) -> dict[str, list[dict[str, Any]]]:
    """Concurrency 1 on both modes at once, in alternating short turns (ABBA), so that the c=1
    p50 ratio compares the two under the same machine load: levels measured minutes apart on this
    shared machine differed by up to 2x at c=1. Milvus Lite opens a file in one process: the
    unbatched target gets its own copy of the file."""
    start = rest_target if target == "rest" else rpc_target
    own = dict(exp)
    if is_local_uri(exp["uri"]):
        own["uri"] = os.path.join(work, "paired-unbatched.db")
        shutil.copy(exp["uri"], own["uri"])
    turns: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
    with start(own, "unbatched", work) as ub, start(exp, "batched", work) as bt:
        endpoints = {"unbatched": ub, "batched": bt}
        for endpoint in endpoints.values():
            closed(target, endpoint, bodies, 1, 100, 1.0)  # warm-up, not recorded
        for r in range(rounds):
            order = MODES if r % 2 == 0 else MODES[::-1]
            for mode in order:
                turns[mode].append(closed(target, endpoints[mode], bodies, 1, 200, seconds))
    return turns


def recovery_seconds(rec: dict[str, Any], drop_at: float, end: float, ok_p99_ms: float) -> float | None:
    """Seconds after the load dropped until the first 1-s slice of requests (by scheduled time)
    that all got 200 within ``max(2 x ok_p99_ms, ok_p99_ms + 10)`` ms; None if none did."""
    limit = max(2 * ok_p99_ms, ok_p99_ms + 10) if math.isfinite(ok_p99_ms) else math.inf
    t = drop_at
    while t < end - 1e-9:
        s = load_gen.summarize(rec, t, t + 1.0, seconds=1.0)
        if s["requests"] and s["ok"]["n"] == s["requests"] and s["ok"]["p99_ms"] <= limit:
            return round(t - drop_at, 3)
        t += 1.0
    return None


# -- one catalogue x backend --------------------------------------------------------------------
def _row(cat: str, backend: str, target: str, mode: str, load: str, s: dict[str, Any],
         offered: float | None = None, base_rps: float | None = None) -> dict[str, Any]:
    return {"catalogue": cat, "backend": backend, "target": target, "mode": mode, "load": load,
            "offered/s": offered, "ok/s": s["ok_rps"], "p50 ms": s["ok"]["p50_ms"],
            "p99 ms": s["ok"]["p99_ms"], "max ms": s["ok"]["max_ms"],
            "non-200": s["requests"] - s["ok"]["n"], "rejected": s["rejected"]["n"],
            "rejected p99 ms": s["rejected"]["p99_ms"] if s["rejected"]["n"] else None,
            "rejected p99 ms from send": s["rejected_from_send"]["p99_ms"]
            if s.get("rejected_from_send", {}).get("n") else None,
            "expired": s["expired"]["n"],
            "expired p99 ms": s["expired"]["p99_ms"] if s["expired"]["n"] else None,
            "vs in-process": s["ok_rps"] / base_rps if base_rps else None, "requests": s["requests"]}


def measure(cat: str, backend: str, exp: dict[str, str], quick: bool, deadline_ms: int | None,
            work: str) -> dict[str, Any]:
    """Every target, mode and load on one export; returns rows, figures, timelines, notes."""
    from . import bench_serving

    b = budget(quick)
    sfx = "" if (cat, backend) == ("demo", "lite") else f"_{cat}_{backend}"
    hists = bench_serving.histories_for(exp["export_dir"])
    bodies = [{"hist_item": [h], "top_k": TOP_K} for h in hists]
    rows, figures, notes, timelines = [], {}, [], {}
    logger.info("[%s/%s] in-process reference...", cat, backend)
    ref = inprocess(exp, b["inprocess"])
    for c in CONCURRENCY:
        m = ref["levels"][str(c)]
        rows.append({"catalogue": cat, "backend": backend, "target": "in-process", "mode": "unbatched",
                     "load": f"closed c={c}", "offered/s": None, "ok/s": m["throughput_rps"],
                     "p50 ms": m["p50_ms"], "p99 ms": m["p99_ms"], "max ms": None, "non-200": 0,
                     "rejected": 0, "rejected p99 ms": None,
                     "rejected p99 ms from send": None, "expired": 0, "expired p99 ms": None,
                     "vs in-process": 1.0, "requests": m["requests"]})
        figures[f"serving_inprocess_c{c}_rps{sfx}"] = m["throughput_rps"]
        figures[f"serving_inprocess_c{c}_p50_ms{sfx}"] = m["p50_ms"]
    base = {c: ref["levels"][str(c)]["throughput_rps"] for c in CONCURRENCY}
    for target in TARGETS:
        start = rest_target if target == "rest" else rpc_target
        for mode in MODES:
            sub = os.path.join(work, f"{cat}-{backend}-{target}")
            os.makedirs(sub, exist_ok=True)
            logger.info("[%s/%s] %s %s: starting...", cat, backend, target, mode)
            with start(exp, mode, sub) as endpoint:
                check_answer(target, endpoint, bodies[0])
                warm = closed(target, endpoint, bodies, 4, b["warmup"], 2.0)  # not recorded
                levels, last_rps = {}, warm["ok_rps"] / 2
                for c in CONCURRENCY:
                    n = level_requests(b, last_rps, c)
                    s = closed(target, endpoint, bodies, c, n, b["level_s"])
                    last_rps = s["ok_rps"]
                    levels[c] = s
                    rows.append(_row(cat, backend, target, mode, f"closed c={c}", s, base_rps=base[c]))
                    key = f"serving_{target}_{mode}_c{c}"
                    figures[f"{key}_rps{sfx}"] = s["ok_rps"]
                    figures[f"{key}_p50_ms{sfx}"] = s["ok"]["p50_ms"]
                    figures[f"{key}_p99_ms{sfx}"] = s["ok"]["p99_ms"]
                    figures[f"{key}_non200{sfx}"] = s["requests"] - s["ok"]["n"]
                    logger.info("[%s/%s] %s %s c=%d: %.0f req/s, p50 %.1f ms, p99 %.1f ms, non-200 %d",
                                cat, backend, target, mode, c, s["ok_rps"], s["ok"]["p50_ms"],
                                s["ok"]["p99_ms"], s["requests"] - s["ok"]["n"])
                if mode != "batched":
                    continue
                cap = max(s["ok_rps"] for s in levels.values())
                figures[f"serving_{target}_batched_capacity_rps{sfx}"] = cap
                open_bodies = bodies
                if deadline_ms:
                    if deadline_supported(target, endpoint, bodies[0], deadline_ms):
                        open_bodies = [dict(x, timeout_ms=deadline_ms) for x in bodies]
                    else:
                        notes.append(f"{target} ({cat}, {backend}) does not accept timeout_ms yet: its "
                                     "open-loop requests carried no deadline")
                base_p99 = math.nan
                for frac in OPEN_FRACTIONS:
                    rate = frac * cap
                    rec = open_loop(target, endpoint, open_bodies, [(rate, b["open_s"])])
                    s = load_gen.summarize(rec, rate_window=(0.0, b["open_s"]))
                    pct = int(round(frac * 100))
                    rows.append(_row(cat, backend, target, mode, f"open {pct}%", s, offered=rate))
                    key = f"serving_{target}_open{pct}"
                    figures[f"{key}_ok_rps{sfx}"] = s["ok_rps"]
                    figures[f"{key}_ok_p50_ms{sfx}"] = s["ok"]["p50_ms"]
                    figures[f"{key}_ok_p99_ms{sfx}"] = s["ok"]["p99_ms"]
                    figures[f"{key}_rejected{sfx}"] = s["rejected"]["n"]
                    figures[f"{key}_rejected_p99_ms{sfx}"] = s["rejected"]["p99_ms"] if s["rejected"]["n"] \
                        else None
                    figures[f"{key}_rejected_from_send_p99_ms{sfx}"] = s["rejected_from_send"]["p99_ms"] \
                        if s["rejected_from_send"]["n"] else None
                    figures[f"{key}_expired{sfx}"] = s["expired"]["n"]
                    figures[f"{key}_errors{sfx}"] = s["errors"]
                    figures[f"{key}_send_lag_p99_ms{sfx}"] = rec.get("send_lag_p99_ms")
                    figures[f"{key}_connections{sfx}"] = rec["connections"]
                    figures[f"{key}_max_in_flight{sfx}"] = rec["max_in_flight"]
                    if frac == 0.5:
                        base_p99 = s["ok"]["p99_ms"]
                    logger.info("[%s/%s] %s open %d%% (%.0f/s): ok %.0f/s p99 %.1f ms, rejected %d "
                                "(p99 %.1f ms), expired %d, other %d", cat, backend, target, pct, rate,
                                s["ok_rps"], s["ok"]["p99_ms"], s["rejected"]["n"], s["rejected"]["p99_ms"],
                                s["expired"]["n"], s["errors"])
                hi, lo = b["recovery_s"]
                rec = open_loop(target, endpoint, open_bodies, [(2 * cap, hi), (0.5 * cap, lo)])
                for label, t0, t1, rate in (("recovery 200%", 0.0, hi, 2 * cap),
                                            ("recovery then 50%", hi, hi + lo, 0.5 * cap)):
                    s = load_gen.summarize(rec, t0, t1, rate_window=(t0, t1))
                    rows.append(_row(cat, backend, target, mode, label, s, offered=rate))
                figures[f"serving_{target}_recovery_s{sfx}"] = recovery_seconds(rec, hi, hi + lo, base_p99)
                figures[f"serving_{target}_recovery_send_lag_p99_ms{sfx}"] = rec.get("send_lag_p99_ms")
                timelines[target] = {"phases": rec["phases"], "rows": load_gen.timeline(rec)}
    for target in TARGETS:
        ub = figures.get(f"serving_{target}_unbatched_c16_rps{sfx}")
        bt = figures.get(f"serving_{target}_batched_c16_rps{sfx}")
        figures[f"serving_{target}_c16_speedup{sfx}"] = bt / ub if ub and bt else None
        logger.info("[%s/%s] %s: lone requests, both modes side by side...", cat, backend, target)
        sub = os.path.join(work, f"{cat}-{backend}-{target}-paired")
        os.makedirs(sub, exist_ok=True)
        turns = paired_lone_requests(target, exp, bodies, sub, b["paired_rounds"], b["paired_s"])
        for mode, ts in turns.items():
            n = sum(t["ok"]["n"] for t in ts)
            rows.append({"catalogue": cat, "backend": backend, "target": target, "mode": mode,
                         "load": f"paired c=1 ({len(ts)} turns)", "offered/s": None,
                         "ok/s": statistics.median(t["ok_rps"] for t in ts),
                         "p50 ms": statistics.median(t["ok"]["p50_ms"] for t in ts),
                         "p99 ms": statistics.median(t["ok"]["p99_ms"] for t in ts), "max ms": None,
                         "non-200": sum(t["requests"] for t in ts) - n, "rejected": 0,
                         "rejected p99 ms": None, "rejected p99 ms from send": None,
                         "expired": 0, "expired p99 ms": None,
                         "vs in-process": None, "requests": n})
        # each round's two turns ran back to back: the median of the per-round ratios
        ratios = [bt["ok"]["p50_ms"] / ub["ok"]["p50_ms"]
                  for ub, bt in zip(turns["unbatched"], turns["batched"]) if ub["ok"]["p50_ms"]]
        figures[f"serving_{target}_c1_p50_ratio{sfx}"] = statistics.median(ratios) if ratios else None
        figures[f"serving_{target}_c1_p50_ratio_rounds{sfx}"] = [round(x, 3) for x in ratios]
        ub = figures.get(f"serving_{target}_unbatched_c1_p50_ms{sfx}")
        bt = figures.get(f"serving_{target}_batched_c1_p50_ms{sfx}")
        figures[f"serving_{target}_c1_p50_ratio_sequential{sfx}"] = bt / ub if ub and bt else None
    return {"rows": rows, "figures": figures, "notes": notes, "timelines": timelines,
            "items": exp["items"], "index": ref.get("index_type", "?")}


def recovery_plot(timelines: dict[str, Any], title: str, path: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, len(timelines), figsize=(6 * len(timelines), 3.6), squeeze=False)
    for ax, (target, tl) in zip(axes[0], timelines.items()):
        rows = tl["rows"]
        x = [r["second"] for r in rows]
        ax.step(x, [r["offered/s"] for r in rows], where="post", label="offered/s", color="gray", ls="--")
        ax.step(x, [r["ok/s"] for r in rows], where="post", label="200/s", color="tab:green")
        ax.step(x, [r["rejected/s"] for r in rows], where="post", label="rejected/s", color="tab:red")
        ax.set_xlabel("second of the run (completion time)")
        ax.set_ylabel("requests / s")
        ax2 = ax.twinx()
        ax2.plot([v + 0.5 for v in x], [r["ok p99 ms"] for r in rows], "o-", ms=3, color="tab:blue",
                 label="200 p99 ms")
        ax2.set_ylabel("p99 latency of 200s, ms")
        ax.set_title(f"{target.upper()}: 2x capacity, then 0.5x", fontsize=9)
        lines = ax.get_legend_handles_labels()
        lines2 = ax2.get_legend_handles_labels()
        ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=7, loc="upper right")
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# -- the section --------------------------------------------------------------------------------
def _clean(v: Any) -> Any:
    """NaN (no sample) -> None, recursively: the report prints "-", JSON stays strict."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_clean(x) for x in v]
    return v


def run(quick: bool = False, catalogues: Sequence[str] | None = None,
        backends: Sequence[str] | None = None, deadline_ms: int | None = 200,
        out_img_dir: str | None = None, work: str | None = None) -> dict[str, Any]:
    """Measure every catalogue x backend; returns the report's shape (intro, rows, figures, notes,
    plots, tables)."""
    from importlib.metadata import version

    from paddlerec_milvus.milvus_server import MilvusServer

    catalogues = tuple(catalogues or (("demo",) if quick else CATALOGUES))
    backends = tuple(backends or (("lite",) if quick else BACKENDS))
    for name in catalogues:
        if name not in CATALOGUES:
            raise ValueError(f"unknown catalogue {name!r}; expected {CATALOGUES}")
    for name in backends:
        if name not in BACKENDS:
            raise ValueError(f"unknown backend {name!r}; expected {BACKENDS}")
    own_work = work is None  # ours: removed after a run that worked (kept, with its logs, if not)
    work = work or tempfile.mkdtemp(prefix="bench_load_")
    t_start = time.monotonic()
    b = budget(quick)
    _, batch_note = limits_config("batched")
    rows, figures, notes, plots, tables, timelines, combos = [], {}, [], [], [], {}, []
    if batch_note:
        notes.append(batch_note)
    if rest_generator() != "wrk":
        notes.append(f"wrk is not installed (apt-get install wrk): the REST closed loop ran "
                     f"{rest_generator()} instead")
    models = {}
    for name in catalogues:
        models[name] = demo_catalogue(os.path.join(work, "demo")) if name == "demo" else book_catalogue()
    for backend in backends:
        server = None
        try:
            if backend == "server":
                server = MilvusServer(os.path.join(work, "milvus-server")).start()
            for name in catalogues:
                uri = server.uri if server else os.path.join(work, f"{name}.db")
                logger.info("[%s/%s] exporting...", name, backend)
                exp = models[name].export(uri, f"load_{name}", os.path.join(work, f"export-{name}-{backend}"))
                res = measure(name, backend, exp, quick, deadline_ms, os.path.join(work, f"{name}-{backend}"))
                rows += res["rows"]
                figures.update(res["figures"])
                notes += res["notes"]
                timelines[f"{name}_{backend}"] = res["timelines"]
                engine = f"Milvus Lite {version('milvus-lite')}" if backend == "lite" else \
                    f"Milvus server {version('milvus')}"
                combos.append(f"{name}: {res['items']:,} items, {engine}, {res['index']} index")
                if res["timelines"]:
                    title = f"recovery, {name} catalogue, {engine}"
                    tables.append({"title": f"Recovery timeline ({name} catalogue, {engine}; per second of "
                                            "completion; p50/p99 of the 200s completed in that second):",
                                   "rows": [dict(target=t, **r) for t, tl in res["timelines"].items()
                                            for r in tl["rows"]]})
                    if out_img_dir:
                        png = os.path.join(out_img_dir, f"serving_load_recovery_{name}_{backend}.png")
                        p = recovery_plot(res["timelines"], title, png)
                        if p:
                            plots.append(p)
        finally:
            if server is not None:
                server.stop()
    gen = rest_generator()
    how = {"wrk": "2 threads, bodies rotating over the same 64 histories; latency columns of every "
                  "reply, wrk keeps no per-request records",
           "hey": "one fixed request body: hey sends the same body every time"}.get(gen, "")
    lags = [v for k, v in figures.items() if "send_lag" in k and v is not None]
    intro = [
        "Load from generators in their own processes (client and servers share the machine's cores). "
        f"Single-user requests, top_k {TOP_K}, histories of 5..20 known items (seeded). "
        f"Closed loop: about {b['level_s']:g} s per level ({b['closed_min']}..{b['closed_max']} requests: "
        f"the last level's req/s x {b['level_s']:g} s; `requests` column) after {b['warmup']} warm-up "
        f"requests at c=4 (in-process: {b['inprocess']} per level); "
        f"REST with `{gen}` ({how}), gRPC with "
        f"`benchmarks.load_gen grpc-closed` ({GEN_PROCESSES} processes for c > 1, raw pre-serialized "
        "pipeline requests rotating over 64 histories). Latency columns are of the 200 replies; "
        "`vs in-process` = req/s / in-process req/s at the same concurrency. "
        f"Paired c=1: both modes running at once (Milvus Lite: the unbatched one on a copy of the file), "
        f"{b['paired_rounds']} rounds of one {b['paired_s']:g}-s turn each in alternating order; the row "
        "gives the medians over the turns, and `serving_*_c1_p50_ratio` is the median of the rounds' "
        "batched/unbatched p50 ratios (`..._sequential`: the closed-loop levels' ratio, measured minutes "
        "apart).",
        "Targets: REST = `uvicorn serving.main:app` (one worker); RPC = `paddlerec-milvus serve` in thread "
        f"mode with worker_num {PIPELINE_THREADS} and Op concurrency {OP_CONCURRENCY} + "
        f"{OP_CONCURRENCY} in both modes (each Op thread takes every queued request at once: batch_size "
        "batch_max_users batched, 1 unbatched). "
        "Unbatched: `PADDLEREC_MILVUS_BATCH_MAX_USERS=0` / `recall.batch_max_users: 0`; batched: the "
        "defaults. In-process = `RecallService.recall` from threads in one process (protobuf upb), "
        "unbatched.",
        f"Open loop (batched targets): `benchmarks.load_gen http-open` / `grpc-open`, {GEN_PROCESSES} "
        "processes sharing one even schedule, keep-alive connections opened as needed; latency from the "
        f"scheduled send time (no coordinated omission); {b['open_s']:g} s per rate at "
        + "/".join(f"{int(f * 100)}%" for f in OPEN_FRACTIONS)
        + " of the batched closed-loop capacity (the best req/s over the concurrency levels); requests "
        + (f"carry `timeout_ms: {deadline_ms}` where the target accepts it. " if deadline_ms else
           "carry no deadline. ")
        + "`ok/s` = 200 replies completed within the phase / its length; rejected = 429/503 (REST) or "
        "err_no 54 (RPC); expired (RPC) = the request's `timeout_ms`, sent as the call's gRPC "
        "deadline, ran out (the server drops such a call unrun; the client has its answer at the "
        f"deadline). Recovery: {b['recovery_s'][0]:g} s at 200% then {b['recovery_s'][1]:g} s "
        "at 50%; `serving_*_recovery_s` = seconds after the drop until a 1-s slice of requests all "
        "got 200 within 2x the 50%-load p99. Phase rows: latency and statuses of the requests "
        "scheduled in the phase, ok/s of the 200s completed during it (a backlog drains later); "
        "`rejected p99 ms from send` leaves the generator's own lateness out. "
        + (f"The generators were at most {max(lags):.1f} ms late (p99, scheduled time to the request "
           "handed to its connection)." if lags else ""),
        "Measured: " + "; ".join(combos) + ".",
    ]
    intro = [x for p in intro for x in (p, "")][:-1]  # paragraphs
    if own_work:
        shutil.rmtree(work, ignore_errors=True)
    return _clean({"intro": intro, "rows": rows, "figures": figures, "notes": notes, "plots": plots,
                   "tables": tables, "timelines": timelines, "machine": machine(), "quick": quick,
                   "wall_s": time.monotonic() - t_start})


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="demo catalogue, Milvus Lite, fewer requests")
    p.add_argument("--catalogues", default="", help=f"comma-separated, of {CATALOGUES}")
    p.add_argument("--backends", default="", help=f"comma-separated, of {BACKENDS}")
    p.add_argument("--deadline-ms", type=int, default=200, help="open-loop timeout_ms (0: none)")
    p.add_argument("--out", default=os.path.join(BENCH_DIR, "serving_load.json"))
    p.add_argument("--img", default="", help="folder for the recovery plots (default: none)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    split = lambda s: tuple(x.strip() for x in s.split(",") if x.strip()) or None  # noqa: E731
    res = run(args.quick, split(args.catalogues), split(args.backends), args.deadline_ms or None,
              args.img or None)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2, default=str)
    from .report import table

    print("\n".join(res["intro"] + [""] + table(res["rows"])))
    for k, v in sorted(res["figures"].items()):
        print(f"{k}: {v}")
    print(f"wrote {args.out} ({res['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
