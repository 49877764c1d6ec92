"""The Paddle Serving pipeline: user tower (Op 1) -> Milvus recall and merge (Op 2), over RPC and HTTP.

Both Ops are thin shells over ``RecallService`` (the one recall core): ``user_tower`` validates a
request (``service.prepare``) and runs the tower stage; ``recall`` runs the search stage (K
searches + merge) and encodes the answer. Paddle Serving passes string values, so requests and responses carry
JSON strings:

request keys   ``hist_item``  ``[[id, ...], ...]`` (one history per user; a flat list = one user)
               ``top_k`` (int), ``exclude_history`` (true/false), ``filter`` (Milvus expression),
               ``timeout_ms`` (this request's deadline, at most ``recall.request_timeout``)
response keys  ``items``, ``scores`` (one list per user), ``notes`` (list of str), ``model_version``

A bad request answers ``err_no`` 51 with a message naming the problem; Milvus trouble 52 (the
service reconnects on a later request); overload 54 (queue full, or the deadline passed before the
request ran: retry later); anything else 53. The server keeps serving.

Each Op batches with Paddle Serving's own op batching, mended for 0.9: an Op thread takes every
request already queued in its channel (up to ``batch_size``, default ``recall.batch_max_users``;
0.9's generator waits out ``auto_batching_timeout`` whenever fewer are queued, so a lone request
would pay the window: ours never waits) and runs its stage once for all of them
(``RecallService.run_many``: one tower call, one Milvus search per filter; a request past its
deadline is not run). 0.9 itself batches only ``process``, which runs only for Ops with a local
Paddle Serving model and merges inputs by ``np.append``; here ``process`` is that one stage call.
Few Op threads are needed (default 2 per Op): every push into a channel wakes all threads
waiting on it (``notify_all``), and with 16-64 threads per Op that herd cost more CPU than the
requests (measured: 43 busy threads at one request in flight).

Thread mode (the default) shares one ``RecallService`` between all Op threads: Milvus Lite opens
a ``.db`` in one process only. Process modes (``dag.is_thread_op: false`` or
``build_dag_each_worker``) build one service per process and need a Milvus server.
Only ``paddle_serving_compat`` knows how Paddle Serving 0.9 runs on Python 3.11.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import os
import signal
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from . import paddle_serving_compat as compat
from .errors import (
    ConfigError,
    DeadlineExceeded,
    MilvusIndexError,
    MilvusRequestRejected,
    MilvusUnavailable,
    Overloaded,
    PaddleRecMilvusError,
    RequestError,
)
from .serving_contract import Manifest, ServingLimits

logger = logging.getLogger(__name__)

ERR_BAD_REQUEST = 51
ERR_MILVUS = 52
ERR_INTERNAL = 53
ERR_OVERLOADED = compat.ERR_OVERLOADED  # 54
REQUEST_KEYS = ("hist_item", "top_k", "exclude_history", "filter", "timeout_ms")
RESPONSE_KEYS = ("items", "scores", "notes", "model_version")
TOWER_OP, RECALL_OP = "user_tower", "recall"
EXIT_GRACE_S = 10.0

DEFAULT_CONFIG: dict[str, Any] = {
    "name": "recall",  # HTTP path: /<name>/prediction
    "host": "127.0.0.1",  # where the gRPC server and the HTTP gateway bind
    "rpc_port": 9998,
    "http_gateway": "python",  # ours: binds host, body limit; "go": all interfaces, no limit
    "http_port": 18082,
    "worker_num": 64,  # gRPC threads: above max_inflight, so a refusal always finds a free one
    "build_dag_each_worker": False,
    "log_dir": "../output/serving",
    "pipeline_log_level": "ERROR",
    "dag": {"is_thread_op": True, "retry": 1, "tracer": {"interval_s": -1}},
    # each Op thread takes every queued request at once (op batching): few threads are needed
    "op": {TOWER_OP: {"concurrency": 2}, RECALL_OP: {"concurrency": 2}},
    "recall": {
        "export_dir": "../output/export",
        "milvus_uri": "",  # "" = the export's (manifest.json)
        "collection": "",
        "token": "",
        "use_gpu": False,
        "search_params": {},
        "scalar_fields": [],  # INT64 fields of the collection that filters may name (item_id always)
        # the serving limits (paddlerec_milvus.serving_contract.ServingLimits), same as the REST API's
        **ServingLimits().as_dict(),
        "max_inflight": 48,  # requests in the DAG at once (below worker_num)
    },
}


# -- config -------------------------------------------------------------------------------
@dataclass
class ServingConfig:
    """``serving/config.yml``, merged over the defaults, paths made absolute."""

    path: str
    name: str
    host: str
    rpc_port: int
    http_port: int | None
    log_dir: str
    pipeline_log_level: int
    pipeline: dict[str, Any]  # what Paddle Serving's PipelineServer.prepare_server reads
    recall: dict[str, Any]
    http_gateway: str = "python"

    @property
    def thread_mode(self) -> bool:
        return bool(self.pipeline["dag"].get("is_thread_op", True)) and \
            not self.pipeline.get("build_dag_each_worker", False)

    def milvus_processes(self) -> int:
        """How many processes would each open Milvus (Lite allows one)."""
        n = 1
        if not self.pipeline["dag"].get("is_thread_op", True):
            n = int(self.pipeline["op"][RECALL_OP].get("concurrency", 1))
        if self.pipeline.get("build_dag_each_worker", False):
            n *= int(self.pipeline.get("worker_num", 1))
        return n


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _abs(base_dir: str, value: str) -> str:
    """A path from the config: relative ones are taken from the config file's folder."""
    value = os.path.expanduser(str(value))
    if "://" in value or os.path.isabs(value):
        return value
    return os.path.normpath(os.path.join(base_dir, value))


def load_serving_config(path: str) -> ServingConfig:
    """Read and check ``config.yml``; a wrong key or value is a ConfigError naming it."""
    if not os.path.isfile(path):
        raise ConfigError(f"serving config not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            tree = yaml.safe_load(f) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from None
    if not isinstance(tree, Mapping):
        raise ConfigError(f"{path}: expected a mapping of settings")
    unknown = set(tree) - set(DEFAULT_CONFIG)
    if unknown:
        raise ConfigError(f"{path}: unknown keys {sorted(unknown)} (known: {sorted(DEFAULT_CONFIG)})")
    unknown = set(tree.get("recall") or {}) - set(DEFAULT_CONFIG["recall"])
    if unknown:
        raise ConfigError(f"{path}: unknown recall keys {sorted(unknown)} "
                          f"(known: {sorted(DEFAULT_CONFIG['recall'])})")
    conf = _merge(DEFAULT_CONFIG, tree)
    base = os.path.dirname(os.path.abspath(path))
    for key in ("rpc_port", "http_port", "worker_num"):
        value = conf[key]
        if value is None and key == "http_port":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
            raise ConfigError(f"{path}: {key} = {value!r} must be an integer (ports 1024..65535)")
    for op in (TOWER_OP, RECALL_OP):
        c = conf["op"].get(op) or {}
        if not isinstance(c.get("concurrency", 1), int) or c.get("concurrency", 1) < 1:
            raise ConfigError(f"{path}: op.{op}.concurrency must be an integer >= 1")
    rec = conf["recall"]
    limit_names = set(ServingLimits().as_dict())
    try:
        rec["limits"] = ServingLimits().with_values(path, {k: rec.pop(k) for k in list(rec)
                                                           if k in limit_names})
    except ConfigError as exc:
        raise ConfigError(f"{path}: recall: {exc}") from None
    rec["export_dir"] = _abs(base, rec["export_dir"])
    if rec.get("milvus_uri"):
        rec["milvus_uri"] = _abs(base, rec["milvus_uri"])
    level = logging.getLevelName(str(conf["pipeline_log_level"]).upper())
    if not isinstance(level, int):
        raise ConfigError(f"{path}: pipeline_log_level {conf['pipeline_log_level']!r} is not a log level")
    pipeline = {k: conf[k] for k in ("rpc_port", "http_port", "worker_num", "build_dag_each_worker",
                                     "dag", "op")}
    if pipeline["http_port"] is None:
        del pipeline["http_port"]
    if conf["http_gateway"] not in compat.GATEWAYS:
        raise ConfigError(f"{path}: http_gateway = {conf['http_gateway']!r}: expected one of "
                          f"{list(compat.GATEWAYS)}")
    return ServingConfig(os.path.abspath(path), str(conf["name"]), str(conf["host"]), conf["rpc_port"],
                         conf["http_port"], _abs(base, conf["log_dir"]), level, pipeline, rec,
                         str(conf["http_gateway"]))


def make_service(recall: Mapping[str, Any]):
    """The RecallService a config describes (one per process)."""
    from .service import RecallService

    return RecallService(
        recall["export_dir"], milvus_uri=recall.get("milvus_uri") or None,
        collection=recall.get("collection") or None, token=recall.get("token") or "",
        limits=recall["limits"], use_gpu=bool(recall.get("use_gpu")),
        scalar_fields=list(recall.get("scalar_fields") or ()),
        index_kwargs={"search_params": recall.get("search_params") or {}})


# -- the wire format ------------------------------------------------------------------------
@dataclass
class RecallRequest:
    histories: list[list[Any]]
    top_k: Any = None
    exclude_history: bool = False
    filter: str | None = None
    timeout_ms: Any = None
    arrival: float | None = None  # when the gRPC servicer got it (the deadline counts from there)
    call_deadline: float | None = None  # the gRPC call's own deadline (monotonic), when it has one


def encode_request(histories: Sequence[Sequence[int]], top_k: int | None = None,
                   exclude_history: bool | None = None, filter: str | None = None,
                   timeout_ms: int | None = None) -> dict[str, str]:
    """Request fields as Paddle Serving wants them: every value a string (JSON)."""
    fields = {"hist_item": json.dumps([list(map(int, h)) for h in histories])}
    if timeout_ms is not None:
        fields["timeout_ms"] = json.dumps(timeout_ms)
    if top_k is not None:
        fields["top_k"] = json.dumps(top_k)
    if exclude_history is not None:
        fields["exclude_history"] = json.dumps(bool(exclude_history))
    if filter:
        fields["filter"] = filter
    return fields


def decode_response(err_no: int, err_msg: str, keys: Sequence[str], values: Sequence[str]) -> dict[str, Any]:
    """A pipeline response (RPC or HTTP) -> ``{"err_no", "err_msg", "items", "scores", "notes", ...}``."""
    out: dict[str, Any] = {"err_no": int(err_no or 0), "err_msg": err_msg or ""}
    for key, value in zip(keys, values):
        if key in ("items", "scores", "notes"):
            out[key] = json.loads(value)
        else:
            out[key] = value
    return out


def _json_field(name: str, value: Any) -> Any:
    if not isinstance(value, str):
        if hasattr(value, "tolist"):  # tensor-format requests arrive as numpy arrays
            return value.tolist()
        raise RequestError(f"{name} must be a JSON string, got {type(value).__name__}")
    try:
        return json.loads(value)
    except ValueError as exc:
        raise RequestError(f"{name} is not valid JSON ({exc.msg} at char {exc.pos}): "
                           f"{value[:80]!r}") from None


def parse_request(fields: Mapping[str, Any]) -> RecallRequest:
    """Pipeline request fields -> RecallRequest; ids, history lengths, top_k and the filter are
    checked by RecallService, as for the REST API."""
    unknown = [k for k in fields if k not in REQUEST_KEYS and not k.startswith("pipeline.")]
    if unknown:
        raise RequestError(f"unknown request keys {unknown}; expected {list(REQUEST_KEYS)}")
    if "hist_item" not in fields:
        raise RequestError('missing key "hist_item": a JSON list of histories, e.g. [[12, 7, 33]]')
    hist = _json_field("hist_item", fields["hist_item"])
    if isinstance(hist, list) and hist and not any(isinstance(h, list) for h in hist):
        hist = [hist]  # a flat list is one user's history
    if not isinstance(hist, list):
        raise RequestError(f"hist_item must be a JSON list of histories, got {type(hist).__name__}")
    req = RecallRequest(hist)
    if "top_k" in fields:
        req.top_k = _json_field("top_k", fields["top_k"])
    if "timeout_ms" in fields:
        req.timeout_ms = _json_field("timeout_ms", fields["timeout_ms"])
    if compat.ARRIVAL_KEY in fields:
        try:
            req.arrival = float(fields[compat.ARRIVAL_KEY])
        except (TypeError, ValueError):
            raise RequestError(f"{compat.ARRIVAL_KEY} is set by the server, not by clients") from None
    if compat.CALL_DEADLINE_KEY in fields:
        try:
            req.call_deadline = float(fields[compat.CALL_DEADLINE_KEY])
        except (TypeError, ValueError):
            raise RequestError(f"{compat.CALL_DEADLINE_KEY} is set by the server, not by clients") from None
    if "exclude_history" in fields:
        value = _json_field("exclude_history", fields["exclude_history"])
        if not isinstance(value, bool):
            raise RequestError(f"exclude_history = {value!r} must be true or false")
        req.exclude_history = value
    if fields.get("filter"):
        value = fields["filter"]
        if isinstance(value, str) and value.startswith('"'):
            value = _json_field("filter", value)
        if not isinstance(value, str):
            raise RequestError("filter must be a Milvus boolean expression string")
        req.filter = value or None
    return req


def _error(exc: BaseException) -> tuple[int, str]:
    """An exception -> (err_no, message): the typed errors mapped once for the pipeline. The
    service itself reconnects after Milvus trouble."""
    if isinstance(exc, (RequestError, MilvusRequestRejected)):
        return ERR_BAD_REQUEST, f"bad request: {exc}"
    if isinstance(exc, DeadlineExceeded):
        return ERR_OVERLOADED, f"deadline exceeded: {exc}"
    if isinstance(exc, Overloaded):
        return ERR_OVERLOADED, f"overloaded: {exc}"
    if isinstance(exc, MilvusIndexError):
        return ERR_MILVUS, f"Milvus error: {exc}"
    if isinstance(exc, PaddleRecMilvusError):
        return ERR_INTERNAL, str(exc)
    logger.exception("recall pipeline: unexpected error")
    return ERR_INTERNAL, f"internal error: {type(exc).__name__}: {exc}"


# -- the Ops --------------------------------------------------------------------------------
@functools.cache
def op_classes() -> tuple[type, type]:
    """(UserTowerOp, RecallOp), built on Paddle Serving's Op once the pipeline is importable."""
    pipeline = compat.load_pipeline()
    Op = pipeline.Op
    from paddle_serving_server.pipeline.channel import ChannelTimeoutError

    class _ServiceOp(Op):
        """An Op holding a RecallService (shared in thread mode, built in its process otherwise)
        that runs its stage once per batch Paddle Serving's op batching hands it."""

        service: Any = None
        service_factory: Callable[[], Any] | None = None
        stage = ""

        def init_op(self) -> None:
            if self.service is None and self.service_factory is not None:
                self.service = self.service_factory()

        @staticmethod
        def _one(input_dicts: Mapping[str, Any]) -> Any:
            (_, data), = input_dicts.items()
            return data

        def _auto_batching_generator(self, input_channel, op_name, batch_size, timeout, op_info_prefix):
            """Every request already queued, up to ``batch_size``, without waiting for more (0.9's
            waits out ``auto_batching_timeout`` whenever fewer are queued: a lone request would
            pay the whole window). One blocking take, then takes that time out at once."""
            while True:
                batch = [input_channel.front(op_name)]
                while len(batch) < batch_size:
                    try:
                        batch.append(input_channel.front(op_name, 1e-9))
                    except ChannelTimeoutError:
                        break
                yield batch

        def _run_process(self, preped_data_dict, op_info_prefix, skip_process_dict, logid_dict):
            """The stage for the whole batch at once (0.9 runs ``process`` only for Ops with a
            Paddle Serving model, and merges their inputs by ``np.append``): one tower call or one
            Milvus search for every request, each request's own result or error."""
            ids = list(preped_data_dict)
            try:
                results = self.service.run_many(self.stage, [preped_data_dict[i]["job"] for i in ids])
            except Exception as exc:  # noqa: BLE001 - a bug must not end the Op's thread
                logger.exception("recall pipeline: the %s stage failed", self.stage)
                results = [exc] * len(ids)
            return {i: {"result": r} for i, r in zip(ids, results)}, {}

    class UserTowerOp(_ServiceOp):
        """Validate the request (``service.prepare``), then the user tower for the batch."""

        stage = "user tower"

        def preprocess(self, input_dicts, data_id=0, log_id=0):
            try:
                req = parse_request(self._one(input_dicts))
                job = self.service.prepare(req.histories, req.top_k, req.exclude_history, req.filter,
                                           req.timeout_ms, arrival=req.arrival,
                                           deadline=req.call_deadline)
            except Exception as exc:
                return (None, True, *_error(exc))
            return ({"job": job}, False, None, "")

        def postprocess(self, input_data, fetch_data, data_id=0, log_id=0):
            job = fetch_data["result"]
            if isinstance(job, BaseException):
                return ({}, *_error(job))
            # the job carries its model version: the recall Op searches that export's vectors
            return ({"job": job}, None, "")

    class RecallOp(_ServiceOp):
        """K Milvus searches per user, merged, for the batch; encode each answer."""

        stage = "search"

        def preprocess(self, input_dicts, data_id=0, log_id=0):
            return (self._one(input_dicts), False, None, "")

        def postprocess(self, input_data, fetch_data, data_id=0, log_id=0):
            ans = fetch_data["result"]
            if isinstance(ans, BaseException):
                return ({}, *_error(ans))
            return ({"items": json.dumps(ans.items),
                     "scores": json.dumps([[round(s, 6) for s in row] for row in ans.scores]),
                     "notes": json.dumps(ans.notes),
                     "model_version": ans.model_version}, None, "")

    return UserTowerOp, RecallOp


def build_dag(config: ServingConfig, service: Any = None) -> tuple[Any, list[Any]]:
    """RequestOp -> user_tower -> recall -> ResponseOp; returns (ResponseOp, [the two Ops]).

    ``service``: the RecallService both Ops share (thread mode); None = each Op builds its own
    from the config in ``init_op`` (process modes). Each Op takes up to ``op.<name>.batch_size``
    queued requests at once (default: ``recall.batch_max_users``; 1 when batching is off)."""
    pipeline = compat.load_pipeline()
    UserTowerOp, RecallOp = op_classes()
    limits = config.recall["limits"]
    batch = max(1, limits.batch_max_users)
    read = pipeline.RequestOp()
    ops = []
    for cls, name in ((UserTowerOp, TOWER_OP), (RecallOp, RECALL_OP)):
        size = (config.pipeline["op"].get(name) or {}).get("batch_size") or batch
        op = cls(name=name, input_ops=[ops[-1] if ops else read], batch_size=int(size),
                 auto_batching_timeout=-1)
        op.service = service
        op.service_factory = functools.partial(make_service, config.recall)
        ops.append(op)
    return pipeline.ResponseOp(input_ops=[ops[-1]]), ops


# -- running it -----------------------------------------------------------------------------
class RecallPipelineServer:
    """The pipeline server for one config: ``start()`` returns when both ports answer."""

    def __init__(self, config: ServingConfig):
        self.config = config
        self.service: Any = None
        self.runner: compat.PipelineRunner | None = None
        self.items = -1

    def _check(self) -> tuple[str, str]:
        from .milvus_index import is_local_uri

        manifest = Manifest.load(self.config.recall["export_dir"])
        uri = self.config.recall.get("milvus_uri") or manifest.milvus_uri
        collection = self.config.recall.get("collection") or manifest.collection
        n = self.config.milvus_processes()
        if n > 1 and is_local_uri(uri):
            raise ConfigError(
                f"{self.config.path}: process mode would open the Milvus Lite file {uri} from {n} "
                "processes, but Lite opens a .db in one process only. Use a Milvus server "
                "(recall.milvus_uri: http://host:19530), or thread mode (dag.is_thread_op: true, "
                "build_dag_each_worker: false)")
        return uri, collection

    def start(self) -> None:
        cfg = self.config
        uri, collection = self._check()
        compat.load_pipeline(cfg.log_dir, cfg.pipeline_log_level, with_paddle=True)
        response_op, ops = build_dag(cfg)
        self.runner = compat.PipelineRunner(cfg.name, response_op, copy.deepcopy(cfg.pipeline),
                                            host=cfg.host, log_dir=cfg.log_dir, gateway=cfg.http_gateway,
                                            max_body_bytes=cfg.recall["limits"].max_body_bytes,
                                            max_inflight=cfg.recall["limits"].max_inflight)
        try:
            self.runner.prepare()  # forks the HTTP gateway: before any model or Milvus connection
            if cfg.thread_mode:
                self.service = make_service(cfg.recall)
                for op in ops:
                    op.service = self.service
                try:
                    self.items = self.service.index.count()
                except MilvusUnavailable as exc:
                    self.service.reset_index()
                    logger.warning("Milvus is not reachable now (%s); requests answer err_no %d until "
                                   "it is back", exc, ERR_MILVUS)
            self.runner.start()
        except BaseException:
            self.stop()
            raise
        logger.info(
            "recall pipeline ready: rpc %s:%d, http %s; %s mode; export %s; Milvus %s collection %s%s",
            cfg.host, cfg.rpc_port,
            f"http://127.0.0.1:{cfg.http_port}/{cfg.name}/prediction" if cfg.http_port else "off",
            "thread" if cfg.thread_mode else "process", cfg.recall["export_dir"], uri, collection,
            f" ({self.items} items)" if self.items >= 0 else "")

    def dead_child(self) -> str | None:
        return self.runner.dead_child() if self.runner else None

    def stop(self) -> None:
        if self.runner is not None:
            self.runner.stop()
            self.runner = None
        if self.service is not None:
            self.service.close()
            self.service = None


def serve_main(config_path: str) -> int:
    """``paddlerec-milvus serve``: run in the foreground until Ctrl-C/SIGTERM; stop everything."""
    config = load_serving_config(config_path)
    # First paddle (its import installs a C-level SIGTERM handler), then ours over it.
    compat.load_pipeline(config.log_dir, config.pipeline_log_level, with_paddle=True)
    stop = threading.Event()
    signals = (signal.SIGINT, signal.SIGTERM)

    def on_signal(signum: int, frame: Any) -> None:
        logger.info("got %s; stopping", signal.Signals(signum).name)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in signals}
    server = RecallPipelineServer(config)
    rc = 2  # until it has served and stopped as asked
    try:
        server.start()
        rc = 0
        while not stop.wait(1.0):
            dead = server.dead_child()
            if dead:
                logger.error("%s; stopping the pipeline", dead)
                rc = 1
                break
    finally:
        server.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
        logger.info("recall pipeline stopped")
        # A request stuck in an Op (e.g. on a hung Milvus) keeps a gRPC worker thread, which
        # Python joins at exit: give it a few seconds, then leave anyway.
        watchdog = threading.Timer(EXIT_GRACE_S, os._exit, args=(rc,))
        watchdog.daemon = True
        watchdog.start()
    return rc
