"""The item index: a small facade over pymilvus ``MilvusClient``.

``uri`` a local path -> embedded Milvus Lite (nothing to start); ``http://host:19530``
(+ ``token``) -> Milvus standalone, a cluster, or a managed Milvus. One collection holds
``item_id`` (INT64 primary key), ``embedding`` (FLOAT_VECTOR, metric IP) and optional INT64
scalar fields for filtered recall. Verbs: ``upsert``, ``search``, ``count``, ``drop``.
"""

from __future__ import annotations

import logging
import os
import re
import time
import warnings
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np
from tqdm import tqdm

from .config import section
from .errors import MilvusIndexError
from .recall import UserRecall, recall_top_k

logger = logging.getLogger(__name__)
T = TypeVar("T")
MAX_TOP_K = 16384  # Milvus's limit on limit (topk) and on nq per request
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,254}$")
_TRANSIENT = ("unavailable", "deadline", "connection", "timeout", "timed out", "closed", "reset")


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
        batch_size: int = 5000,
        scalar_fields: Sequence[str] = (),
        timeout: float = 10.0,
        retries: int = 3,
        create: bool = True,  # False: a missing collection is an error (serving must not invent one)
        consistency_level: str = "Session",
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
        self.scalar_fields = list(scalar_fields)
        self.timeout, self.retries = timeout, retries
        self.create = create
        # Session: a client reads its own writes at once; Strong makes every search on a server
        # wait for the next timestamp tick (~200 ms). Lite ignores the level.
        if consistency_level not in ("Strong", "Session", "Bounded", "Eventually"):
            raise MilvusIndexError(f"milvus.consistency_level {consistency_level!r}: expected Strong, "
                                   "Session, Bounded or Eventually")
        self.consistency_level = consistency_level
        self._client = self._connect(token)
        self._ensure_collection()

    @classmethod
    def from_config(cls, config: Mapping[str, Any], dim: int, collection: str | None = None,
                    **kwargs: Any) -> ItemIndex:
        """Build from the ``milvus.*`` keys of a flattened config."""
        return cls(
            uri=str(config.get("milvus.uri") or "output_milvus/milvus.db"),
            collection=collection or str(config.get("milvus.collection") or "mind_items"),
            dim=dim,
            token=str(config.get("milvus.token") or ""),
            metric=str(config.get("milvus.metric") or "IP"),
            index_type=str(config.get("milvus.index_type") or "FLAT"),
            index_params=section(config, "milvus.index_params"),
            search_params=section(config, "milvus.search_params"),
            consistency_level=str(config.get("milvus.consistency_level") or "Session"),
            batch_size=int(config.get("milvus.batch_size") or 5000),
            scalar_fields=config.get("milvus.scalar_fields") or (),
            **kwargs,
        )

    # -- connection -----------------------------------------------------------------------
    def _connect(self, token: str):
        pm = _pymilvus()
        if is_local_uri(self.uri):
            parent = os.path.dirname(os.path.abspath(self.uri))
            os.makedirs(parent, exist_ok=True)
        try:
            kwargs = {"uri": self.uri, "timeout": self.timeout}
            if token:
                kwargs["token"] = token
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return pm.MilvusClient(**kwargs)
        except Exception as exc:  # pymilvus raises several kinds; one clear message
            hint = ("is another process using this Milvus Lite file? Lite opens a .db in one "
                    "process only; use a Milvus server for several") if is_local_uri(self.uri) \
                else "is the server running and the uri/token right?"
            raise MilvusIndexError(f"cannot reach Milvus at {self.uri}: {_short(exc)} ({hint})") from None

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        """Run a client call; retry transient failures with backoff; wrap the rest."""
        for attempt in range(self.retries + 1):
            try:
                return fn()
            except MilvusIndexError:
                raise
            except Exception as exc:
                transient = any(w in str(exc).lower() for w in _TRANSIENT)
                if transient and attempt < self.retries:
                    delay = 0.2 * 2 ** attempt
                    logger.warning("Milvus %s failed (%s); retrying in %.1f s", what, _short(exc), delay)
                    time.sleep(delay)
                    continue
                prefix = f"cannot reach Milvus at {self.uri}" if transient else f"Milvus {what} failed"
                raise MilvusIndexError(f"{prefix}: {_short(exc)}") from None
        raise AssertionError("unreachable")

    # -- collection -----------------------------------------------------------------------
    def _ensure_collection(self) -> None:
        pm = _pymilvus()
        c, name = self._client, self.collection
        if self._call("has_collection", lambda: c.has_collection(name)):
            self._check_existing()
            self._call("load_collection", lambda: c.load_collection(name))
            return
        if not self.create:
            raise MilvusIndexError(f"no collection or alias {name!r} at {self.uri}; export the model "
                                   "into it first (paddlerec-milvus export)")
        schema = pm.MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("item_id", pm.DataType.INT64, is_primary=True)
        schema.add_field("embedding", pm.DataType.FLOAT_VECTOR, dim=self.dim)
        for field in self.scalar_fields:
            schema.add_field(field, pm.DataType.INT64)
        index_params = c.prepare_index_params()
        index_params.add_index(field_name="embedding", index_type=self.index_type,
                               metric_type=self.metric, params=dict(self.index_params))
        self._call("create_collection", lambda: c.create_collection(
            name, schema=schema, index_params=index_params,
            consistency_level=self.consistency_level))
        self._call("load_collection", lambda: c.load_collection(name))
        logger.info("created collection %s (dim %d, %s/%s) at %s", name, self.dim,
                    self.index_type, self.metric, self.uri)

    def _check_existing(self) -> None:
        c, name = self._client, self.collection
        desc = self._call("describe_collection", lambda: c.describe_collection(name))
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
        for idx in self._call("list_indexes", lambda: c.list_indexes(name)):
            info = self._call("describe_index", lambda idx=idx: c.describe_index(name, idx))
            metric = str(info.get("metric_type", "IP")).upper()
            if info.get("field_name", "embedding") == "embedding" and metric != self.metric:
                raise MilvusIndexError(
                    f"collection {name!r} at {self.uri} is indexed with metric {metric}, "
                    f"expected {self.metric}; drop it or use another milvus.collection")

    # -- verbs ----------------------------------------------------------------------------
    def upsert(self, ids: Sequence[int] | np.ndarray, vectors: np.ndarray,
               fields: Mapping[str, Sequence[int]] | None = None, progress: bool = True) -> int:
        """Insert or replace items by id, in batches; re-running never duplicates."""
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
        written = 0
        bar = tqdm(total=len(ids), desc=f"upsert {self.collection}", unit=" items",
                   disable=None if progress else True, mininterval=1.0)
        for s in range(0, len(ids), self.batch_size):
            rows = [{"item_id": int(i), "embedding": v}
                    for i, v in zip(ids[s:s + self.batch_size],
                                    vectors[s:s + self.batch_size].tolist())]
            for name, values in fields.items():
                for r, value in zip(rows, values[s:s + self.batch_size]):
                    r[name] = int(value)
            self._call("upsert", lambda rows=rows: self._client.upsert(self.collection, rows))
            written += len(rows)
            bar.update(len(rows))
        bar.close()
        return written

    def count(self) -> int:
        res = self._call("count", lambda: self._client.query(
            self.collection, filter="", output_fields=["count(*)"], consistency_level="Strong"))
        return int(res[0]["count(*)"]) if res else 0

    def delete(self, ids: Sequence[int]) -> None:
        ids = [int(i) for i in ids]
        if ids:
            self._call("delete", lambda: self._client.delete(self.collection, ids=ids))

    def drop(self) -> None:
        """Delete the collection and its data."""
        self._call("drop_collection", lambda: self._client.drop_collection(self.collection))

    def close(self) -> None:
        try:
            self._client.close()
        except Exception:  # closing a dead connection is not an error worth raising
            pass

    def __enter__(self) -> ItemIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def search_vectors(self, queries: np.ndarray, limit: int,
                       filter: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-``limit`` (ids, scores) per query, padded with -1/-inf when short."""
        q = np.asarray(queries, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise MilvusIndexError(f"query vectors must have shape [n, {self.dim}], got {list(q.shape)}")
        if not 1 <= limit <= MAX_TOP_K:
            raise MilvusIndexError(f"top_k {limit} out of range 1..{MAX_TOP_K}")
        ef = self.search_params.get("ef")
        if self.index_type == "HNSW" and ef is not None and ef < limit:
            raise MilvusIndexError(f"milvus.search_params.ef = {ef} must be >= top_k ({limit}) for HNSW")
        ids = np.full((len(q), limit), -1, dtype=np.int64)
        scores = np.full((len(q), limit), -np.inf, dtype=np.float32)
        params = {"metric_type": self.metric, "params": dict(self.search_params)}
        step = max(1, min(MAX_TOP_K, 65536 // limit, 2048))
        for s in range(0, len(q), step):
            chunk = q[s:s + step].tolist()
            res = self._call("search", lambda chunk=chunk: self._client.search(
                self.collection, data=chunk, limit=limit, filter=filter or "",
                search_params=params, anns_field="embedding",
                consistency_level=self.consistency_level,
                # without a timeout pymilvus retries an unreachable server for minutes; it bounds
                # its retries by time only when the timeout is an int
                timeout=max(1, round(self.timeout))))
            for r, hits in enumerate(res):
                row = [(h["id"], h["distance"]) for h in hits]
                if row:
                    hid, hsc = zip(*row)
                    ids[s + r, :len(row)] = hid
                    scores[s + r, :len(row)] = hsc
        return ids, scores

    def search(self, interests: np.ndarray, top_k: int,
               histories: Sequence[Collection[int]] | None = None,
               exclude_history: bool = False, filter: str | None = None) -> list[UserRecall]:
        """K interest vectors per user -> one merged top-k list per user."""
        return recall_top_k(self, interests, top_k, histories, exclude_history, filter)


def _short(exc: BaseException) -> str:
    text = str(exc).strip().replace("\n", " ")
    return text[:300] if text else type(exc).__name__
