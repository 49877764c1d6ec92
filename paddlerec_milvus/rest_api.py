"""The REST API of the original design, on the one recall core (``RecallService``).

``POST /rec/insert_data``, ``/rec/recall``, ``/rec/count``, ``/rec/drop`` (also ``/qa/drop``),
plus ``/rec/interests`` and ``/rec/upsert_items`` for real-time items, ``/items`` title look-ups
for the demo page at ``/``, ``GET /health`` and the OpenAPI page at ``/docs``.

Settings come from arguments or ``PADDLEREC_MILVUS_*`` environment variables (see
``ApiSettings.from_env``). Milvus Lite opens a ``.db`` file in one process only: run one
API process per Lite file, or point it at a Milvus server.
"""

import csv
import gzip
import hmac
import html
import json
import logging
import os
import threading
import time
from collections.abc import Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, ValidationError
from starlette.concurrency import run_in_threadpool

from .errors import (
    AliasInUse,
    CollectionUnavailable,
    ConfigError,
    DeadlineExceeded,
    MilvusIndexError,
    MilvusRequestRejected,
    MilvusUnavailable,
    Overloaded,
    PaddleRecMilvusError,
    RequestError,
)
from .milvus_index import MAX_TOP_K, ItemIndex, deadline_scope, is_local_uri
from .serving_contract import ENV, ITEM_VECTORS, Manifest, ServingLimits, manifest_stamp

logger = logging.getLogger(__name__)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_EXPORT_DIR = os.path.join(REPO_ROOT, "output", "export")
DEFAULT_TITLES = os.path.join(REPO_ROOT, "models", "mind", "data", "demo_titles.csv.gz")
DEFAULT_STATIC_DIR = os.path.join(REPO_ROOT, "serving", "static")
INT64_MAX = 2**63 - 1


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")
MUTATING = ("/rec/insert_data", "/rec/upsert_items", "/rec/drop", "/qa/drop")


@dataclass
class ApiSettings:
    """Where the model, Milvus and titles are, the request limits, and who may change data."""

    export_dir: str = DEFAULT_EXPORT_DIR
    milvus_uri: str | None = None  # None: the uri in the export's manifest
    collection: str | None = None  # None: the collection in the export's manifest
    token: str = ""  # Milvus token
    titles_path: str | None = DEFAULT_TITLES  # CSV(.gz) "item,title"; None/missing: ids only
    static_dir: str | None = DEFAULT_STATIC_DIR  # the demo page; None/missing: no page
    limits: ServingLimits = field(default_factory=ServingLimits)
    api_token: str = ""  # required on mutating endpoints when set (Authorization: Bearer ...)
    allowed_hosts: tuple[str, ...] = LOOPBACK_HOSTS  # Host header names served; ("*",) = any
    allowed_origins: tuple[str, ...] = ()  # browser origins allowed to call mutating endpoints

    @classmethod
    def from_env(cls, **overrides: Any) -> "ApiSettings":
        """Defaults, then ``PADDLEREC_MILVUS_*`` variables, then non-None ``overrides``."""
        env = os.environ
        values: dict[str, Any] = {}
        strings = {"export_dir": "EXPORT_DIR", "milvus_uri": "URI", "collection": "COLLECTION",
                   "token": "TOKEN", "titles_path": "TITLES", "static_dir": "STATIC_DIR",
                   "api_token": "API_TOKEN"}
        for name, var in strings.items():
            if env.get(ENV + var):
                values[name] = env[ENV + var]
        for name, var in (("allowed_hosts", "ALLOWED_HOSTS"), ("allowed_origins", "ALLOWED_ORIGINS")):
            if env.get(ENV + var):
                values[name] = tuple(h.strip() for h in env[ENV + var].split(",") if h.strip())
        values["limits"] = ServingLimits.from_env(env)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def load_titles(path: str | None) -> dict[int, str]:
    """``item,title`` CSV (optionally gzipped) -> {raw item id: title}; {} when absent."""
    if not path or not os.path.isfile(path):
        if path:
            logger.warning("no titles file at %s: the demo page will show item ids only", path)
        return {}
    opener = gzip.open if path.endswith(".gz") else open
    titles: dict[int, str] = {}
    with opener(path, "rt", encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            try:
                titles[int(row["item"])] = html.unescape(row.get("title") or "").strip()
            except (KeyError, ValueError, TypeError):
                continue
    logger.info("loaded %d item titles from %s", len(titles), path)
    return titles


# -- response models (request models depend on the limits: see _request_models) ---------------
class ErrorBody(BaseModel):
    detail: str = Field(description="what is wrong, in one sentence")
    errors: list[dict[str, Any]] | None = Field(None, description="each invalid field (422 only)")


class RecallResponse(BaseModel):
    items: list[list[int]] = Field(description="recalled raw item ids, one list per history row")
    scores: list[list[float]] | None = Field(None, description="inner-product scores (with_scores)")
    titles: list[list[str | None]] | None = Field(None, description="item titles (with_titles)")
    top_k: int
    notes: list[str] = Field(default_factory=list, description="e.g. unknown history ids ignored")
    model_version: str = Field(description="the export whose user tower and item vectors answered")
    took_ms: float


class InterestsResponse(BaseModel):
    interests: list[list[list[float]]] = Field(description="[rows][K][dim] interest vectors")
    notes: list[str] = Field(default_factory=list)
    model_version: str


class WriteResponse(BaseModel):
    written: int = Field(description="item vectors written by this call")
    count: int = Field(description="item vectors in the collection now")
    collection: str
    model_version: str
    took_ms: float


class CountResponse(BaseModel):
    count: int
    collection: str
    model_version: str


class DropResponse(BaseModel):
    dropped: bool
    collection: str
    count: int


class HealthResponse(BaseModel):
    status: str = Field(description='"ok", or "degraded" when recall would fail or answer nothing')
    model_loaded: bool
    model_version: str | None
    embedding_dim: int | None
    interests_per_user: int | None
    milvus_reachable: bool
    milvus_uri: str | None
    collection: str | None
    count: int | None
    error: str | None = None
    alias_target: str | None = Field(None, description="what the serving alias points at (a server)")
    limits: dict[str, float]
    batching: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="per stage: queued users, batches run, mean requests per batch, "
                                          "requests refused (429) and dropped past their deadline")


class ItemTitle(BaseModel):
    item_id: int
    title: str | None
    known: bool = Field(description="the model has this item (it can be part of a history)")


class ItemsResponse(BaseModel):
    items: list[ItemTitle]


class SearchResponse(BaseModel):
    items: list[ItemTitle]
    total_matches: int


# -- request models: the service's limits are checked by the service (one set for every front end)
item_id = Annotated[StrictInt, Field(ge=0, le=INT64_MAX)]
History = Annotated[list[item_id], Field(min_length=1)]
Histories = Annotated[list[History], Field(min_length=1, description="one list of clicked item ids per "
                                                                     "user, oldest first (the newest "
                                                                     "`maxlen` are used)")]


class RecallRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "examples": [{"top_k": 50, "hist_item": [[43, 23, 65], [675, 3456]]}]})
    top_k: StrictInt | None = Field(None, ge=1, le=MAX_TOP_K, description="items per row (default: "
                                    "the service's default_top_k; at most its max_top_k, see /health)")
    hist_item: Histories
    with_scores: StrictBool = False
    with_titles: StrictBool = False
    exclude_history: StrictBool = Field(False, description="drop items already in the row's history")
    filter: str | None = Field(None, max_length=4096,
                               description="boolean expression over item_id (and the collection's scalar "
                                           "fields): == != < <= > >= in [..] and or not, parentheses")
    timeout_ms: StrictInt | None = Field(None, ge=1, le=600_000,
                                         description="this request's deadline (at most the service's "
                                                     "request_timeout): past it, a queued request is "
                                                     "dropped and answered 503")


class InterestsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hist_item: Histories


class UpsertRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    item_id: Annotated[list[Annotated[StrictInt, Field(ge=1, le=INT64_MAX)]],
                       Field(min_length=1, description="raw item ids")]
    embedding: Annotated[list[list[Annotated[StrictFloat, Field(allow_inf_nan=False)]]],
                         Field(min_length=1, description="one vector of the model's dim per item")]


def _field_path(loc: tuple[Any, ...]) -> str:
    parts = [p for p in loc if p not in ("body", "query", "path")]
    text = ""
    for p in parts:
        text += f"[{p}]" if isinstance(p, int) else (f".{p}" if text else str(p))
    return text or "body"


class _State:
    """What the app holds: the recall service (None until started), titles, a write lock."""

    def __init__(self, settings: ApiSettings):
        self.settings = settings
        self.service: Any = None
        self.titles: dict[int, str] = {}
        self.search_keys: list[tuple[int, str]] = []
        self.write_lock = threading.Lock()

    def start(self, service: Any = None) -> None:
        from .service import RecallService

        s = self.settings
        self.service = service or RecallService(
            s.export_dir, milvus_uri=s.milvus_uri, collection=s.collection, token=s.token,
            limits=s.limits)
        self.titles = load_titles(s.titles_path)
        known = set(self.service.dense_of)
        self.search_keys = sorted(((i, t.lower()) for i, t in self.titles.items() if i in known),
                                  key=lambda it: (len(it[1]), it[0]))
        try:  # connect now (and start Milvus Lite) so the first request is fast; not fatal
            logger.info("collection %s holds %d item vectors", self.service.collection,
                        self.service.index.count())
        except MilvusIndexError as exc:
            self.service.reset_index()
            logger.warning("Milvus not ready at startup (requests answer 503 until it is): %s", exc)

    def stop(self) -> None:
        if self.service is not None:
            self.service.close()
            self.service = None


def _state(request: Request) -> _State:
    return request.app.state.api


def _service(request: Request) -> Any:
    service = _state(request).service
    if service is None:
        raise MilvusUnavailable("the model is not loaded: the service is starting or stopping")
    return service


def _ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000, 2)


# -- the guard: hosts, body size (chunked too), and who may change data -------------------------
class RequestGuard:
    """Pure ASGI middleware, so it sees the body as it streams: a chunked body cannot slip past
    the size limit. Checks the Host header (DNS rebinding), and for mutating endpoints a JSON
    content type (a form post from another site cannot send one without CORS), the Origin
    (another site's page) and the API token when one is configured."""

    def __init__(self, app: Any, settings: ApiSettings):
        self.app, self.s = app, settings
        self.any_host = "*" in settings.allowed_hosts
        self.recalls_in_flight = 0  # one event loop: no lock needed

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host = headers.get("host", "")
        problem = self._check(scope, headers, host)
        if problem:
            return await _send_json(send, *problem)
        if scope["path"] == "/rec/recall" and scope["method"] == "POST":
            scope.setdefault("state", {})["arrival"] = time.monotonic()  # the deadline counts from here
            data = await self._read_body(receive, send, headers)
            if data is None:
                return None
            # past max_inflight, refuse at once: a refusal must cost far less than an answer, or
            # overload would still pile up in the event loop. The body is read, so the connection
            # stays open (a client that reconnects after every refusal costs the server more).
            limit = self.s.limits.max_inflight
            if self.recalls_in_flight >= limit:
                return await _send_json(send, 429, f"overloaded: {limit} recall requests already in "
                                                   "progress; retry shortly", {"Retry-After": "1"},
                                        close=False)
            self.recalls_in_flight += 1
            try:  # the hot path: answered here, without FastAPI's routing and per-request stack
                return await recall_endpoint(scope["app"].state.api, scope, headers, data, send)
            finally:
                self.recalls_in_flight -= 1
        data = await self._read_body(receive, send, headers)
        if data is None:
            return None
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": data, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    async def _read_body(self, receive: Any, send: Any, headers: dict[str, str]) -> bytes | None:
        """The whole body, or None when it was refused (too large, bad length) or the client left."""
        limit = self.s.limits.max_body_bytes
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                await _send_json(send, 400, "invalid Content-Length header")
                return None
            if int(length) > limit:
                await _send_json(send, 413, f"request body of {length} bytes is over the limit of "
                                            f"{limit} bytes")
                return None
        body, more = [], True
        size = 0
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await _send_json(send, 413, f"request body is over the limit of {limit} bytes (chunked)")
                return None
            body.append(chunk)
            more = message.get("more_body", False)
        return b"".join(body)

    def _check(self, scope: dict, headers: dict[str, str], host: str) -> tuple[int, str, dict] | None:
        name = _host_name(host)
        if not self.any_host and name not in self.s.allowed_hosts:
            return 400, (f"Host {host!r} is not served here (allowed: {', '.join(self.s.allowed_hosts)}; "
                         f"set {ENV}ALLOWED_HOSTS)"), {}
        if scope["method"] != "POST" or scope["path"] not in MUTATING:
            return None
        origin = headers.get("origin")
        if origin is not None and origin not in self.s.allowed_origins and \
                _origin_authority(origin) != host.lower():
            return 403, (f"Origin {origin!r} may not change the collection (allowed: this server, "
                         f"{ENV}ALLOWED_ORIGINS)"), {}
        if headers.get("sec-fetch-site") == "cross-site" and origin not in self.s.allowed_origins:
            return 403, "cross-site requests may not change the collection", {}
        ctype = headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            return 415, (f"{scope['path']} changes data and needs Content-Type: application/json "
                         f"(got {ctype or 'none'}); send a JSON body, e.g. {{}}"), {}
        if self.s.api_token:
            auth = headers.get("authorization", "")
            given = auth[7:] if auth.lower().startswith("bearer ") else headers.get("x-api-token", "")
            if not hmac.compare_digest(given.encode(), self.s.api_token.encode()):
                return 401, f"{scope['path']} needs the API token (Authorization: Bearer ...)", \
                    {"www-authenticate": "Bearer"}
        return None


def _host_name(host: str) -> str:
    host = host.strip().lower()
    if host.startswith("["):
        return host[:host.find("]") + 1]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _origin_authority(origin: str) -> str:
    return origin.split("://", 1)[-1].rstrip("/").lower()


async def _send_json(send: Any, status: int, detail: str, extra: dict[str, str] | None = None,
                     close: bool = True) -> None:
    """``{"detail": ...}``; by default the connection closes (a refusal before the body was read)."""
    await _send_body(send, status, json.dumps({"detail": detail}).encode(), extra, close=close)


async def _send_body(send: Any, status: int, body: bytes, extra: dict[str, str] | None = None,
                     close: bool = False) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    headers += [(k.encode(), v.encode()) for k, v in (extra or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


# -- errors: one mapping from the typed errors to HTTP ----------------------------------------------
def _status_of(exc: BaseException) -> int:
    if isinstance(exc, (RequestError, MilvusRequestRejected)):
        return 400
    if isinstance(exc, DeadlineExceeded):
        return 503
    if isinstance(exc, Overloaded):
        return 429
    if isinstance(exc, (MilvusIndexError, ConfigError)):
        return 503
    return 500


def validation_body(errs: Sequence[Any]) -> dict[str, Any]:
    """422's body: the first problem in one sentence (field path, what is wrong, the value),
    and every problem's location, message and type."""
    first = errs[0] if errs else {}
    msg = f"{_field_path(tuple(first.get('loc', ())))}: {first.get('msg', 'invalid request')}"
    if first.get("type") == "json_invalid":
        loc = first.get("loc", ())
        where = f" at character {loc[-1]}" if loc and isinstance(loc[-1], int) else ""
        why = (first.get("ctx") or {}).get("error", "parse error")
        msg = f"the request body is not valid JSON ({why}{where})"
    if "input" in first and first.get("type") not in ("missing", "list_too_long", "json_invalid"):
        shown = repr(first["input"])
        msg += f" (got {shown[:80]}{'...' if len(shown) > 80 else ''})"
    if len(errs) > 1:
        msg += f"; and {len(errs) - 1} more problem(s)"
    slim = [{k: e[k] for k in ("loc", "msg", "type") if k in e} for e in errs[:20]]
    return {"detail": msg, "errors": jsonable_encoder(slim)}


async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse(validation_body(exc.errors()), status_code=422)


def _error_reply(method: str, path: str, exc: PaddleRecMilvusError) -> tuple[int, dict[str, str] | None]:
    """Status and headers of a typed error (5xx logged), for the FastAPI handler and recall_endpoint."""
    status = _status_of(exc)
    if status >= 500:
        logger.warning("%s %s: %s", method, path, exc)
    return status, ({"Retry-After": "1"} if status in (429, 503) else None)


async def on_our_error(request: Request, exc: PaddleRecMilvusError) -> JSONResponse:
    status, headers = _error_reply(request.method, request.url.path, exc)
    return JSONResponse({"detail": str(exc)}, status_code=status, headers=headers)


# -- the endpoints ------------------------------------------------------------------------------
router = APIRouter()


@router.post("/rec/recall", response_model=RecallResponse, tags=["recall"],
             summary="Recall top_k items for each history row")
async def recall(req: RecallRequest, request: Request) -> dict[str, Any]:
    """Each row of ``hist_item`` (a user's clicked raw item ids) -> K interest vectors ->
    K Milvus searches -> one merged list of raw item ids, best first. Concurrent requests are
    micro-batched (one tower call, one search); each gets its own answer."""
    # RequestGuard answers POST /rec/recall itself (recall_endpoint); this declaration gives the
    # schema and /docs, and serves the app when it runs without the guard
    return await _recall(_state(request), req, getattr(request.state, "arrival", None))


async def _recall(state: _State, req: RecallRequest, arrival: float | None) -> dict[str, Any]:
    t0 = time.perf_counter()
    service = state.service
    if service is None:
        raise MilvusUnavailable("the model is not loaded: the service is starting or stopping")
    args = (req.hist_item, req.top_k, req.exclude_history, req.filter, req.timeout_ms)
    if service.batching:  # checked here, then awaited: no thread waits for the batch
        ans = await service.recall_async(service.prepare(*args, arrival=arrival))
    else:
        ans = await run_in_threadpool(service.recall, *args, arrival=arrival)
    titles = [[state.titles.get(i) for i in row] for row in ans.items] if req.with_titles else None
    return {"items": ans.items, "scores": ans.scores if req.with_scores else None, "titles": titles,
            "top_k": req.top_k or state.settings.limits.default_top_k, "notes": ans.notes,
            "model_version": ans.model_version, "took_ms": _ms(t0)}


def _is_json(content_type: str | None) -> bool:
    if content_type is None:
        return True  # no type given: read it as JSON
    media = content_type.split(";")[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


async def recall_endpoint(state: _State, scope: dict, headers: dict[str, str], body: bytes,
                          send: Any) -> None:
    """``POST /rec/recall`` as plain ASGI, with the same validation (the pydantic model, parsed
    from the bytes by pydantic-core) and the same answers and errors as the FastAPI route: at a
    few hundred requests a second per core, FastAPI's routing, dependency solving and response
    re-validation cost more than the batched tower and search."""
    if not _is_json(headers.get("content-type")):
        return await _send_json(send, 415, f"/rec/recall needs a JSON body (Content-Type: "
                                           f"application/json; got {headers['content-type']!r})", close=False)
    if not body.strip():
        return await _send_body(send, 422, json.dumps({"detail": (
            "the request body is empty: send a JSON object with hist_item, e.g. "
            '{"top_k": 50, "hist_item": [[43, 23, 65]]}'), "errors": [
            {"loc": ["body"], "msg": "Field required", "type": "missing"}]}).encode())
    try:
        req = RecallRequest.model_validate_json(body)
    except ValidationError as exc:
        errs = [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)]
        return await _send_body(send, 422, json.dumps(validation_body(errs)).encode())
    try:
        answer = await _recall(state, req, scope.get("state", {}).get("arrival"))
    except PaddleRecMilvusError as exc:
        status, extra = _error_reply("POST", "/rec/recall", exc)
        return await _send_json(send, status, str(exc), extra, close=False)
    except Exception as exc:  # noqa: BLE001 - a bug answers 500 and the server keeps serving
        logger.exception("POST /rec/recall failed")
        return await _send_json(send, 500, f"internal error: {type(exc).__name__}", close=False)
    await _send_body(send, 200, json.dumps(answer, separators=(",", ":")).encode())


@router.post("/rec/interests", response_model=InterestsResponse, tags=["recall"],
             summary="The K interest vectors of each history row")
def interests(req: InterestsRequest, request: Request) -> InterestsResponse:
    """What recall searches Milvus with: ``[rows][K][dim]`` vectors from the user tower."""
    service = _service(request)
    version = service.current()
    vecs, notes = service.interests(req.hist_item, version)
    return InterestsResponse(interests=np.asarray(vecs, dtype=np.float64).tolist(), notes=notes,
                             model_version=version.version)


def _write(request: Request, ids: np.ndarray, vectors: np.ndarray) -> WriteResponse:
    t0 = time.perf_counter()
    service = _service(request)
    version = service.current()
    with _state(request).write_lock, deadline_scope(service.limits.milvus_timeout):
        # after /rec/drop on Lite the collection is gone and this brings it back; on a server a
        # missing versioned collection was pruned: re-creating it would serve a fragment
        create = is_local_uri(version.uri) or version.collection == version.manifest.collection
        index = ItemIndex(version.uri, version.collection, version.manifest.embedding_dim,
                          token=_state(request).settings.token, timeout=service.limits.milvus_timeout,
                          retries=service.limits.milvus_retries, create=create)
        try:
            written = index.upsert(ids, vectors, progress=False)
            count = index.count()
        finally:
            index.close()
    logger.info("upserted %d item vectors into %s (%d now)", written, version.collection, count)
    return WriteResponse(written=written, count=count, collection=version.collection,
                         model_version=version.version, took_ms=_ms(t0))


@router.post("/rec/insert_data", response_model=WriteResponse, tags=["collection"],
             summary="Write the exported model's item vectors into Milvus (idempotent)")
def insert_data(request: Request) -> WriteResponse:
    """Upsert every item vector of the exported model, keyed by raw item id. Re-running
    never duplicates; after ``/rec/drop`` it re-creates the collection."""
    service = _service(request)
    version = service.current()
    if manifest_stamp(service.export_dir) != version.stamp:  # the folder holds another export
        raise MilvusUnavailable(f"a new export in {service.export_dir} is being loaded; retry shortly")
    vectors = np.load(os.path.join(service.export_dir, ITEM_VECTORS))
    return _write(request, np.asarray(version.raw_ids[1:], dtype=np.int64), vectors)


@router.post("/rec/upsert_items", response_model=WriteResponse, tags=["collection"],
             summary="Insert or replace item vectors (real-time new items)")
def upsert_items(req: UpsertRequest, request: Request) -> WriteResponse:
    """New or changed items are recallable by the next request."""
    service = _service(request)
    dim, limit = service.manifest.embedding_dim, service.limits.max_upsert
    if len(req.item_id) > limit:
        raise RequestError(f"{len(req.item_id)} items in one call; the limit is {limit}")
    if len(req.item_id) != len(req.embedding):
        raise RequestError(f"{len(req.item_id)} item ids but {len(req.embedding)} embeddings")
    if len(set(req.item_id)) != len(req.item_id):
        raise RequestError("item_id has duplicates")
    bad = next((i for i, v in enumerate(req.embedding) if len(v) != dim), None)
    if bad is not None:
        raise RequestError(f"embedding[{bad}] has {len(req.embedding[bad])} values; the model's dim is {dim}")
    vectors = np.asarray(req.embedding, dtype=np.float64)
    if not np.all(np.isfinite(vectors.astype(np.float32))):
        raise RequestError("embedding values must fit in float32 (|x| < 3.4e38)")
    return _write(request, np.asarray(req.item_id, dtype=np.int64), vectors.astype(np.float32))


@router.post("/rec/count", response_model=CountResponse, tags=["collection"],
             summary="Number of item vectors in the collection")
def count(request: Request) -> CountResponse:
    service = _service(request)
    version = service.current()
    with deadline_scope(service.limits.milvus_timeout):
        index = None
        try:
            index = version.index()
            n = index.count()
        except CollectionUnavailable:  # dropped: it holds nothing (recall says 503 with the cause)
            version.reset_index(index)
            n = 0
        except MilvusIndexError:
            version.reset_index(index)
            raise
    return CountResponse(count=n, collection=version.collection, model_version=version.version)


def drop(request: Request) -> DropResponse:
    """Delete the collection's data (count becomes 0); ``/rec/insert_data`` refills it. Needs a
    JSON content type, this server's origin, and the API token when one is configured."""
    service = _service(request)
    version = service.current()
    with _state(request).write_lock, deadline_scope(service.limits.milvus_timeout):
        index = version.index()
        try:
            if version.collection != version.manifest.collection:
                raise AliasInUse("a version behind the serving alias")  # dropping it would drop the alias
            index.drop()
            logger.info("dropped collection %s", version.collection)
        except AliasInUse:  # keep the collection and its alias: delete the rows
            index.clear()
            # Strong: returns once the delete is applied, and this index's session (searches
            # of the next requests) has seen it
            left = index.count()
            logger.info("deleted every item of %s (the alias %s stays; %d left)", version.collection,
                        version.manifest.collection, left)
            return DropResponse(dropped=True, collection=version.collection, count=left)
        except MilvusIndexError:
            version.reset_index()
            raise
        version.reset_index()
    return DropResponse(dropped=True, collection=version.collection, count=0)


for _path in MUTATING[2:]:
    router.post(_path, response_model=DropResponse, tags=["collection"],
                summary="Delete the collection's data (count becomes 0)")(drop)


@router.get("/health", response_model=HealthResponse, tags=["service"],
            responses={503: {"model": HealthResponse, "description": "recall would fail or be empty"}})
def health(request: Request) -> JSONResponse:
    """200 "ok" only when recall would answer items; else 503 "degraded" with the reason."""
    state = _state(request)
    service = state.service
    lim = state.settings.limits
    body: dict[str, Any] = {
        "status": "degraded", "model_loaded": service is not None, "model_version": None,
        "embedding_dim": None, "interests_per_user": None, "milvus_reachable": False,
        "milvus_uri": None, "collection": None, "count": None, "error": None,
        "limits": {"max_users": lim.max_users, "max_history": lim.max_history,
                   "max_top_k": min(lim.max_top_k, MAX_TOP_K), "default_top_k": lim.default_top_k,
                   "max_upsert": lim.max_upsert, "max_body_bytes": lim.max_body_bytes,
                   "batch_max_users": lim.batch_max_users, "batch_window_ms": lim.batch_window_ms,
                   "queue_max_users": lim.queue_max_users, "request_timeout": lim.request_timeout}}
    if service is None:
        body["error"] = "model not loaded"
        return JSONResponse(body, status_code=503)
    m = service.manifest
    body.update(embedding_dim=m.embedding_dim, interests_per_user=m.max_k)
    body.update(service.health())
    body["batching"] = service.batch_stats()
    return JSONResponse(body, status_code=200 if body["status"] == "ok" else 503)


@router.get("/items/search", response_model=SearchResponse, tags=["items"],
            summary="Find items the model knows by part of their title (or by id)")
def search_items(request: Request, q: Annotated[str, Query(min_length=1, max_length=200)],
                 limit: Annotated[int, Query(ge=1, le=100)] = 20) -> SearchResponse:
    """Case-insensitive substring match; titles that start with the text come first."""
    state = _state(request)
    needle = q.strip().lower()
    service = _service(request)
    found: list[int] = []
    if needle.isdigit() and int(needle) in service.dense_of:
        found.append(int(needle))
    if needle:
        starts = [i for i, t in state.search_keys if t.startswith(needle)]
        inside = [i for i, t in state.search_keys if needle in t and not t.startswith(needle)]
        found += [i for i in starts + inside if i not in found]
    return SearchResponse(items=[ItemTitle(item_id=i, title=state.titles.get(i), known=True)
                                 for i in found[:limit]], total_matches=len(found))


@router.get("/items", response_model=ItemsResponse, tags=["items"], summary="Titles of item ids")
def items(request: Request, ids: Annotated[list[Annotated[int, Field(ge=0, le=INT64_MAX)]],
                                           Query(min_length=1, max_length=1000)]) -> ItemsResponse:
    state = _state(request)
    known = _service(request).dense_of
    return ItemsResponse(items=[ItemTitle(item_id=i, title=state.titles.get(i), known=i in known)
                                for i in ids])


def create_app(settings: ApiSettings | None = None, **overrides: Any) -> FastAPI:
    """The FastAPI app. ``settings`` (or ``ApiSettings.from_env(**overrides)``) says where the
    export, Milvus and titles are; the model loads when the app starts (lifespan)."""
    s = settings or ApiSettings.from_env(**overrides)
    Manifest.load(os.path.abspath(s.export_dir))  # no export: one clear error before serving
    state = _State(s)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.start()
        try:
            yield
        finally:
            state.stop()
            logger.info("REST API stopped")

    errors = {400: {"model": ErrorBody, "description": "invalid request (the detail says why)"},
              401: {"model": ErrorBody, "description": "the API token is missing or wrong"},
              403: {"model": ErrorBody, "description": "another site's page may not change data"},
              413: {"model": ErrorBody, "description": "request body too large"},
              415: {"model": ErrorBody, "description": "a mutating request needs a JSON body"},
              422: {"model": ErrorBody, "description": "request body does not match the schema"},
              429: {"model": ErrorBody, "description": "overloaded: retry after Retry-After seconds"},
              503: {"model": ErrorBody, "description": "Milvus cannot be reached, or the collection "
                                                       "is missing or empty"}}
    app = FastAPI(title="paddlerec-milvus REST API", version="1.1",
                  description="MIND multi-interest recall: a user's clicks -> K interest vectors -> "
                              "Milvus searches -> one merged list of raw item ids.",
                  lifespan=lifespan, responses=errors)
    app.state.api = state
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(PaddleRecMilvusError, on_our_error)
    app.include_router(router)
    static = s.static_dir
    if static and os.path.isfile(os.path.join(static, "index.html")):
        app.mount("/static", StaticFiles(directory=static), name="static")
        index_html = os.path.join(static, "index.html")
        app.add_api_route("/", lambda: FileResponse(index_html), include_in_schema=False)
    else:
        logger.warning("no demo page (no index.html in %s)", static)
    app.add_middleware(RequestGuard, settings=s)  # outermost of ours: bodies as they stream
    return app


def run_api(host: str = "127.0.0.1", port: int = 8000, export_dir: str | None = None,
            milvus_uri: str | None = None, collection: str | None = None,
            log_level: str = "info") -> int:
    """Serve the REST API with uvicorn in the foreground until Ctrl-C; returns an exit code."""
    import uvicorn

    settings = ApiSettings.from_env(export_dir=export_dir, milvus_uri=milvus_uri, collection=collection)
    if host not in LOOPBACK_HOSTS and settings.allowed_hosts == LOOPBACK_HOSTS:
        logger.warning("serving on %s: requests must name this machine in Host; set %sALLOWED_HOSTS "
                       "(e.g. recall.example.com) or '*'", host, ENV)
    if host not in LOOPBACK_HOSTS and not settings.api_token:
        logger.warning("serving on %s without %sAPI_TOKEN: anyone who can reach it may drop the "
                       "collection", host, ENV)
    app = create_app(settings)  # ConfigError (no export yet) surfaces as a one-line CLI error
    logger.info("REST API on http://%s:%d (demo page /, OpenAPI /docs)", host, port)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, workers=1,
                            timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    try:
        server.run()  # handles SIGINT/SIGTERM itself: finishes requests, then the lifespan closes Milvus
    except KeyboardInterrupt:
        pass
    return 0 if server.started else 1
