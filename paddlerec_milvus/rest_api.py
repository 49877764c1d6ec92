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
import html
import logging
import os
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from types import SimpleNamespace
from typing import Annotated, Any

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt

from .errors import MilvusIndexError, RequestError

logger = logging.getLogger(__name__)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_EXPORT_DIR = os.path.join(REPO_ROOT, "output", "export")
DEFAULT_TITLES = os.path.join(REPO_ROOT, "models", "mind", "data", "demo_titles.csv.gz")
DEFAULT_STATIC_DIR = os.path.join(REPO_ROOT, "serving", "static")
INT64_MAX = 2**63 - 1
ENV = "PADDLEREC_MILVUS_"


@dataclass
class ApiSettings:
    """Where the model, Milvus and titles are, and the limits on one request."""

    export_dir: str = DEFAULT_EXPORT_DIR
    milvus_uri: str | None = None  # None: the uri in the export's manifest
    collection: str | None = None  # None: the collection in the export's manifest
    token: str = ""
    titles_path: str | None = DEFAULT_TITLES  # CSV(.gz) "item,title"; None/missing: ids only
    static_dir: str | None = DEFAULT_STATIC_DIR  # the demo page; None/missing: no page
    max_users: int = 256  # history rows per request
    max_history: int = 1000  # item ids per history row (the model reads the newest maxlen)
    max_top_k: int = 1000
    default_top_k: int = 50
    max_upsert: int = 10000  # items per /rec/upsert_items call
    max_body_bytes: int = 8 * 1024 * 1024
    milvus_timeout: float = 10.0  # seconds per Milvus call (and to connect)

    @classmethod
    def from_env(cls, **overrides: Any) -> "ApiSettings":
        """Defaults, then ``PADDLEREC_MILVUS_*`` variables, then non-None ``overrides``."""
        env = os.environ
        s = cls()
        strings = {"export_dir": "EXPORT_DIR", "milvus_uri": "URI", "collection": "COLLECTION",
                   "token": "TOKEN", "titles_path": "TITLES", "static_dir": "STATIC_DIR"}
        numbers = {"max_users": "MAX_USERS", "max_history": "MAX_HISTORY", "max_top_k": "MAX_TOP_K",
                   "default_top_k": "DEFAULT_TOP_K", "max_upsert": "MAX_UPSERT",
                   "max_body_bytes": "MAX_BODY_BYTES", "milvus_timeout": "TIMEOUT"}
        for field, name in strings.items():
            if env.get(ENV + name):
                s = replace(s, **{field: env[ENV + name]})
        for field, name in numbers.items():
            raw = env.get(ENV + name)
            if raw:
                kind = float if field == "milvus_timeout" else int
                try:
                    s = replace(s, **{field: kind(raw)})
                except ValueError:
                    raise ValueError(f"{ENV + name}={raw!r} is not a number") from None
        return replace(s, **{k: v for k, v in overrides.items() if v is not None})


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
    took_ms: float


class InterestsResponse(BaseModel):
    interests: list[list[list[float]]] = Field(description="[rows][K][dim] interest vectors")
    notes: list[str] = Field(default_factory=list)


class WriteResponse(BaseModel):
    written: int = Field(description="item vectors written by this call")
    count: int = Field(description="item vectors in the collection now")
    collection: str
    took_ms: float


class CountResponse(BaseModel):
    count: int
    collection: str


class DropResponse(BaseModel):
    dropped: bool
    collection: str
    count: int


class HealthResponse(BaseModel):
    status: str = Field(description='"ok", or "degraded" when Milvus cannot be reached')
    model_loaded: bool
    model_version: str | None
    embedding_dim: int | None
    interests_per_user: int | None
    milvus_reachable: bool
    milvus_uri: str | None
    collection: str | None
    count: int | None
    error: str | None = None
    limits: dict[str, int]


class ItemTitle(BaseModel):
    item_id: int
    title: str | None
    known: bool = Field(description="the model has this item (it can be part of a history)")


class ItemsResponse(BaseModel):
    items: list[ItemTitle]


class SearchResponse(BaseModel):
    items: list[ItemTitle]
    total_matches: int


def _request_models(s: ApiSettings, dim: int) -> SimpleNamespace:
    """Request bodies whose OpenAPI schema carries this service's limits."""
    item_id = Annotated[StrictInt, Field(ge=0, le=INT64_MAX)]
    history = Annotated[list[item_id], Field(min_length=1, max_length=s.max_history)]
    histories = Annotated[list[history], Field(min_length=1, max_length=s.max_users,
                                              description="one list of clicked item ids per user, oldest "
                                                          "first (the newest `maxlen` are used)")]
    top_k_limit = s.max_top_k

    class RecallRequest(BaseModel):
        model_config = ConfigDict(extra="forbid", json_schema_extra={
            "examples": [{"top_k": 50, "hist_item": [[43, 23, 65], [675, 3456]]}]})
        top_k: StrictInt = Field(s.default_top_k, ge=1, le=top_k_limit, description="items per row")
        hist_item: histories
        with_scores: StrictBool = False
        with_titles: StrictBool = False
        exclude_history: StrictBool = Field(False, description="drop items already in the row's history")
        filter: str | None = Field(None, max_length=1000,
                                   description="Milvus boolean expression on the collection's fields")

    class InterestsRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        hist_item: histories

    component = Annotated[StrictFloat, Field(allow_inf_nan=False)]
    vector = Annotated[list[component], Field(min_length=dim, max_length=dim)]

    class UpsertRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        item_id: Annotated[list[Annotated[StrictInt, Field(ge=1, le=INT64_MAX)]],
                           Field(min_length=1, max_length=s.max_upsert, description="raw item ids")]
        embedding: Annotated[list[vector], Field(min_length=1, max_length=s.max_upsert,
                                                 description=f"one {dim}-d vector per item")]

    return SimpleNamespace(recall=RecallRequest, interests=InterestsRequest, upsert=UpsertRequest)


def _field_path(loc: tuple[Any, ...]) -> str:
    parts = [p for p in loc if p not in ("body", "query", "path")]
    text = ""
    for p in parts:
        text += f"[{p}]" if isinstance(p, int) else (f".{p}" if text else str(p))
    return text or "body"


def _clear(index: Any) -> None:
    """Drop the collection. On a Milvus server the serving name is an alias of the exported
    version, which Milvus will not drop: there the rows are deleted and the alias kept."""
    try:
        index.drop()
        logger.info("dropped collection %s", index.collection)
    except MilvusIndexError as exc:
        if "alias" not in str(exc):
            raise
        index.clear()
        logger.info("deleted every item of %s (an alias; the collection behind it stays)",
                    index.collection)


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
            max_users=s.max_users, max_top_k=s.max_top_k, default_top_k=s.default_top_k,
            index_kwargs={"timeout": s.milvus_timeout})
        self.titles = load_titles(s.titles_path)
        known = set(self.service.dense_of)
        self.search_keys = sorted(((i, t.lower()) for i, t in self.titles.items() if i in known),
                                  key=lambda it: (len(it[1]), it[0]))
        m = self.service.manifest
        logger.info("model %s (epoch %d, %d items, K=%d, dim %d) from %s; Milvus %s collection %s",
                    m.model_version, m.epoch, m.item_count - 1, m.max_k, m.embedding_dim,
                    self.service.export_dir, self.service.uri, self.service.collection)
        try:  # connect now (and start Milvus Lite) so the first request is fast; not fatal
            logger.info("collection %s holds %d item vectors", self.service.collection,
                        self.service.index.count())
        except MilvusIndexError as exc:
            logger.warning("Milvus not reachable at startup (requests will retry): %s", exc)

    def stop(self) -> None:
        if self.service is not None:
            self.service.close()
            self.service = None


def create_app(settings: ApiSettings | None = None, **overrides: Any) -> FastAPI:
    """The FastAPI app. ``settings`` (or ``ApiSettings.from_env(**overrides)``) says where the
    export, Milvus and titles are; the model loads when the app starts (lifespan)."""
    s = settings or ApiSettings.from_env(**overrides)
    state = _State(s)
    # The request schemas need the model's dim: read it from the manifest (the model loads at startup).
    from .export import Manifest

    manifest = Manifest.load(os.path.abspath(s.export_dir))
    models = _request_models(s, manifest.embedding_dim)
    RecallRequest, InterestsRequest, UpsertRequest = models.recall, models.interests, models.upsert

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.start()
        try:
            yield
        finally:
            state.stop()
            logger.info("REST API stopped")

    errors = {400: {"model": ErrorBody, "description": "invalid request (the detail says why)"},
              413: {"model": ErrorBody, "description": "request body too large"},
              422: {"model": ErrorBody, "description": "request body does not match the schema"},
              503: {"model": ErrorBody, "description": "Milvus cannot be reached or failed"}}
    app = FastAPI(title="paddlerec-milvus REST API", version="1.0",
                  description="MIND multi-interest recall: a user's clicks -> K interest vectors -> "
                              "Milvus searches -> one merged list of raw item ids.",
                  lifespan=lifespan, responses=errors)
    app.state.api = state

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None:
            try:
                too_big = int(length) > s.max_body_bytes
            except ValueError:
                return JSONResponse({"detail": "invalid Content-Length header"}, status_code=400)
            if too_big:
                return JSONResponse({"detail": f"request body of {length} bytes is over the limit of "
                                               f"{s.max_body_bytes} bytes"}, status_code=413)
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errs = exc.errors()
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
        return JSONResponse({"detail": msg, "errors": jsonable_encoder(slim)}, status_code=422)

    @app.exception_handler(RequestError)
    async def bad_request(request: Request, exc: RequestError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=400)

    @app.exception_handler(MilvusIndexError)
    async def milvus_trouble(request: Request, exc: MilvusIndexError) -> JSONResponse:
        logger.warning("%s %s: %s", request.method, request.url.path, exc)
        if state.service is not None:
            state.service.reset_index()  # reconnect (or re-create a dropped collection) next time
        return JSONResponse({"detail": str(exc)}, status_code=503)

    def svc():
        if state.service is None:
            raise MilvusIndexError("cannot reach the model: the service is not started")
        return state.service

    def title_of(item: int) -> str | None:
        return state.titles.get(item)

    def ms(t0: float) -> float:
        return round((time.perf_counter() - t0) * 1000, 2)

    @app.post("/rec/recall", response_model=RecallResponse, tags=["recall"],
              summary="Recall top_k items for each history row")
    def recall(req: RecallRequest) -> RecallResponse:
        """Each row of ``hist_item`` (a user's clicked raw item ids) -> K interest vectors ->
        K Milvus searches -> one merged list of raw item ids, best first."""
        t0 = time.perf_counter()
        service = svc()
        try:
            ans = service.recall(req.hist_item, top_k=req.top_k, exclude_history=req.exclude_history,
                                 filter=req.filter)
        except MilvusIndexError as exc:
            if req.filter and "cannot reach" not in str(exc):
                raise RequestError(f"filter {req.filter[:100]!r} was rejected by Milvus: {exc}") from None
            raise
        titles = [[title_of(i) for i in row] for row in ans.items] if req.with_titles else None
        return RecallResponse(items=ans.items, scores=ans.scores if req.with_scores else None,
                              titles=titles, top_k=req.top_k, notes=ans.notes, took_ms=ms(t0))

    @app.post("/rec/interests", response_model=InterestsResponse, tags=["recall"],
              summary="The K interest vectors of each history row")
    def interests(req: InterestsRequest) -> InterestsResponse:
        """What recall searches Milvus with: ``[rows][K][dim]`` vectors from the user tower."""
        vecs, notes = svc().interests(req.hist_item)
        return InterestsResponse(interests=np.asarray(vecs, dtype=np.float64).tolist(), notes=notes)

    def _write(ids: np.ndarray, vectors: np.ndarray) -> WriteResponse:
        t0 = time.perf_counter()
        service = svc()
        with state.write_lock:
            written = service.index.upsert(ids, vectors, progress=False)
            count = service.index.count()
        logger.info("upserted %d item vectors into %s (%d now)", written, service.collection, count)
        return WriteResponse(written=written, count=count, collection=service.collection, took_ms=ms(t0))

    @app.post("/rec/insert_data", response_model=WriteResponse, tags=["collection"],
              summary="Write the exported model's item vectors into Milvus (idempotent)")
    def insert_data() -> WriteResponse:
        """Upsert every item vector of the exported model, keyed by raw item id. Re-running
        never duplicates; after ``/rec/drop`` it re-creates the collection."""
        service = svc()
        vectors = np.load(os.path.join(service.export_dir, "item_vectors.npy"))
        return _write(np.asarray(service.raw_ids[1:], dtype=np.int64), vectors)

    @app.post("/rec/upsert_items", response_model=WriteResponse, tags=["collection"],
              summary="Insert or replace item vectors (real-time new items)")
    def upsert_items(req: UpsertRequest) -> WriteResponse:
        """New or changed items are recallable by the next request."""
        if len(req.item_id) != len(req.embedding):
            raise RequestError(f"{len(req.item_id)} item ids but {len(req.embedding)} embeddings")
        if len(set(req.item_id)) != len(req.item_id):
            raise RequestError("item_id has duplicates")
        vectors = np.asarray(req.embedding, dtype=np.float64)
        if not np.all(np.isfinite(vectors.astype(np.float32))):
            raise RequestError("embedding values must fit in float32 (|x| < 3.4e38)")
        return _write(np.asarray(req.item_id, dtype=np.int64), vectors.astype(np.float32))

    @app.post("/rec/count", response_model=CountResponse, tags=["collection"],
              summary="Number of item vectors in the collection")
    def count() -> CountResponse:
        service = svc()
        return CountResponse(count=service.index.count(), collection=service.collection)

    def drop() -> DropResponse:
        """Delete the collection and its data; ``/rec/insert_data`` re-creates it."""
        service = svc()
        with state.write_lock:
            _clear(service.index)
            service.reset_index()
            left = service.index.count()  # re-created empty, so count and recall keep answering
        return DropResponse(dropped=True, collection=service.collection, count=left)

    for path in ("/rec/drop", "/qa/drop"):
        app.post(path, response_model=DropResponse, tags=["collection"],
                 summary="Delete the collection's data (count becomes 0)")(drop)

    @app.get("/health", response_model=HealthResponse, tags=["service"],
             responses={503: {"model": HealthResponse, "description": "Milvus cannot be reached"}})
    def health() -> JSONResponse:
        """Model loaded and Milvus reachable: 200; otherwise 503 with the reason."""
        service = state.service
        body: dict[str, Any] = {
            "status": "degraded", "model_loaded": service is not None, "model_version": None,
            "embedding_dim": None, "interests_per_user": None, "milvus_reachable": False,
            "milvus_uri": None, "collection": None, "count": None, "error": None,
            "limits": {"max_users": s.max_users, "max_history": s.max_history,
                       "max_top_k": min(s.max_top_k, service.max_top_k if service else s.max_top_k),
                       "default_top_k": s.default_top_k, "max_upsert": s.max_upsert}}
        if service is None:
            body["error"] = "model not loaded"
            return JSONResponse(body, status_code=503)
        m = service.manifest
        body.update(model_version=m.model_version, embedding_dim=m.embedding_dim,
                    interests_per_user=m.max_k, milvus_uri=service.uri, collection=service.collection)
        try:
            body["count"] = service.index.count()
            body.update(milvus_reachable=True, status="ok")
        except MilvusIndexError as exc:
            service.reset_index()
            body["error"] = str(exc)
        return JSONResponse(body, status_code=200 if body["status"] == "ok" else 503)

    @app.get("/items/search", response_model=SearchResponse, tags=["items"],
             summary="Find items the model knows by part of their title (or by id)")
    def search_items(q: Annotated[str, Query(min_length=1, max_length=200)],
                     limit: Annotated[int, Query(ge=1, le=100)] = 20) -> SearchResponse:
        """Case-insensitive substring match; titles that start with the text come first."""
        needle = q.strip().lower()
        service = svc()
        found: list[int] = []
        if needle.isdigit() and int(needle) in service.dense_of:
            found.append(int(needle))
        if needle:
            starts = [i for i, t in state.search_keys if t.startswith(needle)]
            inside = [i for i, t in state.search_keys if needle in t and not t.startswith(needle)]
            found += [i for i in starts + inside if i not in found]
        return SearchResponse(items=[ItemTitle(item_id=i, title=title_of(i), known=True)
                                     for i in found[:limit]], total_matches=len(found))

    @app.get("/items", response_model=ItemsResponse, tags=["items"], summary="Titles of item ids")
    def items(ids: Annotated[list[Annotated[int, Field(ge=0, le=INT64_MAX)]],
                             Query(min_length=1, max_length=1000)]) -> ItemsResponse:
        known = svc().dense_of
        return ItemsResponse(items=[ItemTitle(item_id=i, title=title_of(i), known=i in known)
                                    for i in ids])

    static = s.static_dir
    if static and os.path.isfile(os.path.join(static, "index.html")):
        app.mount("/static", StaticFiles(directory=static), name="static")

        @app.get("/", include_in_schema=False)
        def page() -> FileResponse:
            return FileResponse(os.path.join(static, "index.html"))
    else:
        logger.warning("no demo page (no index.html in %s)", static)

    return app


def run_api(host: str = "127.0.0.1", port: int = 8000, export_dir: str | None = None,
            milvus_uri: str | None = None, collection: str | None = None,
            log_level: str = "info") -> int:
    """Serve the REST API with uvicorn in the foreground until Ctrl-C; returns an exit code."""
    import uvicorn

    settings = ApiSettings.from_env(export_dir=export_dir, milvus_uri=milvus_uri, collection=collection)
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
