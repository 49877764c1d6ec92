"""The item index: a small facade over pymilvus ``MilvusClient``.

``uri`` a local path -> embedded Milvus Lite (nothing to start); ``http://host:19530``
(+ ``token``) -> Milvus standalone, a cluster, or a managed Milvus. One collection holds
``item_id`` (INT64 primary key), ``embedding`` (FLOAT_VECTOR, metric IP) and optional INT64
scalar fields for filtered recall. Verbs: ``upsert``, ``search``, ``count``, ``drop``.
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
import logging
import os
import pathlib
import re
import time
import warnings
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any, TypeVar

import numpy as np
from tqdm import tqdm

from .config import section
from .errors import (
    AliasInUse,
    CollectionUnavailable,
    MilvusIndexError,
    MilvusRequestRejected,
    MilvusUnavailable,
)
from .recall import UserRecall, recall_top_k

logger = logging.getLogger(__name__)
T = TypeVar("T")
MAX_TOP_K = 16384  # Milvus's limit on limit (topk) and on nq per request
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,254}$")
_TRANSIENT = ("unavailable", "deadline", "connection", "timeout", "timed out", "closed", "reset",
              "connect", "not ready", "socket")
_MISSING = ("collection not found", "can't find collection", "collection not exist",
            "not loaded", "collection not loaded")


def _pymilvus():
    with warnings.catch_warnings():  # milvus-lite 2.5 imports the deprecated pkg_resources
        warnings.simplefilter("ignore")
        import pymilvus
    # pymilvus logs every failed RPC at ERROR; this facade turns those into clear exceptions.
    logging.getLogger("pymilvus").setLevel(logging.CRITICAL)
    return pymilvus


def is_local_uri(uri: str) -> bool:
    return "://" not in uri


# index type -> (required build params, search param bounded by a build param)
INDEX_RULES: dict[str, tuple[tuple[str, ...], tuple[str, str] | None]] = {
    "FLAT": ((), None),
    "AUTOINDEX": ((), None),
    "IVF_FLAT": (("nlist",), ("nprobe", "nlist")),
    "IVF_SQ8": (("nlist",), ("nprobe", "nlist")),
    "IVF_PQ": (("nlist", "m"), ("nprobe", "nlist")),
    "SCANN": (("nlist",), ("nprobe", "nlist")),
    "HNSW": (("M", "efConstruction"), None),
    "DISKANN": ((), None),
}
LITE_INDEXES = ("FLAT", "IVF_FLAT", "AUTOINDEX")


def check_index_settings(uri: str, dim: int, index_type: str, index_params: Mapping[str, Any],
                         search_params: Mapping[str, Any]) -> None:
    """Reject index settings the engine would refuse or silently ignore, before connecting."""
    kind = index_type.upper()
    if kind not in INDEX_RULES:
        raise MilvusIndexError(f"milvus.index_type {index_type!r}: expected one of {sorted(INDEX_RULES)}")
    if is_local_uri(uri) and kind not in LITE_INDEXES:
        raise MilvusIndexError(f"milvus.index_type {kind} is not available in Milvus Lite "
                               f"(it has {', '.join(LITE_INDEXES)}); use a Milvus server for {kind}")
    required, bounded = INDEX_RULES[kind]
    for name in required:
        value = index_params.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise MilvusIndexError(f"milvus.index_params.{name} must be a positive integer for {kind}, "
                                   f"got {value!r}")
    if kind == "IVF_PQ" and dim % int(index_params["m"]):
        raise MilvusIndexError(f"milvus.index_params.m = {index_params['m']} must divide dim {dim}")
    if bounded:
        name, limit = bounded
        value = search_params.get(name)
        if value is not None and not (isinstance(value, int) and 1 <= value <= index_params[limit]):
            raise MilvusIndexError(f"milvus.search_params.{name} = {value!r} must be in 1.."
                                   f"{index_params[limit]} (index_params.{limit})")


SERVING_DESCRIPTION = "paddlerec-milvus serving items (raw ids)"


class ItemIndex:
    """Item vectors in one Milvus collection, searched by users' interest vectors."""

    def __init__(
        self,
        uri: str,
        collection: str,
        dim: int,
        token: str = "",
        metric: str = "IP",
        index_type: str = "FLAT",
        index_params: Mapping[str, Any] | None = None,
        search_params: Mapping[str, Any] | None = None,
        batch_size: int = 1000,
        upsert_workers: int = 2,
        scalar_fields: Sequence[str] = (),
        timeout: float = 10.0,
        retries: int = 3,
        create: bool = True,  # False: a missing collection is an error (serving must not invent one)
        consistency_level: str = "Session",
        description: str = "",  # stored with a collection this creates (SERVING_DESCRIPTION marks export's)
        call_timeout: float | None = None,  # budget of each call once connected; None: ``timeout``
        open_collection: bool = True,  # False: connect only (refill creates the collection itself)
    ):
        if not _NAME.match(collection or ""):
            raise MilvusIndexError(
                f"collection name {collection!r}: use letters, digits and underscores only, "
                "starting with a letter or underscore")
        if metric.upper() != "IP":
            raise MilvusIndexError(f"metric {metric!r}: MIND interests are matched by inner product (IP)")
        check_index_settings(uri, int(dim), index_type, index_params or {}, search_params or {})
        self.uri, self.collection, self.dim = uri, collection, int(dim)
        self.metric = "IP"
        self.index_type = index_type.upper()
        self.index_params = dict(index_params or {})
        self.search_params = dict(search_params or {})
        self.batch_size = int(batch_size)
        if self.batch_size < 1 or int(upsert_workers) < 1:
            raise MilvusIndexError(f"milvus.batch_size ({batch_size}) and milvus.upsert_workers "
                                   f"({upsert_workers}) must be positive")
        self.upsert_workers = int(upsert_workers)
        self.scalar_fields = list(scalar_fields)
        # ``timeout`` bounds reaching the server, so a dead one fails fast; a batch job (export)
        # gives each call on a server it has reached longer (``call_timeout``): a server that has
        # just restarted answers its first creates and loads slowly while it recovers the others
        self.timeout, self.retries = timeout, retries
        self.call_timeout = float(timeout if call_timeout is None else call_timeout)
        self.create = create
        # Session: a client reads its own writes at once; Strong makes every search on a server
        # wait for the next timestamp tick (~200 ms). Lite ignores the level.
        if consistency_level not in ("Strong", "Session", "Bounded", "Eventually"):
            raise MilvusIndexError(f"milvus.consistency_level {consistency_level!r}: expected Strong, "
                                   "Session, Bounded or Eventually")
        self.consistency_level = consistency_level
        self.description = description
        self._raw_search_ok = True
        self._client = self._connect(token)
        if open_collection:
            self._ensure_collection()

    @classmethod
    def from_config(cls, config: Mapping[str, Any], dim: int, collection: str | None = None,
                    bulk_write: bool = False, **kwargs: Any) -> ItemIndex:
        """Build from the ``milvus.*`` keys of a flattened config; ``kwargs`` override them.

        ``bulk_write``: a batch job (export) writing a whole catalogue. Reaching Milvus stays
        bounded by ``milvus.timeout`` (a dead server fails fast), but each call after that may
        take ``milvus.write_timeout`` (default max(120 s, milvus.timeout)): a server that has just
        restarted creates and loads slowly while it recovers its other collections."""
        timeout = float(config.get("milvus.timeout") or 10.0)
        args: dict[str, Any] = dict(
            uri=str(config.get("milvus.uri") or "output_milvus/milvus.db"),
            collection=collection or str(config.get("milvus.collection") or "mind_items"),
            dim=dim,
            token=str(config.get("milvus.token") or ""),
            metric=str(config.get("milvus.metric") or "IP"),
            index_type=str(config.get("milvus.index_type") or "FLAT"),
            index_params=section(config, "milvus.index_params"),
            search_params=section(config, "milvus.search_params"),
            consistency_level=str(config.get("milvus.consistency_level") or "Session"),
            batch_size=int(config.get("milvus.batch_size") or 1000),
            upsert_workers=int(config.get("milvus.upsert_workers") or 2),
            scalar_fields=config.get("milvus.scalar_fields") or (),
            timeout=timeout,
        )
        if bulk_write:
            args["call_timeout"] = float(config.get("milvus.write_timeout") or max(120.0, timeout))
        args.update(kwargs)
        return cls(**args)

    # -- connection -----------------------------------------------------------------------
    def _connect(self, token: str):
        pm = _pymilvus()
        if is_local_uri(self.uri):
            parent = os.path.dirname(os.path.abspath(self.uri))
            os.makedirs(parent, exist_ok=True)
            _release_dead_lite(self.uri)
        # A connection of our own (pymilvus shares one per uri by default): closing this index
        # never closes another's, and a reconnect after a server restart opens a fresh channel.
        deadline, _ = _deadline(self.timeout)
        kwargs = {"uri": self.uri, "timeout": max(0.1, deadline - time.monotonic()),
                  "alias": f"paddlerec-milvus-{os.getpid()}-{next(_ALIASES)}"}
        if token:
            kwargs["token"] = token
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return pm.MilvusClient(**kwargs)
        except Exception as exc:  # pymilvus raises several kinds; one clear message
            if is_local_uri(self.uri):
                hint = ("is another process using this Milvus Lite file? Lite opens a .db in one "
                        "process only; use a Milvus server for several")
                if _lite_locked_by_other(self.uri) is False:
                    hint = "the Milvus Lite process could not start; see the log above"
            else:
                hint = "is the server running and the uri/token right?"
            raise MilvusUnavailable(f"cannot reach Milvus at {self.uri}: {_short(exc)} ({hint})") from None

    def _call(self, what: str, fn: Callable[..., T], timeout: float | None = None) -> T:
        """Run a client call within this index's deadline (``timeout`` seconds for the call and
        all its retries together): ``fn(timeout=..., retry_times=0)`` gets the time left, so
        pymilvus makes one attempt bounded by it and the retries with backoff are ours.
        ``timeout`` replaces the index's own for a call known to be long (an index build)."""
        deadline, budget = _deadline(self.call_timeout if timeout is None else timeout)
        for attempt in range(self.retries + 1):
            left = deadline - time.monotonic()
            try:
                if left <= 0.05:
                    raise _DeadlinePassed()
                return fn(timeout=left, retry_times=0)
            except (MilvusIndexError, _RawSearchUnavailable):
                raise
            except _DeadlinePassed:
                raise MilvusUnavailable(f"cannot reach Milvus at {self.uri}: {what} did not finish "
                                        f"within {budget:g} s") from None
            except Exception as exc:
                kind = classify_error(exc)
                delay = 0.2 * 2 ** attempt
                if kind is MilvusUnavailable and attempt < self.retries and \
                        deadline - time.monotonic() > delay + 0.1:
                    logger.warning("Milvus %s failed (%s); retrying in %.1f s", what, _short(exc), delay)
                    time.sleep(delay)
                    continue
                if kind is MilvusUnavailable:
                    raise MilvusUnavailable(f"cannot reach Milvus at {self.uri}: {what}: {_short(exc)}") \
                        from None
                if kind is CollectionUnavailable:
                    raise CollectionUnavailable(
                        f"collection {self.collection!r} is not available at {self.uri} ({_short(exc)}); "
                        "export the model into it (paddlerec-milvus export) or refill it "
                        "(POST /rec/insert_data)") from None
                raise kind(f"Milvus {what} failed: {_short(exc)}") from None
        raise AssertionError("unreachable")

    # -- collection -----------------------------------------------------------------------
    def _ensure_collection(self) -> None:
        c, name = self._client, self.collection
        if self._call("has_collection", lambda **kw: c.has_collection(name, **kw)):
            self._check_existing()
            self._call("load_collection", lambda **kw: c.load_collection(name, **kw))
            return
        if not self.create:
            raise CollectionUnavailable(
                f"no collection or alias {name!r} at {self.uri}; export the model into it "
                "(paddlerec-milvus export) or refill it (POST /rec/insert_data)")
        self._create_collection()
        # sync=False: pymilvus would poll an empty collection's index state and sleep 0.5 s;
        # the index exists once the call returns, which is all loading needs
        self._create_index(sync=False)
        self._call("load_collection", lambda **kw: c.load_collection(name, **kw))

    def _create_collection(self) -> None:
        pm = _pymilvus()
        c, name = self._client, self.collection
        schema = pm.MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False,
                                               description=self.description)
        schema.add_field("item_id", pm.DataType.INT64, is_primary=True)
        schema.add_field("embedding", pm.DataType.FLOAT_VECTOR, dim=self.dim)
        for field in self.scalar_fields:
            schema.add_field(field, pm.DataType.INT64)
        self._call("create_collection", lambda **kw: c.create_collection(
            name, schema=schema, consistency_level=self.consistency_level, **kw))
        logger.info("created collection %s (dim %d, %s/%s) at %s", name, self.dim,
                    self.index_type, self.metric, self.uri)

    def _create_index(self, sync: bool, timeout: float | None = None) -> None:
        c, name = self._client, self.collection
        index_params = c.prepare_index_params()
        index_params.add_index(field_name="embedding", index_type=self.index_type,
                               metric_type=self.metric, params=dict(self.index_params))
        self._call("create_index", lambda **kw: c.create_index(name, index_params, sync=sync, **kw),
                   timeout)

    def _check_existing(self) -> None:
        c, name = self._client, self.collection
        desc = self._call("describe_collection", lambda **kw: c.describe_collection(name, **kw))
        fields = {f["name"]: f for f in desc.get("fields", [])}
        if "embedding" not in fields or "item_id" not in fields:
            raise MilvusIndexError(
                f"collection {name!r} at {self.uri} exists but has fields {sorted(fields)}, "
                "not item_id/embedding; choose another milvus.collection")
        dim = int(fields["embedding"].get("params", {}).get("dim", -1))
        if dim != self.dim:
            raise MilvusIndexError(
                f"collection {name!r} at {self.uri} holds dim {dim} vectors but the model has "
                f"dim {self.dim}; drop it (paddlerec-milvus drop / index.drop()) or use another "
                "milvus.collection")
        missing = [f for f in self.scalar_fields if f not in fields]
        if missing:
            raise MilvusIndexError(f"collection {name!r} lacks scalar fields {missing}")
        for idx in self._call("list_indexes", lambda **kw: c.list_indexes(name, **kw)):
            info = self._call("describe_index", lambda idx=idx, **kw: c.describe_index(name, idx, **kw))
            metric = str(info.get("metric_type", "IP")).upper()
            if info.get("field_name", "embedding") == "embedding" and metric != self.metric:
                raise MilvusIndexError(
                    f"collection {name!r} at {self.uri} is indexed with metric {metric}, "
                    f"expected {self.metric}; drop it or use another milvus.collection")

    # -- verbs ----------------------------------------------------------------------------
    def upsert(self, ids: Sequence[int] | np.ndarray, vectors: np.ndarray,
               fields: Mapping[str, Sequence[int]] | None = None, progress: bool = True) -> int:
        """Insert or replace items by id, in batches; re-running never duplicates."""
        return self._write("upsert", ids, vectors, fields, progress)

    def refill(self, ids: Sequence[int] | np.ndarray, vectors: np.ndarray,
               fields: Mapping[str, Sequence[int]] | None = None, progress: bool = True,
               build_timeout: float = 3600.0) -> int:
        """Replace the collection with exactly these items, by the engine's bulk path, and return
        once every row is searchable from its index.

        On a server the rows go into a new, unloaded collection, are flushed into sealed
        segments, indexed, and only then loaded. Rows upserted into a loaded collection sit in
        growing segments that the query nodes scan brute force until the hand-off to sealed,
        indexed segments (Milvus 2.3.5, 38.5k x 64: 25 s from the first upsert to a sealed
        search, against 7.7 s this way). Milvus Lite has no hand-off: drop and upsert.
        ``build_timeout`` bounds the flush, the index build and the load (seconds each)."""
        if is_local_uri(self.uri):
            self.reset()
            return self.upsert(ids, vectors, fields, progress)
        name = self.collection
        self.drop()
        self._create_collection()
        written = self._write("insert", ids, vectors, fields, progress)
        t0 = time.perf_counter()
        self._flush(build_timeout)
        t1 = time.perf_counter()
        self._build_index(build_timeout)
        t2 = time.perf_counter()
        self._load(build_timeout)
        logger.info("%s: %d rows sealed, indexed (%s) and loaded: flush %.1f s, index build %.1f s, "
                    "load %.1f s", name, written, self.index_type, t1 - t0, t2 - t1,
                    time.perf_counter() - t2)
        return written

    # pymilvus's own waits poll every 0.5 s (flush, index: after a first 0.5-s sleep) or 0.2 s
    # (load); the server hands off in steps of ~0.1-1 s, so polling every 50 ms returns up to
    # ~1 s sooner per refill (38.5k x 64: FLAT index 0.5 s -> <0.1 s). Each falls back to the
    # public call when the pymilvus internals it uses are not there.
    _POLL_S = 0.05

    def _wait_until(self, what: str, done: Callable[..., bool], budget: float) -> None:
        end = time.monotonic() + budget
        while not self._call(what, done):
            if time.monotonic() >= end:
                raise MilvusUnavailable(f"Milvus {what} of {self.collection!r} at {self.uri} did not "
                                        f"finish within {budget:g} s")
            time.sleep(self._POLL_S)

    def _handler(self):
        handler = getattr(self._client, "_get_connection", lambda: None)()
        needs = ("_stub", "get_flush_state", "get_index_state", "get_loading_progress")
        return handler if all(hasattr(handler, a) for a in needs) else None

    def _flush(self, budget: float) -> None:
        c, name, handler = self._client, self.collection, self._handler()
        try:
            from pymilvus.client.prepare import Prepare
            from pymilvus.client.utils import check_status
        except ImportError:
            handler = None
        if handler is None:
            self._call("flush", lambda **kw: c.flush(name, **kw), budget)
            return

        def flush(timeout: float, **_: Any):
            reply = handler._stub.Flush(Prepare.flush_param([name]), timeout=timeout)
            check_status(reply.status)
            return list(reply.coll_segIDs[name].data), reply.coll_flush_ts[name]

        segments, flush_ts = self._call("flush", flush, budget)
        self._wait_until("flush", lambda timeout, **_: handler.get_flush_state(
            segments, name, flush_ts, timeout=timeout), budget)

    def _build_index(self, budget: float) -> None:
        handler = self._handler()
        if handler is None:
            self._create_index(sync=True, timeout=budget)
            return
        self._create_index(sync=False, timeout=budget)
        failed: list[str] = []

        def built(timeout: float, **_: Any) -> bool:
            from pymilvus.client.types import IndexState

            state, reason = handler.get_index_state(self.collection, "", timeout=timeout,
                                                    field_name="embedding")
            if state == IndexState.Failed:
                failed.append(str(reason))
                return True
            return state == IndexState.Finished

        self._wait_until("index build", built, budget)
        if failed:
            raise MilvusIndexError(f"Milvus could not build the {self.index_type} index of "
                                   f"{self.collection!r}: {failed[0]}")

    def _load(self, budget: float) -> None:
        c, name, handler = self._client, self.collection, self._handler()
        if handler is None:
            self._call("load_collection", lambda **kw: c.load_collection(name, **kw), budget)
            return
        self._call("load_collection", lambda **kw: c.load_collection(name, _async=True, **kw), budget)
        self._wait_until("load", lambda timeout, **_: handler.get_loading_progress(
            name, timeout=timeout) >= 100, budget)

    def _write(self, verb: str, ids: Sequence[int] | np.ndarray, vectors: np.ndarray,
               fields: Mapping[str, Sequence[int]] | None, progress: bool) -> int:
        ids = np.asarray(ids)
        vectors = np.asarray(vectors)
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise MilvusIndexError(f"item ids must be a 1-d integer array, got dtype {ids.dtype}")
        if vectors.ndim != 2 or vectors.shape[0] != len(ids):
            raise MilvusIndexError(
                f"vectors must have shape [{len(ids)}, {self.dim}], got {list(vectors.shape)}")
        if vectors.shape[1] != self.dim:
            raise MilvusIndexError(
                f"vectors have dim {vectors.shape[1]} but collection {self.collection!r} "
                f"holds dim {self.dim}")
        if len(ids) and ids.min() < 0:
            raise MilvusIndexError(f"negative item id {int(ids.min())}")
        if len(np.unique(ids)) != len(ids):
            raise MilvusIndexError("duplicate item ids in one upsert")
        if not np.all(np.isfinite(vectors)):
            raise MilvusIndexError("vectors contain NaN or inf")
        fields = dict(fields or {})
        unknown = set(fields) - set(self.scalar_fields)
        if unknown:
            raise MilvusIndexError(
                f"unknown scalar fields {sorted(unknown)} (declared: {self.scalar_fields})")
        vectors = vectors.astype(np.float32, copy=False)

        def send(start: int) -> int:
            end = start + self.batch_size
            rows = [{"item_id": int(i), "embedding": v}
                    for i, v in zip(ids[start:end], vectors[start:end].tolist())]
            for name, values in fields.items():
                for r, value in zip(rows, values[start:end]):
                    r[name] = int(value)
            write = getattr(self._client, verb)
            self._call(verb, lambda **kw: write(self.collection, rows, **kw))
            return len(rows)

        written = 0
        bar = tqdm(total=len(ids), desc=f"{verb} {self.collection}", unit=" items",
                   disable=None if progress else True, mininterval=1.0)
        # Two requests in flight: one batch is converted to rows here while Milvus writes the
        # other (38.5k x 64 on Lite: 1.4 s -> 0.85 s). Batches of 1000 beat 5000 on Lite too.
        with ThreadPoolExecutor(max_workers=self.upsert_workers, thread_name_prefix="upsert") as pool:
            # each worker runs in a copy of this context: a request's deadline_scope holds there too
            futures = [pool.submit(contextvars.copy_context().run, send, s)
                       for s in range(0, len(ids), self.batch_size)]
            try:
                for fut in as_completed(futures):
                    n = fut.result()
                    written += n
                    bar.update(n)
            except BaseException:
                for fut in futures:
                    fut.cancel()
                raise
            finally:
                bar.close()
        return written

    def count(self) -> int:
        res = self._call("count", lambda **kw: self._client.query(
            self.collection, filter="", output_fields=["count(*)"], consistency_level="Strong", **kw))
        return int(res[0]["count(*)"]) if res else 0

    def delete(self, ids: Sequence[int]) -> None:
        ids = [int(i) for i in ids]
        if ids:
            self._call("delete", lambda **kw: self._client.delete(self.collection, ids=ids, **kw))

    def drop(self) -> None:
        """Delete the collection and its data. ``AliasInUse`` when the name is an alias of a
        served version (Milvus will not drop through an alias)."""
        try:
            self._call("drop_collection", lambda **kw: self._client.drop_collection(self.collection, **kw))
        except MilvusUnavailable:
            raise
        except MilvusIndexError as exc:
            if "alias" in str(exc).lower():
                raise AliasInUse(f"{self.collection!r} is an alias at {self.uri}: {exc}") from None
            raise

    def stored_description(self) -> str:
        """The description the collection was created with (export marks serving collections)."""
        c, name = self._client, self.collection
        desc = self._call("describe_collection", lambda **kw: c.describe_collection(name, **kw))
        return str((desc or {}).get("description") or "")

    def alias_target(self, alias: str) -> str | None:
        """The collection ``alias`` points at, or None if there is no such alias."""
        try:
            info = self._call("describe_alias", lambda **kw: self._client.describe_alias(alias, **kw))
        except MilvusUnavailable:
            raise
        except MilvusIndexError:
            return None
        return (info or {}).get("collection_name") or None

    def set_alias(self, alias: str, target: str | None) -> None:
        """Point ``alias`` at ``target``, or remove it when ``target`` is None."""
        c = self._client
        if target:
            self._call("alter_alias", lambda **kw: c.alter_alias(target, alias, **kw))
        else:
            self._call("drop_alias", lambda **kw: c.drop_alias(alias, **kw))

    def has_collection(self, name: str | None = None) -> bool:
        name = name or self.collection
        return bool(self._call("has_collection", lambda **kw: self._client.has_collection(name, **kw)))

    def reset(self) -> None:
        """Drop the collection and create it again, empty, with the same settings. Cheaper than
        overwriting every row when all of them change (a new checkpoint): Milvus keeps scanning
        replaced rows until it compacts (Lite: searches ~20% slower after one full overwrite)."""
        self.drop()
        create, self.create = self.create, True
        try:
            self._ensure_collection()
        finally:
            self.create = create

    def clear(self) -> None:
        """Delete every item and keep the collection, and any alias that points at it."""
        self._call("delete", lambda **kw: self._client.delete(self.collection, filter="item_id >= 0", **kw))

    def point_alias(self, alias: str) -> str | None:
        """Point ``alias`` at this collection (create it or move it), then prune the other
        ``{alias}_v*`` collections: the one the alias pointed at before stays (services still
        on it finish their requests and swap), the rest go, aborted exports included.
        Returns the collection the alias pointed at before (None if it is new)."""
        c = self._client
        old = self.alias_target(alias)
        if old is None:
            if self.has_collection(alias):
                raise MilvusIndexError(f"a collection named {alias!r} exists; the alias needs the name: "
                                       "drop it or choose another milvus.collection")
            self._call("create_alias", lambda **kw: c.create_alias(self.collection, alias, **kw))
        else:
            self._call("alter_alias", lambda **kw: c.alter_alias(self.collection, alias, **kw))
        keep = {self.collection, old}
        dropped = []
        ours = re.compile(re.escape(alias) + r"_v\d{14,17}_e\d+")  # what export names versions
        for name in self._call("list_collections", lambda **kw: c.list_collections(**kw)):
            if ours.fullmatch(name) and name not in keep:
                try:
                    self._call("drop old version", lambda name=name, **kw: c.drop_collection(name, **kw))
                    dropped.append(name)
                except MilvusIndexError as exc:  # pruning is housekeeping: the switch has happened
                    logger.warning("could not drop old version %s: %s", name, exc)
        if dropped:
            logger.info("dropped old versions of %s: %s (kept %s)", alias, dropped,
                        sorted(k for k in keep if k))
        return old

    def close(self) -> None:
        try:
            self._client.close()
        except Exception:  # closing a dead connection is not an error worth raising
            pass

    def __enter__(self) -> ItemIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def vectors_of(self, ids: Sequence[int] | np.ndarray, filter: str | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
        """(ids, vectors) of those of ``ids`` the collection holds (and ``filter`` admits), in
        no set order: what the history bonus scores a user's own items with."""
        wanted = [int(i) for i in np.unique(np.asarray(ids, dtype=np.int64))]
        found_ids: list[int] = []
        found_vecs: list[list[float]] = []
        for s in range(0, len(wanted), 4096):
            expr = f"item_id in {wanted[s:s + 4096]}" + (f" and ({filter})" if filter else "")
            rows = self._call("query", lambda expr=expr, **kw: self._client.query(
                self.collection, filter=expr, output_fields=["item_id", "embedding"],
                consistency_level=self.consistency_level, **kw))
            for row in rows:
                found_ids.append(int(row["item_id"]))
                found_vecs.append(row["embedding"])
        vectors = np.asarray(found_vecs, dtype=np.float32).reshape(len(found_ids), self.dim)
        return np.asarray(found_ids, dtype=np.int64), vectors

    def search_vectors(self, queries: np.ndarray, limit: int,
                       filter: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-``limit`` (ids, scores) per query, padded with -1/-inf when short."""
        q = np.asarray(queries, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise MilvusIndexError(f"query vectors must have shape [n, {self.dim}], got {list(q.shape)}")
        if not 1 <= limit <= MAX_TOP_K:
            raise MilvusRequestRejected(f"top_k {limit} (with the history items to leave out) out of "
                                        f"range 1..{MAX_TOP_K}")
        ef = self.search_params.get("ef")
        if self.index_type == "HNSW" and ef is not None and ef < limit:
            raise MilvusRequestRejected(f"top_k {limit} (with the history items to leave out) is over "
                                        f"milvus.search_params.ef = {ef} of this HNSW index")
        ids = np.full((len(q), limit), -1, dtype=np.int64)
        scores = np.full((len(q), limit), -np.inf, dtype=np.float32)
        params = {"metric_type": self.metric, "params": dict(self.search_params)}
        step = max(1, min(MAX_TOP_K, 65536 // limit, 2048))
        for s in range(0, len(q), step):
            chunk = q[s:s + step].tolist()
            if self._raw_search_ok:
                try:
                    out_ids, out_scores = ids[s:s + step], scores[s:s + step]
                    self._call("search", lambda chunk=chunk, i=out_ids, d=out_scores, **kw: self._search_raw(
                        chunk, limit, filter, params, kw["timeout"], i, d))
                    continue
                except _RawSearchUnavailable as exc:
                    logger.info("pymilvus internals changed (%s); using MilvusClient.search", exc)
                    self._raw_search_ok = False
            res = self._call("search", lambda chunk=chunk, **kw: self._client.search(
                self.collection, data=chunk, limit=limit, filter=filter or "",
                search_params=params, anns_field="embedding",
                consistency_level=self.consistency_level, **kw))
            for r, hits in enumerate(res):
                row = [(h["id"], h["distance"]) for h in hits]
                if row:
                    hid, hsc = zip(*row)
                    ids[s + r, :len(row)] = hid
                    scores[s + r, :len(row)] = hsc
        return ids, scores

    def _search_raw(self, chunk: list[list[float]], limit: int, filter: str | None,
                    params: dict[str, Any], timeout: float, ids_out: np.ndarray,
                    scores_out: np.ndarray) -> None:
        """The same request ``MilvusClient.search`` sends, but the reply's id and score arrays
        are read straight into numpy: pymilvus builds a Python object per hit, which cost more
        than the search itself (1.5 s of 2.2 s for 4096 queries x top 50 on Milvus Lite)."""
        try:
            from pymilvus.client.prepare import Prepare
            from pymilvus.client.utils import check_status

            handler = self._client._get_connection()
            stub = handler._stub
        except (ImportError, AttributeError) as exc:
            raise _RawSearchUnavailable(str(exc)) from None
        request = Prepare.search_requests_with_expr(
            self.collection, chunk, "embedding", params, limit, filter or "", None, [], -1,
            consistency_level=self.consistency_level)
        reply = stub.Search(request, timeout=timeout)
        check_status(reply.status)
        data = reply.results
        topks = np.asarray(data.topks, dtype=np.int64)
        if len(topks) == 0 and len(data.ids.int_id.data) == 0:
            return  # nothing found for any query (an empty collection): the padding stays
        if len(topks) != len(chunk):
            raise _RawSearchUnavailable(f"reply holds {len(topks)} result lists for {len(chunk)} queries")
        hit_ids = np.asarray(data.ids.int_id.data, dtype=np.int64)
        hit_scores = np.asarray(data.scores, dtype=np.float32)
        if len(hit_ids) != topks.sum() or len(hit_scores) != len(hit_ids):
            raise _RawSearchUnavailable("reply's id/score arrays do not match its topks")
        if np.all(topks == limit):
            ids_out[:] = hit_ids.reshape(len(chunk), limit)
            scores_out[:] = hit_scores.reshape(len(chunk), limit)
            return
        starts = np.concatenate([[0], np.cumsum(topks)[:-1]])
        for r, (start, n) in enumerate(zip(starts, topks)):
            ids_out[r, :n] = hit_ids[start:start + n]
            scores_out[r, :n] = hit_scores[start:start + n]

    def search(self, interests: np.ndarray, top_k: int,
               histories: Sequence[Collection[int]] | None = None,
               exclude_history: bool = False, filter: str | None = None,
               history_bonus: float = 0.0) -> list[UserRecall]:
        """K interest vectors per user -> one merged top-k list per user."""
        return recall_top_k(self, interests, top_k, histories, exclude_history, filter, history_bonus)


# (monotonic end, length in seconds) of the innermost deadline_scope, or None outside any
_DEADLINE: contextvars.ContextVar[tuple[float, float] | None] = contextvars.ContextVar("milvus_deadline",
                                                                                     default=None)


@contextlib.contextmanager
def deadline_scope(seconds: float) -> Iterator[None]:
    """Every Milvus call made inside (any index, any number of calls and retries) ends by
    ``seconds`` from now: a request's worst case, not a per-call one."""
    end = time.monotonic() + seconds
    outer = _DEADLINE.get()
    token = _DEADLINE.set((end, seconds) if outer is None or end < outer[0] else outer)
    try:
        yield
    finally:
        _DEADLINE.reset(token)


def _deadline(timeout: float) -> tuple[float, float]:
    """(monotonic deadline, its length) for a call of an index with ``timeout``: the sooner of
    its own timeout and the enclosing deadline_scope."""
    now = time.monotonic()
    scope = _DEADLINE.get()
    if scope is None or now + timeout <= scope[0]:
        return now + timeout, timeout
    return scope[0], min(timeout, scope[1])


class _RawSearchUnavailable(Exception):
    """The pymilvus internals the fast search path reads are not there (another version)."""


class _DeadlinePassed(Exception):
    """The index's time budget for one call ran out before an attempt could start."""


_ALIASES = itertools.count()


def classify_error(exc: BaseException) -> type[MilvusIndexError]:
    """The one place that reads pymilvus/gRPC failures: which kind of Milvus trouble is it?"""
    import grpc

    if isinstance(exc, grpc.RpcError) and hasattr(exc, "code"):
        code = exc.code()
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                    grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN):
            return MilvusUnavailable
        if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED):
            return MilvusRequestRejected
    pm = _pymilvus()
    if isinstance(exc, (pm.exceptions.MilvusUnavailableException, pm.exceptions.ConnectError,
                        pm.exceptions.ConnectionNotExistException)):
        return MilvusUnavailable
    text = str(exc).lower()
    code = getattr(exc, "code", None)
    if code == 100 or any(w in text for w in _MISSING):  # 100: CollectionNotExists
        return CollectionUnavailable
    if any(w in text for w in _TRANSIENT) or isinstance(code, grpc.StatusCode):
        return MilvusUnavailable
    if code in (1100, 1101) or isinstance(exc, pm.exceptions.ParamError) or "parse" in text or "expr" in text:
        return MilvusRequestRejected  # 1100: invalid parameter
    return MilvusIndexError


def _lite_server(uri: str):
    try:
        from milvus_lite.server_manager import server_manager_instance
    except ImportError:
        return None, None
    path = str(pathlib.Path(uri).absolute().resolve())
    return server_manager_instance, path


def _release_dead_lite(uri: str) -> None:
    """pymilvus keeps one Milvus Lite child per file and never notices when it dies: every
    reconnect would reuse its dead socket. Forget a dead child so the next client starts one."""
    manager, path = _lite_server(uri)
    if manager is None:
        return
    server = manager._servers.get(path)
    proc = getattr(server, "_p", None)
    if server is not None and proc is not None and proc.poll() is not None:
        logger.warning("the Milvus Lite process for %s exited (code %s); starting a new one",
                       uri, proc.returncode)
        try:
            manager.release_server(path)
        except Exception as exc:  # its own cleanup of a dead process; the new start matters
            logger.debug("releasing the dead Milvus Lite server: %s", exc)
            manager._servers.pop(path, None)


def lite_pid(uri: str) -> int | None:
    """The pid of this process's Milvus Lite child for ``uri`` (None if not started)."""
    manager, path = _lite_server(uri)
    server = manager._servers.get(path) if manager is not None else None
    proc = getattr(server, "_p", None)
    return proc.pid if proc is not None and proc.poll() is None else None


def _lite_locked_by_other(uri: str) -> bool | None:
    """True if another process holds the Lite file's lock; None if unknown."""
    lock = os.path.join(os.path.dirname(os.path.abspath(uri)), f".{os.path.basename(uri)}.lock")
    if not os.path.exists(lock):
        return False
    import fcntl

    try:
        with open(lock, "a") as f:
            fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.lockf(f, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    except OSError:
        return None


def _short(exc: BaseException) -> str:
    text = str(exc).strip().replace("\n", " ")
    return text[:300] if text else type(exc).__name__
