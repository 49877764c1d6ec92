"""Milvus client concurrency: one shared ``ItemIndex`` (one ``MilvusClient``) against a small pool.

pymilvus sends every call of a ``MilvusClient`` over one gRPC channel, and reports say QPS stops
growing past ~3 threads. This measures ``ItemIndex.search_vectors(queries, 50)`` throughput and
p50/p99 with T = 1, 2, 4, 8, 16 threads for

* ``1 client``: one ``ItemIndex`` shared by every thread (what the service does today);
* ``pool P shared``: P ``ItemIndex`` objects (each its own pymilvus alias, handler and
  ``grpc.Channel``; calls pick one round-robin). gRPC core keeps a process-wide subchannel pool:
  channels to the same address with the same channel arguments share one TCP connection, so
  these P channels still multiplex over *one* HTTP/2 connection (counted in /proc);
* ``pool P own``: the same, with each client's channel rebuilt with
  ``grpc.use_local_subchannel_pool`` so that it opens its own TCP connection (P connections);

for nq = 4 (one user x K = 4 interests: the unbatched serving path) and nq = 64 (16 users x 4:
a micro-batch), on collections of 1,940 and 38,500 random 64-dim float32 vectors (IP, FLAT),
on a real Milvus 2.3 standalone server (``paddlerec_milvus.milvus_server``, loopback) and on
Milvus Lite (embedded, one process per .db file). Every variant of one row is measured in the
same run, interleaved, in ``rounds`` rounds whose order alternates; the throughput is the median
over rounds and the latencies are pooled, so the ratios stand side by side on a noisy machine.
A confirmation pass then measures 1 client against the ``own`` pools again, longer, at T = 4 and
16 on the server. Writes ``docs/milvus_client_pool.{json,md}``.

    python -m benchmarks.milvus_clients [--quick] [--out docs] [--engines server,lite]
        [--sizes 1940,38500] [--no-confirm]       # --quick: about 4 minutes on 2 cores
    python -m benchmarks.milvus_clients --render docs/milvus_client_pool.json   # .md again only
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import os
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from benchmarks.common import machine, percentiles
from paddlerec_milvus.milvus_index import ItemIndex, lite_pid
from paddlerec_milvus.milvus_server import MilvusServer

logger = logging.getLogger("benchmarks.milvus_clients")

DIM = 64
TOP_K = 50
SIZES = (1940, 38500)
THREADS = (1, 2, 4, 8, 16)
NQS = (4, 64)
POOLS = (2, 4)
CONFIRM_THREADS = (4, 16)  # the confirmation pass: more rounds, server only
GAIN = 0.15  # a pool is worth adding at >= 15% more throughput at T >= 4 on the server


# -- data -----------------------------------------------------------------------------------------
def random_vectors(n: int, seed: int) -> np.ndarray:
    """Unit-norm random float32 vectors (IP on them is cosine)."""
    v = np.random.default_rng(seed).standard_normal((n, DIM), dtype=np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


# -- connections ----------------------------------------------------------------------------------
def _socket_inodes() -> set[int]:
    """Inodes of this process's open sockets (from /proc/self/fd)."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/self/fd/{fd}")
            if link.startswith("socket:["):
                inodes.add(int(link[8:-1]))
    return inodes


def tcp_connections(port: int) -> int:
    """Established TCP connections from this process to ``port`` (from /proc)."""
    inodes = _socket_inodes()
    n = 0
    for proto in ("tcp", "tcp6"):
        with contextlib.suppress(OSError), open(f"/proc/net/{proto}") as f:
            next(f)
            for line in f:
                cols = line.split()
                if int(cols[9]) in inodes and cols[3] == "01" and int(cols[2].rsplit(":", 1)[1], 16) == port:
                    n += 1
    return n


def unix_connections() -> int:
    """Connected unix stream sockets of this process without a path: the client ends of its
    connections (to Milvus Lite's socket; nothing else here uses unix sockets)."""
    inodes = _socket_inodes()
    ours = 0
    with contextlib.suppress(OSError), open("/proc/net/unix") as f:
        next(f)
        for line in f:
            cols = line.split()  # Num RefCount Protocol Flags Type St Inode [Path]
            if int(cols[6]) in inodes and cols[5] == "03" and len(cols) == 7:
                ours += 1
    return ours


def tree_cpu_seconds(pid: int | None) -> float:
    """CPU seconds (user + system) used so far by ``pid`` and every process below it."""
    if pid is None:
        return 0.0
    from benchmarks.common import descendants

    total = 0
    for p in (pid, *descendants(pid)):
        with contextlib.suppress(OSError, IndexError, ValueError), open(f"/proc/{p}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


def own_connection(index: ItemIndex) -> None:
    """Rebuild the index's gRPC channel with a local subchannel pool: it gets a TCP (or unix
    socket) connection of its own instead of sharing gRPC's process-wide one for that address."""
    import grpc
    from pymilvus.grpc_gen import milvus_pb2_grpc

    handler = index._client._get_connection()
    old = handler._channel
    opts = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1),
            ("grpc.enable_retries", 1), ("grpc.keepalive_time_ms", 55000),
            ("grpc.use_local_subchannel_pool", 1)]
    handler._channel = grpc.insecure_channel(handler._address, options=opts)
    handler._setup_grpc_channel()  # the channel is set: this only rebuilds interceptors and stub
    ident = getattr(handler, "_identifier_interceptor", None)
    if ident is not None:
        handler._final_channel = grpc.intercept_channel(handler._final_channel, ident)
        handler._stub = milvus_pb2_grpc.MilvusServiceStub(handler._final_channel)
    old.close()


def channel_report(indexes: Sequence[ItemIndex]) -> dict[str, int]:
    """How many distinct pymilvus aliases / handlers / grpc.Channel objects the indexes use."""
    handlers = [ix._client._get_connection() for ix in indexes]
    return {"clients": len(indexes), "aliases": len({ix._client._using for ix in indexes}),
            "handlers": len({id(h) for h in handlers}), "channels": len({id(h._channel) for h in handlers})}


# -- measuring ------------------------------------------------------------------------------------
def measure(indexes: Sequence[ItemIndex], threads: int, queries: Sequence[np.ndarray],
            seconds: float, server_cpu: Callable[[], float]) -> tuple[float, list[float], float, float]:
    """``threads`` threads call ``search_vectors`` for ``seconds``, each call on the next index
    round-robin. Returns (requests per second, latencies in ms, CPU cores used by this process,
    by the Milvus processes)."""
    turn = itertools.count()
    start = threading.Barrier(threads + 1)
    lat: list[list[float]] = [[] for _ in range(threads)]
    errors: list[BaseException] = []
    stop_at = [0.0]

    def worker(t: int) -> None:
        mine, k = lat[t], t
        start.wait()
        try:
            while True:  # at least one call per thread, however short the cell
                t0 = time.perf_counter()
                if t0 >= stop_at[0] and mine:
                    return
                indexes[next(turn) % len(indexes)].search_vectors(queries[k % len(queries)], TOP_K)
                mine.append((time.perf_counter() - t0) * 1000.0)
                k += threads
        except BaseException as exc:  # reported by the caller
            errors.append(exc)

    pool = [threading.Thread(target=worker, args=(t,), daemon=True) for t in range(threads)]
    for th in pool:
        th.start()
    cpu0, srv0 = time.process_time(), server_cpu()
    t0 = time.perf_counter()
    stop_at[0] = t0 + seconds
    start.wait()
    for th in pool:
        th.join()
    wall = time.perf_counter() - t0
    cpu, srv = time.process_time() - cpu0, server_cpu() - srv0
    if errors:
        raise errors[0]
    flat = [x for xs in lat for x in xs]
    return len(flat) / wall, flat, cpu / wall, srv / wall


def compare(variants: dict[str, Sequence[ItemIndex]], threads: int, queries: Sequence[np.ndarray],
            seconds: float, rounds: int, server_cpu: Callable[[], float]) -> dict[str, dict[str, float]]:
    """Every variant at one thread count, interleaved over ``rounds`` (order alternating)."""
    names = list(variants)
    rps: dict[str, list[float]] = {n: [] for n in names}
    lat: dict[str, list[float]] = {n: [] for n in names}
    cores: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            for ix in variants[name]:  # warm every channel
                ix.search_vectors(queries[0], TOP_K)
            x, samples, client, server = measure(variants[name], threads, queries, seconds, server_cpu)
            rps[name].append(x)
            lat[name] += samples
            cores[name].append((client, server))
    out = {}
    for name in names:
        p50, p99 = percentiles(lat[name])
        out[name] = {"rps": statistics.median(rps[name]), "p50_ms": p50, "p99_ms": p99,
                     "requests": len(lat[name]), "rps_rounds": rps[name],
                     "client_cores": statistics.mean(c for c, _ in cores[name]),
                     "milvus_cores": statistics.mean(s for _, s in cores[name])}
    return out


@contextlib.contextmanager
def collection(uri: str, name: str, n: int, seed: int) -> Iterator[ItemIndex]:
    """A fresh FLAT/IP collection of ``n`` random vectors, upserted through ItemIndex, searchable
    (server: flushed and served from sealed segments)."""
    ix = ItemIndex(uri, name, DIM, index_type="FLAT", timeout=60.0)
    try:
        vecs = random_vectors(n, seed)
        ix.refill(np.arange(n), vecs, progress=False, build_timeout=90.0)  # server: sealed, loaded
        deadline = time.monotonic() + 60
        while ix.count() < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name}: {ix.count()}/{n} rows visible after 60 s")
            time.sleep(0.2)
        ids, _ = ix.search_vectors(vecs[:4], TOP_K)
        if not np.array_equal(ids[:, 0], np.arange(4)):  # each vector is its own best match
            raise AssertionError(f"{name}: search does not find the upserted vectors")
        yield ix
    finally:
        with contextlib.suppress(Exception):
            ix.drop()
        ix.close()


def bench_engine(engine: str, uri: str, count: Callable[[], int], seconds: float, rounds: int,
                 notes: list[str], sizes: Sequence[int], milvus_pid: Callable[[], int | None],
                 confirm: tuple[float, int] | None = None,
                 ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """The grid (every variant, nq and T) per collection size; then, with ``confirm`` = (seconds,
    rounds), the confirmation cells: 1 client against the `own` pools at CONFIRM_THREADS."""
    rows: list[dict[str, Any]] = []
    confirm_rows: list[dict[str, Any]] = []
    info: dict[str, Any] = {}

    def cpu() -> float:
        return tree_cpu_seconds(milvus_pid())

    for size in sizes:
        name = f"bench_clients_{size}"
        with collection(uri, name, size, seed=size) as main:
            opened: list[ItemIndex] = []
            try:
                variants: dict[str, list[ItemIndex]] = {"1 client": [main]}
                before = count()
                for p in POOLS:
                    shared = [main] + [ItemIndex(uri, name, DIM, create=False) for _ in range(p - 1)]
                    opened += shared[1:]
                    variants[f"pool {p} shared"] = shared
                    own = [ItemIndex(uri, name, DIM, create=False) for _ in range(p)]
                    opened += own
                    for ix in own:
                        own_connection(ix)
                    variants[f"pool {p} own"] = own
                for ix in opened:  # the connections are made lazily: one search each
                    ix.search_vectors(random_vectors(1, 0), 1)
                info[str(size)] = {
                    "connections_1_client": before,
                    "connections_all_variants": count(),
                    # the 1 client's + one per `own` client, if each `shared` pool shares it
                    "expected_if_shared": before + sum(POOLS),
                    "expected_if_not_shared": before + sum(p - 1 for p in POOLS) + sum(POOLS),
                    **{v: channel_report(ixs) for v, ixs in variants.items()},
                }
                # check once: a pool returns what one client returns
                q = random_vectors(64, 7)
                ref = main.search_vectors(q, TOP_K)
                for v, ixs in variants.items():
                    for ix in ixs:
                        got = ix.search_vectors(q, TOP_K)
                        if not (np.array_equal(got[0], ref[0]) and np.allclose(got[1], ref[1])):
                            notes.append(f"{engine} {size}: {v} returned other results than 1 client")
                queries = {nq: [random_vectors(nq, 1000 + i) for i in range(32)] for nq in NQS}
                for nq in NQS:
                    for t in THREADS:
                        res = compare(variants, t, queries[nq], seconds, rounds, cpu)
                        rows.append(_row(engine, size, nq, t, res))
                if confirm:
                    few = {v: ixs for v, ixs in variants.items() if v == "1 client" or v.endswith(" own")}
                    for nq in NQS:
                        for t in CONFIRM_THREADS:
                            res = compare(few, t, queries[nq], confirm[0], confirm[1], cpu)
                            confirm_rows.append(_row(engine, size, nq, t, res, "confirm"))
            finally:
                for ix in opened:
                    ix.close()
    return rows, confirm_rows, info


def _row(engine: str, size: int, nq: int, t: int, res: dict[str, dict[str, float]],
         phase: str = "grid") -> dict[str, Any]:
    one = res["1 client"]
    base = one["rps"]
    row: dict[str, Any] = {"engine": engine, "items": size, "nq": nq, "threads": t,
                           "1 client req/s": round(base, 1), "1 client p50/p99 ms": _lat(one),
                           "cores client/milvus": f"{one['client_cores']:.2f}/{one['milvus_cores']:.2f}"}
    for v in res:
        if v != "1 client":
            row[f"{v} x"] = round(res[v]["rps"] / base, 2)
            row[f"{v} p50/p99 ms"] = _lat(res[v])
    row["raw"] = res
    logger.info("%s %s %d nq=%d T=%d: %s", phase, engine, size, nq, t,
                {k: v for k, v in row.items() if k.endswith(" x") or k.endswith("req/s")})
    return row


def _show(key: str, value: Any) -> Any:
    if key.endswith(" x"):
        return f"{value:.2f}"
    if key.endswith("req/s"):
        return f"{value:.0f}" if value >= 100 else f"{value:.1f}"
    return value


def _lat(r: dict[str, float]) -> str:
    return f"{r['p50_ms']:.1f}/{r['p99_ms']:.1f}"


def run(quick: bool = False, sizes: Sequence[int] = SIZES, engines: Sequence[str] = ("server", "lite"),
        seconds: float | None = None, rounds: int | None = None, confirm: bool = True) -> dict[str, Any]:
    """``quick``: grid cells of 0.25 s x 2 rounds, confirmation cells of 0.4 s x 4 rounds (about
    4 minutes in all on 2 cores); else 1 s x 3 and 1 s x 6."""
    seconds = seconds or (0.25 if quick else 1.0)
    rounds = rounds or (2 if quick else 3)
    confirm_cells = ((0.4, 4) if quick else (1.0, 6)) if confirm else None
    notes: list[str] = []
    rows: list[dict[str, Any]] = []
    confirm_rows: list[dict[str, Any]] = []
    channels: dict[str, Any] = {}
    load_start = os.getloadavg()[0]
    tmp = tempfile.mkdtemp(prefix="bench-clients-")
    try:
        if "server" in engines:
            srv = MilvusServer(os.path.join(tmp, "server"))
            t0 = time.perf_counter()
            srv.start()
            logger.info("Milvus server up in %.1f s at %s", time.perf_counter() - t0, srv.uri)
            try:
                r, c, channels["server"] = bench_engine(
                    "server", srv.uri, lambda: tcp_connections(srv.port), seconds, rounds, notes, sizes,
                    lambda: srv.proc.pid, confirm_cells)
                rows += r
                confirm_rows += c
            finally:
                srv.stop(timeout=5)
        if "lite" in engines:
            db = os.path.join(tmp, "lite.db")
            r, _, channels["lite"] = bench_engine("lite", db, unix_connections, seconds, rounds, notes,
                                                  sizes, lambda: lite_pid(db))
            rows += r
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    figures = _figures(rows, "")
    figures.update(_figures(confirm_rows, "confirm_"))
    decision = _decide(figures)
    figures["decision_pool"] = decision["pool"]
    intro = _intro(channels, seconds, rounds, quick, confirm_cells)
    return {"intro": intro, "rows": _shown(rows), "confirm_rows": _shown(confirm_rows),
            "decision": decision, "raw": rows + confirm_rows, "figures": figures,
            "channels": channels, "notes": notes,
            "machine": {**machine(), "load_avg_1min_start_end": [load_start, os.getloadavg()[0]]}}


def _shown(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: _show(k, v) for k, v in r.items() if k != "raw"} for r in rows]


def _figures(rows: list[dict[str, Any]], prefix: str) -> dict[str, float]:
    """Per engine and pool variant: median and max ratio at T >= 4; 1-client peak throughput."""
    figs: dict[str, float] = {}
    for engine in sorted({r["engine"] for r in rows}):
        mine = [r for r in rows if r["engine"] == engine]
        for key in [k for k in mine[0] if k.endswith(" x")]:
            vals = [r[key] for r in mine if r["threads"] >= 4]
            tag = key[:-2].replace(" ", "_")
            figs[f"{prefix}{engine}_{tag}_median_x_t4plus"] = round(statistics.median(vals), 3)
            figs[f"{prefix}{engine}_{tag}_max_x_t4plus"] = round(max(vals), 3)
        if prefix:
            continue
        for size in sorted({r["items"] for r in mine}):
            for nq in NQS:
                cell = [r for r in mine if r["items"] == size and r["nq"] == nq]
                if cell:
                    best = max(cell, key=lambda r: r["1 client req/s"])
                    figs[f"{engine}_{size}_nq{nq}_1client_peak_rps"] = best["1 client req/s"]
                    figs[f"{engine}_{size}_nq{nq}_1client_peak_threads"] = best["threads"]
    return figs


def _decide(figs: dict[str, float]) -> dict[str, Any]:
    """A pool is kept if a pool of own connections gives >= GAIN more throughput at T >= 4 on the
    server, by the median over the cells of the grid and of the confirmation pass."""
    checks = {}
    for p in POOLS:
        grid = figs.get(f"server_pool_{p}_own_median_x_t4plus")
        conf = figs.get(f"confirm_server_pool_{p}_own_median_x_t4plus")
        gain = bool(grid and grid >= 1 + GAIN and (conf is None or conf >= 1 + GAIN))
        checks[f"pool {p} own"] = {"grid_median_x": grid, "confirm_median_x": conf, "gain": gain}
    return {"pool": any(c["gain"] for c in checks.values()), "threshold_x": 1 + GAIN, "checks": checks}


def _intro(channels: dict[str, Any], seconds: float, rounds: int, quick: bool,
           confirm: tuple[float, int] | None) -> list[str]:
    lines = [f"`ItemIndex.search_vectors(q, {TOP_K})` requests per second with T threads; `x` = "
             "throughput of the variant / throughput of 1 client in the same row (measured in the "
             f"same run, interleaved: {rounds} rounds of {seconds:g} s per variant, median); p50/p99 "
             "per request in ms. `shared`: P ItemIndex objects (P aliases, P grpc.Channel objects) "
             "that gRPC still runs over one TCP connection; `own`: each channel with its own "
             "connection (`grpc.use_local_subchannel_pool`). `cores client/milvus`: CPU cores used by "
             "this process / by the Milvus processes (server tree or Lite child) during the 1-client cell."
             + (" Quick run." if quick else "")]
    if confirm:
        lines.append(f"Confirmation pass (server only, second table): 1 client against the `own` pools at "
                     f"T = {', '.join(map(str, CONFIRM_THREADS))}, {confirm[1]} rounds of {confirm[0]:g} s.")
    for engine, info in channels.items():
        for size, rep in info.items():
            kind = "TCP connections to the server" if engine == "server" else "unix-socket connections"
            lines.append(f"{engine}, {size} items: {kind} of this process with every variant open: "
                         f"{rep['connections_all_variants']} ({rep['connections_1_client']} with 1 client; "
                         f"{rep['expected_if_shared']} if each `shared` pool rides on the 1 client's "
                         f"connection, {rep['expected_if_not_shared']} if its clients had their own); "
                         + "; ".join(f"{v}: {r['aliases']} aliases, {r['channels']} grpc.Channel objects"
                                     for v, r in rep.items() if isinstance(r, dict)) + ".")
    return lines


def _reading(result: dict[str, Any]) -> list[str]:
    """What the tables say, from the figures of this run."""
    out = ["Reading:", ""]
    for engine, info in result["channels"].items():
        reps = list(info.values())
        shared = all(r["connections_all_variants"] == r["expected_if_shared"] for r in reps)
        out.append(f"- {engine}: P `ItemIndex` objects with the same uri are P pymilvus aliases and P "
                   f"`grpc.Channel` objects, and {'yet share one' if shared else 'have their own'} "
                   f"connection ({', '.join(str(r['connections_all_variants']) for r in reps)} counted "
                   "with every variant open). gRPC core pools subchannels process-wide by (address, "
                   "channel args); pymilvus fixes the args and cannot be handed a channel (it deep-copies "
                   "its kwargs), so a real pool needs the channel rebuilt with "
                   "`grpc.use_local_subchannel_pool`, as the `own` variants do."
                   + (" A pool on one Milvus Lite file is possible: pymilvus keeps one Lite child per "
                      ".db per process and every client for that path connects to its unix socket."
                      if engine == "lite" else ""))
    raw = result["raw"][:len(result["rows"])]  # the grid; the confirmation rows follow it
    for engine in sorted({r["engine"] for r in raw}):
        mine = [r for r in raw if r["engine"] == engine]
        client = max(r["raw"]["1 client"]["client_cores"] for r in mine)
        milvus = max(r["raw"]["1 client"]["milvus_cores"] for r in mine)
        peaks = sorted({(r["items"], r["nq"]) for r in mine})
        best = []
        for size, nq in peaks:
            cell = [r for r in mine if r["items"] == size and r["nq"] == nq]
            top = max(cell, key=lambda r: r["1 client req/s"])
            one = min(cell, key=lambda r: r["threads"])
            best.append(f"{size}/nq {nq}: {one['1 client req/s']:.0f} -> {top['1 client req/s']:.0f} req/s "
                        f"(peak at T = {top['threads']})")
        out.append(f"- {engine}, 1 client, T = 1 -> best: " + "; ".join(best)
                   + f". This process used at most {client:.2f} cores and the Milvus processes at most "
                   f"{milvus:.2f} of the machine's {result['machine']['cores']}: the search itself, "
                   "not the client or its channel, is what the threads wait for.")
    out.append("")
    return out


def write(result: dict[str, Any], out: str, command: str) -> tuple[str, str]:
    from benchmarks.report import table

    os.makedirs(out, exist_ok=True)
    js = os.path.join(out, "milvus_client_pool.json")
    with open(js, "w") as f:
        json.dump({"command": command, **result}, f, indent=2, default=str)
    md = os.path.join(out, "milvus_client_pool.md")
    m = result["machine"]
    lines = ["# Milvus client concurrency: one MilvusClient vs a pool", "",
             f"Command: `{command}`  ", f"Machine: {m['cores']} cores, {m['memory_gb']} GB, {m['cpu']}; "
             f"Python {m['python']}, pymilvus {m['pymilvus_version']}, "
             f"milvus-lite {m['milvus_lite_version']}, "
             f"Milvus server 2.3.5 on the same machine; {m['date']}"
             + (f"; 1-min load average {m['load_avg_1min_start_end'][0]:.1f} at the start, "
                f"{m['load_avg_1min_start_end'][1]:.1f} at the end (a shared machine)"
                if "load_avg_1min_start_end" in m else "") + ".", ""]
    lines += result["intro"] + [""] + table(result["rows"]) + [""]
    if result["confirm_rows"]:
        lines += ["Confirmation pass:", ""] + table(result["confirm_rows"]) + [""]
    lines += _reading(result)
    d = result["decision"]
    lines += [f"Decision rule: keep a pool if a pool of own connections gives >= {d['threshold_x']:.2f}x "
              "at T >= 4 on the server (median over the grid and over the confirmation pass): "
              + "; ".join(f"{v}: grid {c['grid_median_x']}, confirm {c['confirm_median_x']}"
                          for v, c in d["checks"].items())
              + f" -> {'pool' if d['pool'] else 'no pool'}.", ""]
    lines += ["Figures:", ""] + [f"- `{k}`: {v}" for k, v in result["figures"].items()] + [""]
    if result["notes"]:
        lines += ["Notes:", ""] + [f"- {n}" for n in result["notes"]] + [""]
    with open(md, "w") as f:
        f.write("\n".join(lines))
    return md, js


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.milvus_clients", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="shorter cells (see run())")
    p.add_argument("--no-confirm", action="store_true", help="skip the confirmation pass")
    p.add_argument("--out", default="docs")
    p.add_argument("--engines", default="server,lite")
    p.add_argument("--sizes", default=",".join(map(str, SIZES)))
    p.add_argument("--seconds", type=float, default=None, help="seconds per cell and round")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--render", metavar="JSON", help="only write the .md again from a saved .json")
    args = p.parse_args(argv)
    if args.render:
        with open(args.render) as f:
            saved = json.load(f)
        command = saved.pop("command")
        md, js = write(saved, args.out, command)
        print(f"wrote {md} and {js}")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    res = run(args.quick, sizes=[int(s) for s in args.sizes.split(",")],
              engines=[e.strip() for e in args.engines.split(",")], seconds=args.seconds, rounds=args.rounds,
              confirm=not args.no_confirm)
    command = "python -m benchmarks.milvus_clients " + " ".join(argv if argv is not None else [])
    from benchmarks.report import table

    print("\n".join(res["intro"] + [""] + table(res["rows"]) + [""] + table(res["confirm_rows"])))
    print(json.dumps(res["decision"]))
    md, js = write(res, args.out, command.strip())
    print(f"wrote {md} and {js}")
    return 0


if __name__ == "__main__":
    import sys

    raise SystemExit(main(sys.argv[1:]))
