"""The online recall service core: raw item ids in, raw item ids out.

Loads an exported folder (``serving_contract``: inference model, item map, manifest) and
searches the collection that holds exactly that export's item vectors. Each request takes one
``ModelVersion`` (user tower + item map + collection) and uses it from start to end, so an
answer never mixes two exports. A new export of the folder is noticed by the manifest's stamp
and loaded beside the old version, then swapped in between requests. The Paddle Serving Ops and
the REST API both call ``RecallService``; neither knows about Paddle or Milvus details.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FuturesTimeout
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from .batching import MicroBatcher
from .errors import (
    CollectionUnavailable,
    ConfigError,
    DeadlineExceeded,
    MilvusIndexError,
    MilvusRequestRejected,
    MilvusUnavailable,
    RequestError,
)
from .filter_expr import check_filter
from .milvus_index import MAX_TOP_K, ItemIndex, _deadline, deadline_scope, is_local_uri
from .recall import UserRecall, latest_clicks, recall_rows
from .serving_contract import Manifest, ServingLimits, manifest_stamp, read_export_item_map

logger = logging.getLogger(__name__)


@dataclass
class RecallAnswer:
    items: list[list[int]]
    scores: list[list[float]]
    notes: list[str] = field(default_factory=list)
    model_version: str = ""


class UserTowerPredictor:
    """``paddle.inference`` predictor for the exported user tower; a pool of clones.

    It runs a private link (or copy) of the tower files, never the export folder's: Paddle 3's
    ``clone()`` reads the model files again, so a clone made after a re-export replaced the
    folder would run the new tower inside the old version (seen: answers labelled with one
    version, computed with the next one's tower)."""

    def __init__(self, export_dir: str, manifest: Manifest, use_gpu: bool = False):
        import paddle.inference as pi

        model = os.path.join(export_dir, manifest.model_file)
        params = os.path.join(export_dir, manifest.params_file)
        for path in (model, params):
            if not os.path.isfile(path):
                raise ConfigError(f"export {export_dir} lacks {os.path.basename(path)}; re-export")
        _sweep_once()
        self._files = tempfile.mkdtemp(prefix=f"{TOWER_LINKS_PREFIX}{os.getpid()}-")
        weakref.finalize(self, shutil.rmtree, self._files, True)
        model, params = (_pin(path, self._files) for path in (model, params))
        cfg = pi.Config(model, params)
        if use_gpu:
            cfg.enable_use_gpu(256, 0)
        else:
            cfg.disable_gpu()
            cfg.set_cpu_math_library_num_threads(1)
            # Paddle 3.3's CPU predictor turns oneDNN on by default, and its oneDNN passes compute
            # this tower wrongly (interests off by up to 12 against the dygraph model, every row)
            # and 3x slower (0.75 vs 0.27 ms for one user). export checks the parity.
            cfg.disable_mkldnn()
        cfg.disable_glog_info()
        try:
            self._main = pi.create_predictor(cfg)
        except Exception as exc:  # Paddle's own errors are long C++ traces
            raise ConfigError(f"cannot load the user tower from {export_dir}: "
                              f"{str(exc).strip().splitlines()[-1][:200]}") from None
        self._lock = threading.Lock()
        # idle clones (the main predictor only clones, never runs); another is made when all are busy
        self._free = [self._main.clone()]

    def __call__(self, hist: np.ndarray, seq_len: np.ndarray) -> np.ndarray:
        # A pool, not a clone per thread: micro-batching runs the tower in one thread at a time,
        # while a pipeline has 16+ Op threads that would each warm up a clone of their own.
        with self._lock:
            pred = self._free.pop() if self._free else self._main.clone()
        try:
            feeds = {"hist_item": hist.astype(np.int64), "seq_len": seq_len.astype(np.int64)}
            for name in pred.get_input_names():
                handle = pred.get_input_handle(name)
                handle.reshape(feeds[name].shape)
                handle.copy_from_cpu(feeds[name])
            pred.run()
            return pred.get_output_handle(pred.get_output_names()[0]).copy_to_cpu()
        finally:
            with self._lock:
                self._free.append(pred)


TOWER_LINKS_PREFIX = "paddlerec-tower-"


def sweep_stale_tower_links(root: str | None = None) -> list[str]:
    """Remove the private tower folders of services that are gone (killed with -9: their
    finalizers never ran); returns what was removed. A folder whose pid lives is left alone."""
    root = root or tempfile.gettempdir()
    removed = []
    try:
        names = os.listdir(root)
    except OSError:
        return removed
    for name in names:
        match = re.fullmatch(re.escape(TOWER_LINKS_PREFIX) + r"(\d+)-\w+", name)
        if match is None or _alive(int(match.group(1))):
            continue
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        removed.append(name)
    if removed:
        logger.info("removed %d tower folders of services that are gone from %s", len(removed), root)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@functools.cache
def _sweep_once() -> None:
    sweep_stale_tower_links()


def _pin(path: str, folder: str) -> str:
    """``path``'s content under ``folder``: a hard link (free, and the content stays when the
    export folder is replaced), or a copy where the two are on different file systems."""
    target = os.path.join(folder, os.path.basename(path))
    try:
        os.link(path, target)
    except OSError:
        try:
            shutil.copyfile(path, target)
        except OSError as exc:
            raise ConfigError(f"cannot copy the user tower {path} to {folder}: "
                              f"{exc.strerror or exc}") from None
    return target


class ExportReplaced(ConfigError):
    """The export folder changed while a version was read from it."""


class ModelVersion:
    """One export: its user tower, item map and the collection with its item vectors."""

    def __init__(self, export_dir: str, stamp: Any, uri: str | None, collection: str | None, token: str,
                 use_gpu: bool, index_kwargs: dict[str, Any]):
        self.manifest = Manifest.load(export_dir)
        self.stamp = stamp
        m = self.manifest
        self.raw_ids = read_export_item_map(export_dir, m.item_count)
        self.dense_of = {int(r): d for d, r in enumerate(self.raw_ids) if d > 0}
        self.predictor = UserTowerPredictor(export_dir, m, use_gpu)
        if stamp is not None and manifest_stamp(export_dir) != stamp:
            # the folder was replaced while we read it: the pieces may come from two exports
            raise ExportReplaced(f"export {export_dir} was replaced while it was being loaded")
        self.uri = uri or m.milvus_uri  # None: the export's
        # The export's own collection (a server export writes one per version behind the alias):
        # searching it, not the alias, keeps this version's tower and vectors together.
        pinned = collection is None or collection == m.collection
        self.collection = (m.physical_collection or m.collection) if pinned else collection
        self._token, self._index_kwargs = token, index_kwargs
        self._index: ItemIndex | None = None
        self._connecting: Future | None = None
        self._lock = threading.Lock()

    @property
    def version(self) -> str:
        return self.manifest.model_version

    def index(self) -> ItemIndex:
        """The connected index. Connecting runs in a thread of its own, waited for only until the
        request's deadline: pymilvus's connect makes one call without a timeout, which hangs for
        as long as a stalled Milvus does (seen with a SIGSTOPped Milvus Lite: 30 s and more)."""
        with self._lock:
            if self._index is not None:
                return self._index
            pending = self._connecting
            if pending is None:
                pending = self._connecting = Future()
                threading.Thread(target=self._connect, args=(pending,), daemon=True,
                                 name="milvus-connect").start()
        end, _ = _deadline(float(self._index_kwargs.get("timeout", 10.0)))
        try:
            return pending.result(timeout=max(0.0, end - time.monotonic()))
        except FuturesTimeout:
            raise MilvusUnavailable(f"cannot reach Milvus at {self.uri}: connecting did not finish within "
                                    "the request's deadline (Milvus stalled?); retry shortly") from None

    def _connect(self, pending: Future) -> None:
        """Outside any request's deadline: a slow connect still completes for later requests."""
        try:
            index = ItemIndex(self.uri, self.collection, self.manifest.embedding_dim,
                              token=self._token, **self._index_kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed to every waiting request
            with self._lock:
                self._connecting = None
            pending.set_exception(exc)
            return
        with self._lock:
            self._index, self._connecting = index, None
        pending.set_result(index)

    def reset_index(self, failed: ItemIndex | None = None) -> None:
        """Forget the index so the next call reconnects. With ``failed``: only if it is still the
        current one (a concurrent request may have replaced it already); its client is left to the
        garbage collector, as other requests may still be using it."""
        with self._lock:
            if failed is not None:
                if self._index is failed:
                    self._index = None
                    # requests still on it finish within their deadline; then close its channel
                    timer = threading.Timer(3 * failed.timeout + 5, failed.close)
                    timer.daemon = True
                    timer.start()
                return
            if self._index is not None:
                self._index.close()
            self._index = None


class RecallService:
    """Validate histories, compute interests, search Milvus, merge: one call per request."""

    def __init__(self, export_dir: str, milvus_uri: str | None = None, collection: str | None = None,
                 token: str = "", limits: ServingLimits | None = None, use_gpu: bool = False,
                 index_kwargs: dict[str, Any] | None = None, watch_interval_s: float = 1.0,
                 scalar_fields: Sequence[str] = ()):
        self.export_dir = os.path.abspath(export_dir)
        self.limits = limits or ServingLimits()
        self.max_top_k = min(self.limits.max_top_k, MAX_TOP_K)
        self._uri_override, self._collection_override = milvus_uri or None, collection or None
        self._token, self._use_gpu = token, use_gpu
        self._index_kwargs = {"timeout": self.limits.milvus_timeout, "retries": self.limits.milvus_retries,
                              "create": False, **(index_kwargs or {})}
        self.scalar_fields = ("item_id", *scalar_fields)
        self.watch_interval_s = watch_interval_s
        self._versions: OrderedDict[str, ModelVersion] = OrderedDict()
        self._swap_lock = threading.Lock()
        self._load_lock = threading.Lock()  # one load at a time
        self._loading = False
        self._next_check = 0.0
        self.last_load_error: str | None = None
        self._batchers: dict[str, MicroBatcher] = {}
        self._stages: dict[str, Callable[[Sequence[RecallJob]], list[Any]]] = {
            "user tower": self.run_tower, "search": self.run_search, "recall": self.run_recall}
        self._current = self._load_settled(manifest_stamp(self.export_dir))

    # -- versions -------------------------------------------------------------------------
    def _load(self, stamp: Any) -> ModelVersion:
        version = ModelVersion(self.export_dir, stamp, self._uri_override, self._collection_override,
                               self._token, self._use_gpu, self._index_kwargs)
        m = version.manifest
        with self._swap_lock:
            self._versions[version.version] = version
            while len(self._versions) > 2:  # the previous one stays for requests already on it
                _, old = self._versions.popitem(last=False)
                old.reset_index()
        logger.info("serving model version %s (epoch %d) from %s; Milvus %s collection %s",
                    version.version, m.epoch, self.export_dir, version.uri, version.collection)
        return version

    def _load_settled(self, stamp: Any) -> ModelVersion:
        """``_load``, again while exports keep replacing the folder under it."""
        for _ in range(4):
            try:
                return self._load(stamp)
            except ExportReplaced:
                stamp = manifest_stamp(self.export_dir)
                if stamp is None:
                    break
        raise ExportReplaced(f"export {self.export_dir} kept being replaced while it was loaded")

    def current(self) -> ModelVersion:
        """The version a new request uses; notices a new export (at most every watch interval)
        and loads it in the background, swapping it in once it is ready."""
        now = time.monotonic()
        if now >= self._next_check and not self._loading:
            with self._swap_lock:
                start = not self._loading and now >= self._next_check
                if start:
                    self._next_check = now + self.watch_interval_s
                    stamp = manifest_stamp(self.export_dir)
                    start = stamp is not None and stamp != self._current.stamp
                    self._loading = start
            if start:
                threading.Thread(target=self._reload, daemon=True, name="model-reload").start()
        return self._current

    def _reload(self) -> None:
        """Load the folder's export if it is newer than the current one (one load at a time)."""
        try:
            with self._load_lock:
                stamp = manifest_stamp(self.export_dir)
                if stamp is None or stamp == self._current.stamp:
                    return
                try:
                    version = self._load_settled(stamp)
                except Exception as exc:  # a half-written or broken export: keep serving the old one
                    self.last_load_error = f"new export at {self.export_dir} not loaded: {exc}"
                    logger.warning("%s; still serving %s", self.last_load_error, self._current.version)
                    return
                self._current = version  # one reference assignment: requests see old or new, never half
                self.last_load_error = None
        finally:
            self._loading = False

    def refresh(self) -> ModelVersion:
        """Load a new export now, if there is one (used when the current version's collection
        is gone: an export elsewhere pruned it). Waits for a load already running."""
        stamp = manifest_stamp(self.export_dir)
        if stamp is not None and stamp != self._current.stamp:
            self._reload()
        return self._current

    def version(self, name: str) -> ModelVersion:
        """A version by name (the pipeline's second Op uses the one its first Op used; in
        process mode that Op's own service may not have loaded it yet)."""
        for attempt in range(2):
            with self._swap_lock:
                found = self._versions.get(name)
            if found is not None:
                return found
            if attempt == 0:
                self.refresh()
        raise MilvusUnavailable(f"model version {name} was replaced while this request ran; retry")

    # compatibility with callers that read these off the service
    @property
    def manifest(self) -> Manifest:
        return self._current.manifest

    @property
    def dense_of(self) -> dict[int, int]:
        return self._current.dense_of

    @property
    def raw_ids(self) -> np.ndarray:
        return self._current.raw_ids

    @property
    def uri(self) -> str:
        return self._current.uri

    @property
    def collection(self) -> str:
        return self._current.collection

    @property
    def index(self) -> ItemIndex:
        return self._current.index()

    def reset_index(self) -> None:
        for v in list(self._versions.values()):
            v.reset_index()

    # -- requests -------------------------------------------------------------------------
    def encode(self, histories: Sequence[Sequence[Any]], version: ModelVersion | None = None
               ) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """Raw-id histories -> padded dense ids and lengths; bad input raises RequestError."""
        v = version or self.current()
        lim = self.limits
        if not isinstance(histories, (list, tuple)) or not histories:
            raise RequestError("hist_item must be a non-empty list of histories (lists of item ids)")
        if len(histories) > lim.max_users:
            raise RequestError(f"{len(histories)} histories in one request; the limit is {lim.max_users}")
        maxlen = v.manifest.maxlen
        hist = np.zeros((len(histories), maxlen), dtype=np.int64)
        seq_len = np.zeros(len(histories), dtype=np.int64)
        notes = []
        for row, items in enumerate(histories):
            if not isinstance(items, (list, tuple)):
                raise RequestError(f"hist_item[{row}] must be a list of item ids, got {type(items).__name__}")
            if not items:
                raise RequestError(f"hist_item[{row}] is empty: a user needs at least one clicked item")
            if len(items) > lim.max_history:
                raise RequestError(f"hist_item[{row}] has {len(items)} items; the limit is "
                                   f"{lim.max_history} (only the latest {maxlen} are used)")
            dense = []
            unknown = []
            for col, raw in enumerate(items):
                if isinstance(raw, bool) or not isinstance(raw, (int, np.integer)):
                    raise RequestError(f"hist_item[{row}][{col}] = {raw!r} is not an integer item id")
                if raw < 0:
                    raise RequestError(f"hist_item[{row}][{col}] = {raw} is negative")
                d = v.dense_of.get(int(raw))
                if d is None:
                    unknown.append(int(raw))
                else:
                    dense.append(d)
            if unknown:
                notes.append(f"hist_item[{row}]: unknown item ids ignored: {unknown[:20]}")
            if not dense:
                raise RequestError(f"hist_item[{row}]: none of its item ids is known to the model "
                                   f"(unknown: {unknown[:20]})")
            dense = dense[-maxlen:]
            hist[row, :len(dense)] = dense
            seq_len[row] = len(dense)
        return hist, seq_len, notes

    def check_top_k(self, top_k: Any) -> int:
        if top_k is None:
            return self.limits.default_top_k
        if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)):
            raise RequestError(f"top_k = {top_k!r} must be an integer")
        if not 1 <= top_k <= self.max_top_k:
            raise RequestError(f"top_k = {top_k} out of range 1..{self.max_top_k}")
        return int(top_k)

    def check_filter(self, filter: Any) -> str | None:
        """Our own grammar, before Milvus sees it (Lite ignores trailing junk)."""
        if filter is None:
            return None
        return check_filter(filter, self.scalar_fields) or None

    def interests(self, histories: Sequence[Sequence[Any]], version: ModelVersion | None = None
                  ) -> tuple[np.ndarray, list[str]]:
        v = version or self.current()
        hist, seq_len, notes = self.encode(histories, v)
        return v.predictor(*latest_clicks(hist, seq_len, v.manifest.history_len or None)), notes

    def _search_rows(self, v: ModelVersion, interests: np.ndarray, top_ks: Sequence[int],
                     excludes: Sequence[set[int]] | None, filter: str | None,
                     deadline: float, histories: Sequence[Sequence[int]] | None = None
                     ) -> list[UserRecall]:
        """One Milvus search for these rows (of one or many requests), by ``deadline``.

        A failure is typed: ``MilvusUnavailable`` (down, restarting: the index reconnects, and a
        dead Milvus Lite child is restarted, on the next call) or ``CollectionUnavailable``
        (dropped, empty, not exported). An answer is never silently empty."""
        left = deadline - time.monotonic()
        if left <= 0.05:  # too little for a search: not sent (and no reconnect for it)
            raise DeadlineExceeded(f"the request's deadline ({max(0.0, left) * 1e3:.0f} ms left) is too "
                                   "close for its Milvus search; it was not run")
        budget = min(self.limits.milvus_timeout, left)
        with deadline_scope(budget):
            for attempt in range(2):
                index = None
                try:
                    index = v.index()
                    results = recall_rows(index, interests, top_ks, excludes, filter, histories,
                                          v.manifest.history_bonus if histories is not None else 0.0)
                    if not all(r.ids for r in results):
                        self._explain_empty(v, filtered=bool(filter))
                    return results
                except MilvusUnavailable as exc:
                    if budget < self.limits.milvus_timeout and time.monotonic() >= deadline - 0.05:
                        # the request's own (short) deadline ran out, not the Milvus timeout:
                        # no sign the connection is bad, so keep it
                        raise DeadlineExceeded(f"Milvus did not answer within the request's deadline "
                                               f"({budget * 1e3:.0f} ms): {exc}") from None
                    v.reset_index(index)  # reconnect (and restart a dead Lite child) on the retry
                    if attempt == 1:
                        raise
                except CollectionUnavailable:
                    v.reset_index(index)
                    raise  # run_search redoes the jobs on a newer export, if there is one
        raise AssertionError("unreachable")

    def _explain_empty(self, v: ModelVersion, filtered: bool = False) -> None:
        """Some user got no item: say why instead of answering [] (with a filter, [] is a fair
        answer unless the collection is empty)."""
        n = v.index().count()
        if filtered and n > 0:
            return
        if n == 0:
            raise CollectionUnavailable(
                f"collection {v.collection!r} at {v.uri} is empty (dropped?); refill it with "
                "POST /rec/insert_data or re-export")
        raise MilvusUnavailable(f"collection {v.collection!r} holds {n} items but Milvus returned none "
                                "(still loading after a restart?); retry shortly")

    # -- requests as jobs: alone or micro-batched -----------------------------------------
    def prepare(self, histories: Sequence[Sequence[Any]], top_k: Any = None,
                exclude_history: bool = False, filter: str | None = None,
                timeout_ms: Any = None, arrival: float | None = None,
                deadline: float | None = None) -> RecallJob:
        """Check a request and encode it; every mistake is a ``RequestError`` here, before it can
        join a batch (a bad request never fails its batch-mates). The deadline counts from
        ``arrival`` (time.monotonic() when the server got it) when given, else from now; a
        ``deadline`` (monotonic: the caller's own, e.g. its gRPC deadline) can only shorten it."""
        v = self.current()
        top_k = self.check_top_k(top_k)
        filter = self.check_filter(filter)
        timeout = self.limits.request_timeout
        if timeout_ms is not None:
            if isinstance(timeout_ms, bool) or not isinstance(timeout_ms, (int, float, np.integer)) \
                    or not timeout_ms > 0:
                raise RequestError(f"timeout_ms = {timeout_ms!r} must be a positive number of milliseconds")
            timeout = min(timeout, float(timeout_ms) / 1000)
        hist, seq_len, notes = self.encode(histories, v)
        excludes = [set(h) if exclude_history else set() for h in histories]
        start = time.monotonic() if arrival is None else min(arrival, time.monotonic())
        end = start + timeout if deadline is None else min(start + timeout, deadline)
        job = RecallJob(excludes, hist, seq_len, top_k, filter, notes, v.version, end)
        if job.limit > MAX_TOP_K:
            raise RequestError(f"top_k {top_k} + {job.limit - top_k} history items to leave out is over "
                               f"Milvus's limit {MAX_TOP_K}")
        return job

    def run_tower(self, jobs: Sequence[RecallJob]) -> list[RecallJob | BaseException]:
        """The user tower for many jobs: one predictor call per model version."""
        out: list[RecallJob | BaseException] = list(jobs)
        for name, members in _group(jobs, lambda j: j.model_version).items():
            try:
                v = self.version(name)
                rows = np.concatenate([jobs[i].hist for i in members])
                lens = np.concatenate([jobs[i].seq_len for i in members])
                vecs = v.predictor(*latest_clicks(rows, lens, v.manifest.history_len or None))
            except Exception as exc:  # noqa: BLE001 - the group's jobs get the error
                for i in members:
                    out[i] = exc
                continue
            for i, rows in _per_job(jobs, members, vecs):
                jobs[i].interests = rows
        return out

    def run_search(self, jobs: Sequence[RecallJob]) -> list[RecallAnswer | BaseException]:
        """Milvus for many jobs: one search per (model version, filter), split per job."""
        out: list[RecallAnswer | BaseException] = [RecallAnswer([], [])] * len(jobs)
        for (name, filter), members in _group(jobs, lambda j: (j.model_version, j.filter)).items():
            v = None
            try:
                v = self.version(name)
                members = self._within_search_limit(v, jobs, members, out)
                if not members:
                    continue
                vecs = np.concatenate([jobs[i].interests for i in members])
                top_ks = [jobs[i].top_k for i in members for _ in range(jobs[i].users)]
                excludes = [e for i in members for e in jobs[i].excludes]
                results = self._search_rows(v, vecs, top_ks, excludes, filter,
                                            max(jobs[i].deadline for i in members),
                                            self._boosted(v, jobs, members))
            except CollectionUnavailable as exc:
                newer = self.refresh()
                redone = self._redo_on(newer, v, [jobs[i] for i in members]) \
                    if v is not None and newer.version != name else [exc] * len(members)
                for i, answer in zip(members, redone):
                    out[i] = answer
                continue
            except Exception as exc:  # noqa: BLE001 - the group's jobs get the error
                for i in members:
                    out[i] = exc
                continue
            for i, mine in _per_job(jobs, members, results):
                job = jobs[i]
                notes = list(job.notes)
                short = [r for r, u in enumerate(mine) if len(u.ids) < job.top_k]
                if short and filter:
                    notes.append(f"filter left fewer than top_k={job.top_k} items for rows {short[:20]}")
                out[i] = RecallAnswer([u.ids for u in mine], [u.scores for u in mine], notes, name)
        return out

    @staticmethod
    def _boosted(v: ModelVersion, jobs: Sequence[RecallJob], members: Sequence[int]
                 ) -> list[list[int]] | None:
        """Per row, the history items the model's history bonus raises (raw ids, as the tower saw
        them: the latest maxlen); none for a row that leaves its history out."""
        if not v.manifest.history_bonus:
            return None
        rows = []
        for i in members:
            job = jobs[i]
            for row, n, leave_out in zip(job.hist, job.seq_len, job.excludes):
                rows.append([] if leave_out else v.raw_ids[row[:n]].tolist())
        return rows

    def _redo_on(self, newer: ModelVersion, old: ModelVersion, jobs: Sequence[RecallJob]
                 ) -> list[RecallAnswer | BaseException]:
        """Jobs whose version's collection is gone (a newer export pruned it), from the start on
        the newer version: their old interests searched in the newer vectors would be an answer
        of neither version."""
        moved: list[Any] = []
        for job in jobs:
            raw = [old.raw_ids[row[:n]].tolist() for row, n in zip(job.hist, job.seq_len)]
            try:
                hist, seq_len, notes = self.encode(raw, newer)
            except RequestError as exc:  # none of its items is known to the newer model
                moved.append(exc)
                continue
            moved.append(replace(job, hist=hist, seq_len=seq_len, notes=[*job.notes, *notes],
                                 model_version=newer.version, interests=None))
        ready = [i for i, job in enumerate(moved) if isinstance(job, RecallJob)]
        for i, answer in zip(ready, self.run_recall([moved[i] for i in ready])):
            moved[i] = answer
        return moved

    @staticmethod
    def _within_search_limit(v: ModelVersion, jobs: Sequence[RecallJob], members: list[int],
                             out: list[Any]) -> list[int]:
        """Jobs whose top_k + history to leave out the index can answer; the others fail alone."""
        try:
            with deadline_scope(1.0):
                index = v.index()
        except MilvusIndexError:
            return members  # not connected: the search reconnects, retries and says why
        cap = MAX_TOP_K
        ef = index.search_params.get("ef") if index.index_type == "HNSW" else None
        if ef is not None:
            cap = min(cap, int(ef))
        keep = []
        for i in members:
            need = jobs[i].limit
            if need > cap:
                out[i] = MilvusRequestRejected(
                    f"top_k {need} (with the history items to leave out) is over {cap}, the most this "
                    f"index answers" + (f" (milvus.search_params.ef = {ef})" if ef is not None else ""))
            else:
                keep.append(i)
        return keep

    @property
    def batching(self) -> bool:
        return self.limits.batch_max_users > 0

    def run_recall(self, jobs: Sequence[RecallJob]) -> list[RecallAnswer | BaseException]:
        """Both stages for many jobs (the REST API's one stage: one hand-off per request)."""
        out: list[RecallAnswer | BaseException] = list(self.run_tower(jobs))  # type: ignore[arg-type]
        ready = [i for i, r in enumerate(out) if not isinstance(r, BaseException)]
        for i, answer in zip(ready, self.run_search([jobs[i] for i in ready])):
            out[i] = answer
        return out

    def _batcher(self, stage: str) -> MicroBatcher:
        with self._swap_lock:
            if stage not in self._batchers:
                lim = self.limits
                self._batchers[stage] = MicroBatcher(stage, self._stages[stage], lim.batch_max_users,
                                                     lim.batch_window_ms / 1000, lim.queue_max_users)
            return self._batchers[stage]

    def _run(self, stage: str, job: RecallJob) -> Any:
        """A thread's request through one stage: batched with whatever else is waiting (run at
        once when nothing is), or alone when batching is off."""
        if self.batching:
            return self._batcher(stage).call(job, job.users, job.deadline)
        if job.deadline <= time.monotonic():
            raise DeadlineExceeded(f"the request's deadline passed before the {stage} stage; it was not run")
        result = self._stages[stage]([job])[0]
        if isinstance(result, BaseException):
            raise result
        return result

    def run_many(self, stage: str, jobs: Sequence[RecallJob]) -> list[Any]:
        """A batch a caller already holds (a pipeline Op fed by Paddle Serving's op batching)
        through one stage: one result or exception per job; jobs past their deadline are not run."""
        if self.batching:
            return self._batcher(stage).call_many(jobs, [j.users for j in jobs], [j.deadline for j in jobs])
        out: list[Any] = []
        for job in jobs:
            try:
                out.append(self._run(stage, job))
            except Exception as exc:  # noqa: BLE001 - the job's own failure
                out.append(exc)
        return out

    def tower(self, job: RecallJob) -> RecallJob:
        """The user-tower stage (the pipeline's first Op): the job, with its interests."""
        return self._run("user tower", job)

    def finish(self, job: RecallJob) -> RecallAnswer:
        """The Milvus stage of a job that has its interests (the pipeline's second Op)."""
        return self._run("search", job)

    async def recall_async(self, job: RecallJob) -> RecallAnswer:
        """Both stages without parking a thread per waiting request (the REST API's path). A
        request that finds the stage idle runs alone in a pool thread, as it would unbatched
        (one hand-off either way, but the pool's is the cheaper one)."""
        batcher = self._batcher("recall")
        if batcher.idle():
            return await asyncio.to_thread(batcher.call, job, job.users, job.deadline)
        return await asyncio.wrap_future(batcher.submit(job, job.users, job.deadline))

    def recall(self, histories: Sequence[Sequence[Any]], top_k: Any = None,
               exclude_history: bool = False, filter: str | None = None,
               timeout_ms: Any = None, arrival: float | None = None) -> RecallAnswer:
        job = self.prepare(histories, top_k, exclude_history, filter, timeout_ms, arrival)
        return self._run("recall", job)

    def batch_stats(self) -> dict[str, Any]:
        with self._swap_lock:
            return {stage: b.stats() for stage, b in self._batchers.items()}

    def health(self) -> dict[str, Any]:
        """What /health and the pipeline report: "ok" only when recall would answer items."""
        v = self.current()
        out: dict[str, Any] = {"status": "degraded", "model_version": v.version, "milvus_uri": v.uri,
                               "collection": v.collection, "milvus_reachable": False, "count": None,
                               "error": None}
        index = None
        try:
            with deadline_scope(self.limits.milvus_timeout):
                index = v.index()
                out["count"] = index.count()
                out["milvus_reachable"] = True
                alias = v.manifest.collection
                if not is_local_uri(v.uri) and alias != v.collection:
                    out["alias_target"] = index.alias_target(alias)
        except MilvusIndexError as exc:
            v.reset_index(index)
            out["milvus_reachable"] = not isinstance(exc, MilvusUnavailable)
            out["error"] = str(exc)
            return out
        if out["count"] == 0:
            out["error"] = f"collection {v.collection!r} is empty: recall would fail"
        elif self.last_load_error:
            out["error"] = self.last_load_error
        elif out.get("alias_target") not in (None, v.collection):
            out["error"] = (f"serving {v.collection} but alias {v.manifest.collection} points at "
                            f"{out['alias_target']}: the export folder {self.export_dir} is not the "
                            "latest export")
        else:
            out["status"] = "ok"
        return out

    def close(self) -> None:
        with self._swap_lock:
            batchers, self._batchers = list(self._batchers.values()), {}
        for b in batchers:
            b.close()
        self.reset_index()


@dataclass
class RecallJob:
    """One checked, encoded request on its way through the stages. Plain data, so the pipeline
    can pass it between Ops (pickled in process mode); the version travels by name."""

    excludes: list[set[int]]  # per user: raw ids to leave out (its history with exclude_history)
    hist: np.ndarray  # [users, maxlen] dense ids
    seq_len: np.ndarray  # [users]
    top_k: int
    filter: str | None
    notes: list[str]
    model_version: str
    deadline: float  # time.monotonic() (system-wide on Linux: valid in the pipeline's processes)
    interests: np.ndarray | None = None  # [users, K, dim], after the tower stage

    @property
    def users(self) -> int:
        return len(self.seq_len)

    @property
    def limit(self) -> int:
        """What its search must ask Milvus for: top_k + the most ids one of its users leaves out."""
        return self.top_k + max(map(len, self.excludes), default=0)


def _group(jobs: Sequence[RecallJob], key: Callable[[RecallJob], Any]) -> dict[Any, list[int]]:
    groups: dict[Any, list[int]] = {}
    for i, job in enumerate(jobs):
        groups.setdefault(key(job), []).append(i)
    return groups


def _per_job(jobs: Sequence[RecallJob], members: Sequence[int],
             rows: Sequence[Any]) -> Iterator[tuple[int, Any]]:
    """Split a group's stacked rows back into each member job's own rows, in order."""
    start = 0
    for i in members:
        yield i, rows[start:start + jobs[i].users]
        start += jobs[i].users
