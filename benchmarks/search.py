"""Vector search benchmark: numpy exact vs Milvus Lite vs a real Milvus 2.3 server.

For each engine/index it measures build time (upsert + index + load), the latency of one
user's search (one request with K=4 interest vectors, top 50, merged) p50/p99, the latency of
one request for a batch of 64 users, recall@50 against exact search and the memory held.
Every search goes through the project's own ``ItemIndex`` / ``ExactIndex`` + ``recall_top_k``.
Server rows also give ``p50_ms_bounded``: the same request with consistency level Bounded, since
``ItemIndex`` collections are Strong and a Strong search waits for the server's next time tick.
One Milvus server per data set (the `milvus` package's embedded etcd always binds port 2380, so
it waits while another server on the host holds it). A row that fails or does not fit the time
budget is kept, with the reason.

    python -m benchmarks.search [--quick] [--vectors item_vectors.npy] [--out docs/bench_search.json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import numpy as np
from tqdm import tqdm

from benchmarks.common import cpu_model, descendants, memory_gb, process_children
from paddlerec_milvus.milvus_index import ItemIndex
from paddlerec_milvus.milvus_server import MilvusServer
from paddlerec_milvus.recall import ExactIndex, UserRecall, merge_interest_hits, recall_top_k

logger = logging.getLogger("benchmarks.search")

TOP_K = 50
K_INTERESTS = 4
BATCH_USERS = 64
ITEMS_PER_INTEREST = 3  # a query interest = normalised sum of this many random item vectors
ENGINES = ("numpy", "lite_flat", "lite_ivf_flat", "server_flat", "server_ivf_flat", "server_hnsw")
NPROBES = (4, 16, 64)
PRIMARY_NPROBE = 16
EFS = (64, 128, 256)
PRIMARY_EF = 128
HNSW_BUILD = {"M": 16, "efConstruction": 200}


# -- data ---------------------------------------------------------------------------------
def synthetic_items(n: int, dim: int = 64, seed: int = 0) -> np.ndarray:
    """Clustered float32 vectors: ~sqrt(n) Gaussian centres, each item = centre + 0.5 * noise."""
    rng = np.random.default_rng(seed)
    n_clusters = max(16, int(np.sqrt(n)))
    centres = rng.standard_normal((n_clusters, dim), dtype=np.float32)
    out = np.empty((n, dim), dtype=np.float32)
    for s in range(0, n, 100_000):
        m = min(n, s + 100_000) - s
        out[s:s + m] = centres[rng.integers(0, n_clusters, m)]
        out[s:s + m] += 0.5 * rng.standard_normal((m, dim), dtype=np.float32)
    return out


def user_interests(items: np.ndarray, n_users: int, rng: np.random.Generator,
                   k: int = K_INTERESTS, mix: int = ITEMS_PER_INTEREST) -> np.ndarray:
    """[n_users, k, dim] query interests, each the unit-normalised sum of ``mix`` random items."""
    picks = rng.integers(0, len(items), (n_users, k, mix))
    q = items[picks].sum(axis=2)
    q /= np.maximum(np.linalg.norm(q, axis=-1, keepdims=True), 1e-12)
    return q.astype(np.float32)


def size_label(n: int) -> str:
    """1_000_000 -> '1m', 38_500 -> '38k', 100_000 -> '100k', 500 -> '500'."""
    if n >= 1_000_000 and n % 1_000_000 == 0:
        return f"{n // 1_000_000}m"
    return f"{n // 1000}k" if n >= 1000 else str(n)


# -- metrics --------------------------------------------------------------------------------
def recall_vs_exact(ann: Sequence[UserRecall], exact: Sequence[UserRecall], items: np.ndarray,
                    interests: np.ndarray, rel_tol: float = 1e-5) -> float:
    """Overlap of the merged top-k lists, averaged over users. An ANN id outside the exact list
    whose true score ties the exact k-th score (within ``rel_tol``) counts as a hit: float32
    rounding differs between engines. Item id i is row i - 1 of ``items``."""
    hits = total = 0
    for u, (a, e) in enumerate(zip(ann, exact)):
        want = set(e.ids)
        extra = [i for i in a.ids if i not in want]
        n_hit = len(a.ids) - len(extra)
        if extra and e.scores:
            thr = e.scores[-1]
            true = (items[np.asarray(extra) - 1] @ interests[u].T).max(axis=1)
            n_hit += int((true >= thr - rel_tol * max(1.0, abs(thr))).sum())
        hits += min(n_hit, len(e.ids))
        total += len(e.ids)
    return hits / total if total else float("nan")


def _rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_rss_mb(roots: Sequence[int]) -> float | None:
    """Resident memory (MB) of the given processes and all their descendants, from /proc."""
    if not roots or not os.path.isdir("/proc"):
        return None
    pids = set(roots)
    for root in roots:
        pids.update(descendants(root))
    return sum(_rss_kb(pid) for pid in pids) / 1024


def lite_pids(db_path: str) -> list[int]:
    """The milvus-lite server processes this process started for ``db_path``."""
    me, path = os.getpid(), os.path.abspath(db_path)
    out = []
    for pid in process_children().get(me, ()):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if path.encode() in f.read():
                    out.append(pid)
        except OSError:
            continue
    return out


def machine_line() -> str:
    return f"{cpu_model()}, {os.cpu_count()} cores, {memory_gb():.0f} GiB RAM"


def _version(pkg: str) -> str:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return "?"


# -- the plan ---------------------------------------------------------------------------------
@dataclass
class Setup:
    """One engine + index build; its variants are search-parameter sets (one table row each)."""

    name: str  # e.g. "server_ivf_flat"
    engine: str  # numpy | lite | server
    index_type: str
    index_params: dict[str, int] = field(default_factory=dict)
    variants: list[dict[str, int]] = field(default_factory=lambda: [{}])
    primary: dict[str, int] = field(default_factory=dict)


def plan(n: int, engines: Sequence[str]) -> list[Setup]:
    nlist = max(1, int(round(4 * np.sqrt(n))))
    nprobes = sorted({min(p, nlist) for p in NPROBES})
    ivf = {"index_type": "IVF_FLAT", "index_params": {"nlist": nlist},
           "variants": [{"nprobe": p} for p in nprobes], "primary": {"nprobe": min(PRIMARY_NPROBE, nlist)}}
    all_setups = [
        Setup("numpy", "numpy", "EXACT"),
        Setup("lite_flat", "lite", "FLAT"),
        Setup("lite_ivf_flat", "lite", **(ivf | {"variants": [ivf["primary"]]})),
        Setup("server_flat", "server", "FLAT"),
        Setup("server_ivf_flat", "server", **ivf),
        Setup("server_hnsw", "server", "HNSW", dict(HNSW_BUILD), [{"ef": e} for e in EFS],
              {"ef": PRIMARY_EF}),
    ]
    return [s for s in all_setups if s.name == "numpy" or s.name in engines]


def _tag(params: dict[str, int]) -> str:
    return "_".join(f"{k}{v}" for k, v in params.items())


def _params_text(setup: Setup, variant: dict[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in {**setup.index_params, **variant}.items()) or "-"


class Budget:
    """A wall-clock deadline for the whole run."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


# -- measuring ----------------------------------------------------------------------------------
@dataclass
class Timing:
    lat_ms: list[float]
    results: list[UserRecall]
    batch_ms: list[float]
    note: str = ""


def measure(search: Callable[[np.ndarray], list[UserRecall]], singles: np.ndarray,
            batches: np.ndarray, cap_s: float, warmup: int = 2) -> Timing:
    """Time one request per user, then one request per batch of 64 users; stop at ``cap_s``."""
    for u in range(min(warmup, len(singles))):
        search(singles[u:u + 1])
    end = time.monotonic() + cap_s
    lat, res = [], []
    for u in range(len(singles)):
        t = time.perf_counter()
        res.extend(search(singles[u:u + 1]))
        lat.append((time.perf_counter() - t) * 1000)
        if time.monotonic() > end and u + 1 < len(singles):
            break
    note = "" if len(lat) == len(singles) else f"time cap {cap_s:.0f} s: {len(lat)}/{len(singles)} users"
    batch_ms = []
    end = time.monotonic() + cap_s / 2
    for b in range(0, len(batches), BATCH_USERS):
        t = time.perf_counter()
        search(batches[b:b + BATCH_USERS])
        batch_ms.append((time.perf_counter() - t) * 1000)
        if time.monotonic() > end:
            break
    return Timing(lat, res, batch_ms, note)


def bounded_search_fn(admin: Any, collection: str, params: dict[str, int]) -> Callable[
        [np.ndarray], list[UserRecall]]:
    """Diagnostic: the same search with consistency level Bounded (``ItemIndex`` searches with the
    collection's level, Strong, which on a server waits for the next time tick, ~200 ms)."""

    def search(interests: np.ndarray) -> list[UserRecall]:
        n, k, dim = interests.shape
        res = admin.search(collection, data=interests.reshape(n * k, dim).tolist(), limit=TOP_K,
                           search_params={"metric_type": "IP", "params": dict(params)},
                           anns_field="embedding", consistency_level="Bounded")
        out = []
        for u in range(n):
            hits = [h for r in range(u * k, (u + 1) * k) for h in res[r]]
            out.append(merge_interest_hits(np.array([h["id"] for h in hits], dtype=np.int64),
                                           np.array([h["distance"] for h in hits]), TOP_K))
        return out

    return search


ETCD_PEER_PORT = 2380  # the embedded etcd of the `milvus` package always listens here


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def start_server(data_dir: str, budget: Budget, attempts: int = 3) -> MilvusServer:
    """Start a Milvus server; wait while another one holds the fixed etcd peer port, and retry."""
    last: Exception | None = None
    for attempt in range(attempts):
        end = time.monotonic() + max(0.0, min(120.0, budget.left() / 3))
        if not _port_free(ETCD_PEER_PORT):
            logger.info("another Milvus server holds port %d (embedded etcd); waiting", ETCD_PEER_PORT)
            while not _port_free(ETCD_PEER_PORT) and time.monotonic() < end:
                time.sleep(1.0)
        srv = MilvusServer(os.path.join(data_dir, f"try{attempt}"), ready_timeout=45.0 + 30 * attempt)
        try:
            return srv.start()
        except Exception as exc:
            srv.stop()
            last = exc
            busy = "" if _port_free(ETCD_PEER_PORT) else f" (port {ETCD_PEER_PORT} is held by another server)"
            logger.warning("Milvus server start %d/%d failed: %s%s", attempt + 1, attempts, _short(exc), busy)
            if budget.left() < 60:
                break
    raise RuntimeError(f"Milvus server did not start: {_short(last or Exception())}; the embedded etcd of "
                       f"`milvus` 2.3.5 always binds port {ETCD_PEER_PORT}, so only one server runs per host")


def wait_index(admin: Any, collection: str, n: int, lite: bool, timeout: float) -> None:
    """Flush, wait until every row is indexed, then release and load the collection again."""
    admin.flush(collection)
    names = admin.list_indexes(collection)
    end = time.monotonic() + timeout
    last_log = time.monotonic()
    while names:
        info = admin.describe_index(collection, names[0])
        indexed, pending = int(info.get("indexed_rows", 0)), int(info.get("pending_index_rows", 0))
        # milvus-lite reports no row counts; it is done when the state is Finished
        if str(info.get("state")) == "Finished" and pending == 0 and (lite or indexed >= n):
            break
        if time.monotonic() > end:
            raise TimeoutError(f"index build not finished after {timeout:.0f} s ({indexed}/{n} rows indexed)")
        if time.monotonic() - last_log > 30:
            logger.info("  %s: %d/%d rows indexed", collection, indexed, n)
            last_log = time.monotonic()
        time.sleep(0.5)
    admin.release_collection(collection)
    admin.load_collection(collection, timeout=max(1.0, end - time.monotonic()))


# -- the run --------------------------------------------------------------------------------------
class _Bench:
    def __init__(self, n_users: int, n_batches: int, cap_s: float, budget: Budget, tmp: str,
                 bar: tqdm):
        self.n_users, self.n_batches, self.cap_s = n_users, n_batches, cap_s
        self.budget, self.tmp, self.bar = budget, tmp, bar
        self.figures: dict[str, float] = {}
        self.rows: list[dict[str, Any]] = []
        self.notes: list[str] = []
        self.curves: dict[str, list[tuple[str, float, float, str]]] = {}
        self.strong_noted = False
        self.srv: MilvusServer | None = None
        self.upsert_rate = {"lite": 6000.0, "server": 20000.0}  # items/s; updated as measured
        self.engine_names = {"numpy": "numpy exact",
                             "lite": f"milvus-lite {_version('milvus-lite')}",
                             "server": f"milvus {_version('milvus')} server"}

    def dataset(self, label: str, title: str, items: np.ndarray, setups: list[Setup], seed: int) -> None:
        n, dim = items.shape
        ids = np.arange(1, n + 1, dtype=np.int64)
        rng = np.random.default_rng(seed + 1)
        singles = user_interests(items, self.n_users, rng)
        batches = user_interests(items, self.n_batches * BATCH_USERS, rng)
        logger.info("dataset %s: %d x %d items, %d users x %d interests", title, n, dim,
                    self.n_users, K_INTERESTS)
        self.curves[title] = []
        # numpy exact first: it is also the ground truth
        exact = ExactIndex(dim)
        t = time.perf_counter()
        exact.upsert(ids, items)
        build_s = time.perf_counter() - t
        truth = recall_top_k(exact, singles, TOP_K)
        setup = setups[0]
        timing = measure(lambda x: recall_top_k(exact, x, TOP_K), singles, batches, self.cap_s)
        self._row(label, title, setup, {}, n, build_s, timing, truth, items, singles,
                  (exact.vectors.nbytes + exact.ids.nbytes) / 2**20)
        try:
            for setup in setups[1:]:
                self._milvus(label, title, setup, ids, items, singles, batches, truth)
        finally:
            self.stop_server()

    def _server(self, label: str) -> MilvusServer:
        """One server per data set (started on first use; restarted if it died)."""
        if self.srv is not None and self.srv.proc is not None and self.srv.proc.poll() is None:
            return self.srv
        self.stop_server()
        self.srv = start_server(os.path.join(self.tmp, f"srv_{label}_{len(self.rows)}"), self.budget)
        rss = tree_rss_mb([self.srv.proc.pid])
        if rss is not None:
            self.notes.append(f"the empty {self.engine_names['server']} (one per data set, collections "
                              f"dropped between indexes) holds {rss:.0f} MB RSS; its memory_mb includes it")
        return self.srv

    def stop_server(self) -> None:
        if self.srv is not None:
            self.srv.stop()
            self.srv = None

    def _milvus(self, label: str, title: str, setup: Setup, ids: np.ndarray, items: np.ndarray,
                singles: np.ndarray, batches: np.ndarray, truth: list[UserRecall]) -> None:
        n, dim = items.shape
        need = n / self.upsert_rate[setup.engine] + (30 if setup.engine == "server" else 10)
        if self.budget.left() < need:
            return self._fail(label, title, setup, n, f"skipped: the run's time budget is spent "
                              f"({self.budget.left():.0f} s left, ~{need:.0f} s needed to load {n:,} items)")
        self.bar.set_postfix_str(f"{setup.name} {label} build")
        idx = admin = None
        lite_db = os.path.join(self.tmp, f"{setup.name}_{label}.db") if setup.engine == "lite" else None
        try:
            if setup.engine == "server":
                srv = self._server(label)
                uri, roots = srv.uri, [srv.proc.pid]
            else:
                uri, roots = lite_db, []
            t = time.perf_counter()
            idx = ItemIndex(uri, f"bench_{setup.name}_{label}", dim, index_type=setup.index_type,
                            index_params=setup.index_params, search_params=setup.primary,
                            batch_size=10_000)
            t_up = time.perf_counter()
            idx.upsert(ids, items, progress=True)
            self.upsert_rate[setup.engine] = n / max(1e-3, time.perf_counter() - t_up)
            from pymilvus import MilvusClient

            admin = MilvusClient(uri=uri)
            wait_index(admin, idx.collection, n, lite_db is not None,
                       timeout=max(10.0, self.budget.left() - 15))
            build_s = time.perf_counter() - t
            if lite_db:
                roots = lite_pids(lite_db)
            mem = tree_rss_mb(roots)
            logger.info("%s %s: built in %.1f s, %s MB", setup.name, label, build_s,
                        f"{mem:.0f}" if mem else "?")
        except Exception as exc:  # a failed build is a reported row, never a crash
            logger.warning("%s %s failed: %s", setup.name, label, exc)
            why = f"build failed: {_short(exc)}"
            if self.budget.left() < 20:
                why += " (the run's time budget was spent)"
            for variant in setup.variants:
                self._fail(label, title, setup, n, why, variant)
            self._close(idx, admin, lite_db)
            return
        try:
            for variant in setup.variants:
                if self.budget.left() < 5:
                    self._fail(label, title, setup, n, "skipped: the run's time budget is spent", variant)
                    continue
                self.bar.set_postfix_str(f"{setup.name} {label} {_tag(variant)}")
                try:
                    idx.search_params = dict(variant)
                    timing = measure(lambda x: idx.search(x, TOP_K), singles, batches,
                                     min(self.cap_s, max(5.0, self.budget.left() / 2)))
                    mem = max(filter(None, [mem, tree_rss_mb(roots)]), default=None)
                    bounded = None
                    if setup.engine == "server":
                        bounded = measure(bounded_search_fn(admin, idx.collection, variant),
                                          singles, batches[:0], self.cap_s)
                    self._row(label, title, setup, variant, n, build_s, timing, truth, items, singles,
                              mem, bounded)
                except Exception as exc:
                    logger.warning("%s %s %s failed: %s", setup.name, label, variant, exc)
                    self._fail(label, title, setup, n, f"search failed: {_short(exc)}", variant)
            if lite_db and setup.index_type == "IVF_FLAT":
                self._nprobe_check(admin, idx.collection, setup, singles, title)
        finally:
            self._close(idx, admin, lite_db)

    def _nprobe_check(self, admin: Any, collection: str, setup: Setup, singles: np.ndarray,
                      title: str) -> None:
        """Does this engine honour nprobe? Compare nprobe 1 with nprobe nlist on a few users."""
        nlist = setup.index_params["nlist"]
        if nlist < 2:
            return
        q = singles[:8]
        lo = bounded_search_fn(admin, collection, {"nprobe": 1})(q)
        hi = bounded_search_fn(admin, collection, {"nprobe": nlist})(q)
        if all(a.ids == b.ids for a, b in zip(lo, hi)):
            self.notes.append(f"{title}: {self.engine_names['lite']} IVF_FLAT returns the same results "
                              f"for nprobe 1 and nprobe {nlist} (= nlist): it ignores nprobe, so only "
                              f"nprobe {setup.primary.get('nprobe')} is reported")

    def _close(self, idx: ItemIndex | None, admin: Any, lite_db: str | None) -> None:
        for fn in ((idx.drop if idx else None), (idx.close if idx else None),
                   (admin.close if admin else None)):
            if fn is None:
                continue
            try:
                fn()
            except Exception as exc:
                logger.warning("cleanup: %s", _short(exc))
        if lite_db:
            try:  # pymilvus leaves the milvus-lite process running until exit; end it now
                from milvus_lite.server_manager import server_manager_instance

                server_manager_instance.release_server(lite_db)
            except Exception as exc:
                logger.warning("cleanup: milvus-lite %s: %s", lite_db, _short(exc))

    def _fail(self, label: str, title: str, setup: Setup, n: int, reason: str,
              variant: dict[str, int] | None = None) -> None:
        variants = [variant] if variant is not None else setup.variants
        for v in variants:
            self.rows.append(self._base(title, setup, v, n) | {"error": reason})
            self.notes.append(f"{title}: {self.engine_names[setup.engine]} {setup.index_type} "
                              f"{_params_text(setup, v)}: {reason}")
            self.bar.update(1)

    def _base(self, title: str, setup: Setup, variant: dict[str, int], n: int) -> dict[str, Any]:
        return {"dataset": title, "engine": self.engine_names[setup.engine], "index": setup.index_type,
                "params": _params_text(setup, variant), "items": n, "build_s": None, "p50_ms": None,
                "p99_ms": None, "batch64_ms": None, "recall": None, "memory_mb": None,
                "p50_ms_bounded": None, "users": None, "batches": None, "error": None}

    def _row(self, label: str, title: str, setup: Setup, variant: dict[str, int], n: int,
             build_s: float, timing: Timing, truth: list[UserRecall], items: np.ndarray,
             singles: np.ndarray, mem: float | None, bounded: Timing | None = None) -> None:
        m = len(timing.results)
        recall = recall_vs_exact(timing.results, truth[:m], items, singles[:m])
        row = self._base(title, setup, variant, n) | {
            "build_s": _sig(build_s),
            "p50_ms": _sig(np.percentile(timing.lat_ms, 50)),
            "p99_ms": _sig(np.percentile(timing.lat_ms, 99)),
            "batch64_ms": _sig(np.median(timing.batch_ms)) if timing.batch_ms else None,
            "recall": round(recall, 4),
            "memory_mb": round(mem, 1) if mem is not None else None,
            "users": m, "batches": len(timing.batch_ms)}
        if bounded is not None and bounded.lat_ms:
            row["p50_ms_bounded"] = _sig(np.percentile(bounded.lat_ms, 50))
            if row["p50_ms"] > 5 * row["p50_ms_bounded"] and not self.strong_noted:
                self.strong_noted = True
                self.notes.append(
                    f"server latency is dominated by consistency: ItemIndex creates collections with "
                    f"consistency level Strong, so each search waits for the server's next time tick "
                    f"(~200 ms; p50 {row['p50_ms']} ms vs {row['p50_ms_bounded']} ms with Bounded, "
                    f"{title}, {row['index']} {row['params']})")
        self.rows.append(row)
        if timing.note:
            self.notes.append(f"{title}: {row['engine']} {row['index']} {row['params']}: {timing.note}")
        # figure keys: search_<what>_<engine>_<index>[_<param>]_<size>; the default search
        # parameters (nprobe 16, ef 128) are also given without the param suffix
        base = setup.name
        keys = [f"{base}_{_tag(variant)}" if variant else base]
        if variant and variant == setup.primary:
            keys.append(base)
        for key in keys:
            f = self.figures
            f[f"search_p50_ms_{key}_{label}"] = row["p50_ms"]
            f[f"search_p99_ms_{key}_{label}"] = row["p99_ms"]
            if row["batch64_ms"] is not None:
                f[f"search_batch64_p50_ms_{key}_{label}"] = row["batch64_ms"]
            f[f"search_recall_{key}_{label}"] = row["recall"]
            if row["p50_ms_bounded"] is not None:
                f[f"search_p50_ms_bounded_{key}_{label}"] = row["p50_ms_bounded"]
        self.figures[f"search_build_s_{base}_{label}"] = row["build_s"]
        if row["memory_mb"] is not None:
            self.figures[f"search_memory_mb_{base}_{label}"] = row["memory_mb"]
        self.curves[title].append((f"{row['engine']} {row['index']}", row["recall"], row["p50_ms"],
                                   _tag(variant)))
        if row["p50_ms_bounded"] is not None:
            self.curves[title].append((f"{row['engine']} {row['index']} (Bounded)", row["recall"],
                                       row["p50_ms_bounded"], _tag(variant)))
        self.bar.update(1)


def plot(curves: dict[str, list[tuple[str, float, float, str]]], path: str, title: str) -> str:
    """Latency (p50 per user, log scale) against recall@50, one panel per data set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [k for k, v in curves.items() if v]
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(6.5 * max(1, len(panels)), 5), squeeze=False)
    for ax, name in zip(axes[0], panels):
        series: dict[str, list[tuple[float, float, str]]] = {}
        for label, recall, p50, tag in curves[name]:
            series.setdefault(label, []).append((recall, p50, tag))
        colours: dict[str, Any] = {}
        for label, pts in series.items():
            base = label.replace(" (Bounded)", "")
            pts.sort(key=lambda p: int("".join(c for c in p[2] if c.isdigit()) or 0))  # by nprobe / ef
            line = ax.plot([p[0] for p in pts], [p[1] for p in pts], "--" if base != label else "-",
                           marker="o", label=label, color=colours.get(base))
            colours.setdefault(base, line[0].get_color())
            for r, p, tag in pts:
                if tag:
                    ax.annotate(tag, (r, p), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_yscale("log")
        ax.set_xlabel(f"recall@{TOP_K} vs exact (merged over {K_INTERESTS} interests)")
        ax.set_ylabel("p50 latency per user (ms, one request; dashed: Bounded)")
        ax.set_title(name)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run(quick: bool = False, item_vectors: np.ndarray | None = None, out_img_dir: str = "docs/img", *,
        n_synthetic: int | None = None, n_users: int | None = None, n_batches: int | None = None,
        engines: Sequence[str] = ENGINES, dim: int = 64, budget_s: float | None = None,
        per_row_cap_s: float | None = None, seed: int = 0, work_dir: str | None = None) -> dict:
    """Run the benchmark; returns ``{"figures", "rows", "notes", "plots"}`` (see the module doc).

    Sizes default to the full run (1M synthetic items, 200 users, 8 batches of 64, at most 25 s
    of one-by-one requests per row, 23 min budget) or, with ``quick``, 100k items, 60 users,
    4 batches, 6 s per row, 225 s budget; rows past the budget are reported as skipped.
    ``engines`` picks from ENGINES (numpy exact always runs: it is the ground truth)."""
    unknown = set(engines) - set(ENGINES)
    if unknown:
        raise ValueError(f"unknown engines {sorted(unknown)}; choose from {ENGINES}")
    n_synthetic = n_synthetic or (100_000 if quick else 1_000_000)
    n_users = n_users or (60 if quick else 200)
    n_batches = n_batches or (4 if quick else 8)
    budget = Budget(budget_s or (225 if quick else 23 * 60))
    cap_s = per_row_cap_s or (6.0 if quick else 25.0)
    started = dt.datetime.now()
    datasets: list[tuple[str, str, np.ndarray | None]] = []
    notes: list[str] = [
        f"queries: {K_INTERESTS} interests per user, each the unit-normalised sum of "
        f"{ITEMS_PER_INTEREST} random item vectors of the data set; top {TOP_K} per interest, merged",
        "recall: overlap of the merged top-50 with numpy exact search (near-ties within 1e-5 count)",
        "synthetic items: clustered Gaussian (sqrt(n) centres, item = centre + 0.5 noise), float32",
        "memory: RSS of the Milvus server process tree / the milvus-lite process, from /proc, after "
        "load and searches; numpy: the array bytes",
        "p50_ms_bounded (server only): the same request with consistency level Bounded (pymilvus "
        "search + the project's merge), i.e. without waiting for the server's time tick",
        "latency: wall time of one request from the Python client (pymilvus), result parsing and "
        "merge included; the Milvus server runs on the same 2 cores as the client",
    ]
    if item_vectors is not None:
        iv = np.ascontiguousarray(item_vectors, dtype=np.float32)
        if iv.ndim != 2:
            raise ValueError(f"item vectors must be 2-d, got shape {iv.shape}")
        datasets.append((size_label(len(iv)), f"trained {len(iv):,} x {iv.shape[1]}", iv))
    else:
        notes.append("no trained item vectors given (--vectors item_vectors.npy): synthetic only")
    syn_label = size_label(n_synthetic)
    if datasets and datasets[0][0] == syn_label:
        syn_label += "_syn"
    datasets.append((syn_label, f"synthetic {n_synthetic:,} x {dim}", None))
    tmp = tempfile.mkdtemp(prefix="bench_search_", dir=work_dir)
    n_rows = sum(sum(len(s.variants) for s in plan(n_synthetic if v is None else len(v), engines))
                 for _, _, v in datasets)
    bar = tqdm(total=n_rows, desc="vector search bench", unit=" row")
    bench = _Bench(n_users, n_batches, cap_s, budget, tmp, bar)
    bench.notes.extend(notes)
    try:
        for label, title, vecs in datasets:
            items = synthetic_items(n_synthetic, dim, seed) if vecs is None else vecs
            bench.dataset(label, title, items, plan(len(items), engines), seed)
            del items
    finally:
        bar.close()
        shutil.rmtree(tmp, ignore_errors=True)
    elapsed = (dt.datetime.now() - started).total_seconds()
    bench.figures["search_bench_wall_s"] = round(elapsed, 1)
    mode = "quick" if quick else "full"
    title = (f"Vector search, top {TOP_K} of {K_INTERESTS} interests per user ({mode} run) - "
             f"{machine_line()} - {started:%Y-%m-%d}")
    plots = []
    try:
        plots.append(plot(bench.curves, os.path.join(out_img_dir, "search_latency_recall.png"), title))
    except Exception as exc:  # a missing matplotlib must not lose the measurements
        bench.notes.append(f"plot not written: {_short(exc)}")
    bench.notes.append(f"machine: {machine_line()}; {started:%Y-%m-%d %H:%M}; run took {elapsed:.0f} s")
    return {"figures": bench.figures, "rows": bench.rows, "notes": bench.notes, "plots": plots}


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a markdown table (failed rows show their reason)."""
    cols = ["dataset", "engine", "index", "params", "build_s", "p50_ms", "p99_ms", "batch64_ms",
            "recall", "memory_mb", "p50_ms_bounded"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        if r.get("error"):
            cells = [str(r[c]) for c in cols[:4]] + [f"**{r['error']}**"] + [""] * (len(cols) - 5)
        else:
            cells = ["" if r.get(c) is None else str(r[c]) for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _sig(x: float, digits: int = 4) -> float:
    return float(f"{float(x):.{digits}g}")


def _short(exc: BaseException) -> str:
    text = str(exc).strip().replace("\n", " ")
    return (text[:300] if text else type(exc).__name__)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.search", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="100k synthetic items, 60 users (< 4 min)")
    p.add_argument("--vectors", help="trained item vectors (.npy, [n, dim]; row i = item id i+1)")
    p.add_argument("--out", help="write the result dict as JSON here")
    p.add_argument("--img-dir", default="docs/img", help="where the plot goes (default docs/img)")
    p.add_argument("--engines", default=",".join(ENGINES), help=f"comma list from {','.join(ENGINES)}")
    p.add_argument("--n-synthetic", type=int, help="synthetic item count (default 1M, quick 100k)")
    p.add_argument("--users", type=int, help="users timed one by one (default 200, quick 60)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    vectors = np.load(args.vectors) if args.vectors else None
    from tqdm.contrib.logging import logging_redirect_tqdm

    with logging_redirect_tqdm():
        result = run(args.quick, vectors, args.img_dir, n_synthetic=args.n_synthetic, n_users=args.users,
                     engines=[e for e in args.engines.split(",") if e])
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    print(markdown_table(result["rows"]))
    print()
    for note in result["notes"]:
        print("-", note)
    print("plots:", ", ".join(result["plots"]) or "none")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
