"""What an export hands to a service: the folder layout, the manifest, the item map, and the one
set of serving limits. Services read this module only; they never import the export pipeline
(which pulls in the model zoo and a training-side Paddle)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np

from .errors import ConfigError

MANIFEST = "manifest.json"
ITEM_MAP = "item_map.tsv"  # header "item_id\traw_id", then dense id -> raw id
ITEM_VECTORS = "item_vectors.npy"  # row i = dense id i + 1
ENV = "PADDLEREC_MILVUS_"


@dataclass(frozen=True)
class Manifest:
    model_version: str
    epoch: int
    embedding_dim: int
    max_k: int
    maxlen: int
    item_count: int
    items_indexed: int
    milvus_uri: str
    collection: str  # what users name: the alias on a server, the collection on Lite
    physical_collection: str  # the collection that holds exactly this version's vectors
    model_file: str
    params_file: str
    # added to the scores of a request's own history items (recall.history_bonus; 0 = off).
    # Optional in the file: exports made before it have none.
    history_bonus: float = 0.0
    # the user tower reads each history's latest history_len clicks (recall.history_len; 0 = all
    # maxlen). Optional in the file, as history_bonus.
    history_len: int = 0

    @classmethod
    def load(cls, export_dir: str) -> Manifest:
        """Read ``manifest.json``; the folder also has item_map.tsv and item_vectors.npy."""
        path = os.path.join(export_dir, MANIFEST)
        if not os.path.isfile(path):
            raise ConfigError(f"no exported model at {export_dir} ({MANIFEST} missing; run "
                              "`paddlerec-milvus export` first)")
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            optional = {"history_bonus", "history_len"}
            out = cls(**{k: data[k] for k in cls.__dataclass_fields__ if k not in optional or k in data})
            if not (isinstance(out.history_bonus, (int, float)) and out.history_bonus >= 0):
                raise ValueError(f"history_bonus {out.history_bonus!r} must be a number >= 0")
            if isinstance(out.history_len, bool) or not isinstance(out.history_len, int) \
                    or not 0 <= out.history_len <= out.maxlen:
                raise ValueError(f"history_len {out.history_len!r} must be a whole number 0..maxlen")
            return out
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{path}: not a manifest written by `paddlerec-milvus export` "
                              f"({type(exc).__name__}: {exc})") from None


def manifest_stamp(export_dir: str) -> tuple[int, int, int] | None:
    """Identity of the export's manifest file (inode, mtime, size): an export replaces the
    whole folder by a rename, so a new version always has a new stamp. None if absent."""
    try:
        st = os.stat(os.path.join(export_dir, MANIFEST))
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def read_export_item_map(export_dir: str, item_count: int) -> np.ndarray:
    """raw id per dense id (index 0 = padding), from an export folder."""
    path = os.path.join(export_dir, ITEM_MAP)
    raw = np.zeros(item_count, dtype=np.int64)
    try:
        with open(path, encoding="utf-8") as f:
            next(f)
            for line in f:
                d, r = line.split("\t")
                raw[int(d)] = int(r)
    except (OSError, StopIteration, ValueError, IndexError) as exc:
        raise ConfigError(f"{path}: cannot read the export's item map ({type(exc).__name__}: {exc})") \
            from None
    return raw


@dataclass(frozen=True)
class ServingLimits:
    """The limits of one request, shared by the REST API and the pipeline."""

    max_users: int = 256  # history rows per request
    max_history: int = 1000  # item ids per row accepted (the model reads the newest maxlen)
    max_top_k: int = 1000
    default_top_k: int = 50
    max_upsert: int = 10000  # items per /rec/upsert_items call
    max_body_bytes: int = 8 * 1024 * 1024  # request bodies, chunked ones included
    milvus_timeout: float = 10.0  # the worst case for all Milvus work of one request, retries included
    milvus_retries: int = 2  # retries of a transient Milvus failure within that time
    # micro-batching (paddlerec_milvus.batching): concurrent requests share one tower call and one
    # Milvus search; 0 = every request runs alone (the unbatched path)
    batch_max_users: int = 64  # history rows per batch
    batch_window_ms: float = 1.0  # once requests overlap, wait this long for more (a lone one never waits)
    queue_max_users: int = 256  # users waiting per stage; past it a request is refused (HTTP 429, err_no 54)
    request_timeout: float = 10.0  # a request's deadline (a request may ask for less: timeout_ms)
    max_inflight: int = 64  # recall requests in the service at once; past it 429 at once

    _ENV_NAMES = {"max_users": "MAX_USERS", "max_history": "MAX_HISTORY", "max_top_k": "MAX_TOP_K",
                  "default_top_k": "DEFAULT_TOP_K", "max_upsert": "MAX_UPSERT",
                  "max_body_bytes": "MAX_BODY_BYTES", "milvus_timeout": "TIMEOUT",
                  "milvus_retries": "MILVUS_RETRIES", "batch_max_users": "BATCH_MAX_USERS",
                  "batch_window_ms": "BATCH_WINDOW_MS", "queue_max_users": "QUEUE_MAX_USERS",
                  "request_timeout": "REQUEST_TIMEOUT", "max_inflight": "MAX_INFLIGHT"}
    _FLOATS = frozenset({"milvus_timeout", "batch_window_ms", "request_timeout"})
    _ZERO_OK = frozenset({"milvus_retries", "batch_max_users", "batch_window_ms"})

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            kind = float if f.name in self._FLOATS else int
            if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                    (kind is int and not isinstance(value, int)):
                raise ConfigError(f"serving limit {f.name} = {value!r} must be {kind.__name__}")
            low = 0 if f.name in self._ZERO_OK else 1e-3 if kind is float else 1
            if value < low:
                raise ConfigError(f"serving limit {f.name} = {value!r} must be >= {low:g}")
        if self.default_top_k > self.max_top_k:
            raise ConfigError(f"default_top_k {self.default_top_k} > max_top_k {self.max_top_k}")

    def with_values(self, source: str, values: dict[str, Any]) -> ServingLimits:
        unknown = set(values) - {f.name for f in fields(self)}
        if unknown:
            raise ConfigError(f"{source}: unknown serving limits {sorted(unknown)} "
                              f"(known: {sorted(f.name for f in fields(self))})")
        return replace(self, **values)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> ServingLimits:
        """Defaults, then ``PADDLEREC_MILVUS_MAX_USERS`` etc.; a bad value names the variable."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for name, var in cls._ENV_NAMES.items():
            raw = env.get(ENV + var)
            if not raw:
                continue
            kind = float if name in cls._FLOATS else int
            try:
                values[name] = kind(raw)
            except ValueError:
                what = "a number" if kind is float else "an integer"
                raise ConfigError(f"{ENV + var}={raw!r} is not {what}") from None
        try:
            return cls(**values)
        except ConfigError as exc:
            raise ConfigError(f"environment: {exc}") from None

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}
