"""Running Paddle Serving 0.9 (built for Python <= 3.9) on Python 3.11: the only module that knows how.

``paddle-serving-server==0.9.0`` is installed with ``--no-deps`` (its pins do not resolve on 3.11).
Its pipeline mode then works, given what this module does (docs/design.md, "Paddle Serving 0.9 on
Python 3.11"):

1. Its generated ``_pb2`` files predate protobuf 4: they build descriptors by hand, which the
   upb backend refuses. Rather than forcing the pure-Python protobuf on the whole process (it
   parsed every Milvus search reply of the pipeline ~10x slower), an import hook
   (``OldPb2Finder``) builds each of those modules from the serialized file descriptor it
   carries, as current protoc output does: same messages, any backend.
2. Stand-ins for two modules Paddle Serving imports at import time and the pipeline never uses:
   ``paddle_serving_client`` (its 0.9 wheels stop at Python 3.9; local Ops never call it) and
   ``paddle_serving_server.env_check.run`` (the ``serve check`` self-test; it imports ``pytest``,
   which a runtime install does not have).
3. ``paddle`` and ``paddle.inference`` imported in the main thread before the server starts:
   importing them in an Op's thread while the server forks its HTTP gateway can deadlock.
4. Its side effects contained: ``PipelineServingLogs/`` and ``ProcessInfo.json`` go to a chosen
   folder (not the working directory), the root logger is restored (it sets it to DEBUG with file
   handlers and disables every existing logger), and its ``print`` calls go to ``logging``.
5. Its children stopped: the Go HTTP gateway ignores SIGTERM, so it is killed; worker and Op
   processes are terminated, then killed; all of them are told to die with the server. On an
   init error Paddle Serving SIGKILLs its whole process group: here only its own process.
6. Its exposure contained: the gRPC server binds the configured host and takes messages up to
   ``max_body_bytes`` (it took 256 MB); a request whose ``key`` and ``value`` lists do not pair
   up, that repeats a key, or carries a tensor Paddle Serving would choke on (or unpickle:
   elem_type 13) is answered err_no 51 before the DAG runs (``pipeline_gateway.request_problem``).
   The HTTP gateway is by default ``pipeline_gateway`` (a Python process: binds the configured
   host, body limit, 400 on malformed JSON); ``gateway="go"`` keeps Paddle Serving's, which binds
   every interface whatever the host and reads bodies of any size.
"""

from __future__ import annotations

import ast
import contextlib
import ctypes
import functools
import importlib.abc
import importlib.machinery
import importlib.util
import logging
import multiprocessing
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import types
from collections.abc import Iterator
from concurrent import futures
from typing import Any

from .errors import PaddleRecMilvusError
from .pipeline_gateway import (
    DEFAULT_MAX_BODY_BYTES,
    ERR_BAD_REQUEST,
    READY_PATH,
    request_problem,
    rpc_target,
)

logger = logging.getLogger(__name__)
_PIPELINE_LOGGER = "paddle_serving_server"
_PRINTING_MODULES = ("pipeline_client", "operator", "pipeline_server", "dag", "error_catch", "analyse")
GATEWAYS = ("python", "go")
ERR_OVERLOADED = 54  # = serving_pipeline.ERR_OVERLOADED
# gRPC's own refusal past ``maximum_concurrent_rpcs`` (RESOURCE_EXHAUSTED with these details)
GRPC_LIMIT_DETAILS = "Concurrent RPC limit exceeded!"
GRPC_LIMIT_PER_WORKER = 2  # concurrent RPCs gRPC takes per thread (worker_num) before refusing
ARRIVAL_KEY = "pipeline.arrival"  # added to each request: time.monotonic() when the servicer got it
# added when the gRPC call has a deadline: that deadline as time.monotonic() (it caps the request's)
CALL_DEADLINE_KEY = "pipeline.call_deadline"
_NO_DEADLINE_S = 86400.0 * 365  # gRPC reports a call without a deadline as one far in the future
_load_lock = threading.Lock()


class ServingCompatError(PaddleRecMilvusError):
    """Paddle Serving cannot run in this process as it is (the message says why and what to do)."""


class OldPb2Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports Paddle Serving's ``*_pb2`` modules from the ``serialized_pb`` their files carry
    (read with ``ast``, never executed), built the way current protoc output builds itself."""

    PATTERN = re.compile(r"paddle_serving_server(\.pipeline)?\.proto\.\w+_pb2")

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if not self.PATTERN.fullmatch(name):
            return None
        spec = importlib.machinery.PathFinder.find_spec(name.rsplit(".", 1)[1], path)
        if spec is None or not spec.origin:
            return None
        return importlib.util.spec_from_loader(name, self, origin=spec.origin)

    def create_module(self, spec: Any) -> None:
        return None

    def exec_module(self, module: types.ModuleType) -> None:
        from google.protobuf import descriptor_pb2, descriptor_pool
        from google.protobuf.internal import builder

        origin = module.__spec__.origin
        blob = _serialized_descriptor(origin)
        package = module.__name__.rsplit(".", 1)[0]
        for dep in descriptor_pb2.FileDescriptorProto.FromString(blob).dependency:
            stem = dep[:-len(".proto")]
            if stem.startswith("paddle_serving_server/"):
                importlib.import_module(stem.replace("/", ".") + "_pb2")
            elif "/" not in stem and os.path.isfile(os.path.join(os.path.dirname(origin), f"{stem}_pb2.py")):
                importlib.import_module(f"{package}.{stem}_pb2")
        desc = descriptor_pool.Default().AddSerializedFile(blob)
        namespace = module.__dict__
        namespace["DESCRIPTOR"] = desc
        builder.BuildMessageAndEnumDescriptors(desc, namespace)
        builder.BuildTopDescriptorsAndMessages(desc, module.__name__, namespace)


def _serialized_descriptor(path: str) -> bytes:
    """The ``serialized_pb=`` argument of an old generated ``_pb2`` file (bytes, or ``_b('...')``)."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "serialized_pb":
            value = node.value
            if isinstance(value, ast.Call) and len(value.args) == 1:  # _b('...'): older protoc
                value = value.args[0]
            blob = ast.literal_eval(value)
            return blob.encode("latin-1") if isinstance(blob, str) else blob
    raise ServingCompatError(f"{path}: no serialized_pb found; is this a protoc-generated _pb2 file?")


def _install_pb2_finder() -> None:
    if not any(isinstance(f, OldPb2Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, OldPb2Finder())


def _install_client_stand_in() -> None:
    """``paddle_serving_client`` 0.9 has no Python 3.11 wheel; local pipeline Ops never call it."""
    if "paddle_serving_client" in sys.modules:
        return
    import importlib.util

    if importlib.util.find_spec("paddle_serving_client") is not None:
        return
    stand_in = types.ModuleType("paddle_serving_client")
    stand_in.__doc__ = "Stand-in installed by paddlerec_milvus.paddle_serving_compat (no 3.11 wheel)."

    class Client:  # noqa: D401 - mirrors the real class name the pipeline imports
        def __init__(self, *args: Any, **kwargs: Any):
            raise ServingCompatError("remote (brpc/grpc) Ops need paddle_serving_client, which has no "
                                     "Python 3.11 wheel; this project's Ops run locally")

    stand_in.Client = Client
    sys.modules["paddle_serving_client"] = stand_in


def _install_env_check_stand_in() -> None:
    """``paddle_serving_server/__init__`` imports ``serve``, which imports ``env_check.run``
    (``python -m paddle_serving_server.serve check``: Paddle Serving's pytest self-test), which
    imports ``pytest``: a test tool the pipeline never runs. The stand-in has its one name."""
    name = "paddle_serving_server.env_check.run"
    if name in sys.modules:
        return
    stand_in = types.ModuleType(name)
    stand_in.__doc__ = "Stand-in installed by paddlerec_milvus.paddle_serving_compat (needs no pytest)."

    def check_env(*args: Any, **kwargs: Any) -> None:
        raise ServingCompatError("Paddle Serving's environment self-test (serve check) is not available "
                                 "with paddlerec_milvus: it runs pytest suites the project does not ship")

    stand_in.check_env = check_env
    sys.modules[name] = stand_in


def preload_paddle() -> None:
    """Import paddle in the main thread, before any server thread or fork (avoids a deadlock)."""
    if threading.current_thread() is not threading.main_thread():
        raise ServingCompatError("import paddle in the main thread before starting Paddle Serving")
    import paddle  # noqa: F401
    import paddle.inference  # noqa: F401


@contextlib.contextmanager
def _contained_logging(log_dir: str | None, level: int) -> Iterator[None]:
    """Let the pipeline's logger module run, then undo what it did to the root logger."""
    root = logging.getLogger()
    saved_level, saved_handlers = root.level, list(root.handlers)
    saved_disabled = {name: lg.disabled for name, lg in logging.Logger.manager.loggerDict.items()
                      if isinstance(lg, logging.Logger)}
    try:
        yield
    finally:
        theirs = [h for h in root.handlers if h not in saved_handlers]
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
        for name, disabled in saved_disabled.items():
            logging.getLogger(name).disabled = disabled
        pipeline_logger = logging.getLogger(_PIPELINE_LOGGER)
        pipeline_logger.setLevel(level)
        pipeline_logger.propagate = False
        for h in theirs:
            if log_dir:
                pipeline_logger.addHandler(h)  # its files, under log_dir
            else:
                h.close()
        if not log_dir:
            pipeline_logger.addHandler(logging.NullHandler())


def _quiet_print(*args: Any, **kwargs: Any) -> None:
    """Replaces ``print`` inside Paddle Serving modules: their chatter goes to DEBUG logging."""
    if kwargs.get("file") not in (None, sys.stdout):
        print(*args, **kwargs)
        return
    logging.getLogger(_PIPELINE_LOGGER + ".print").debug(" ".join(str(a) for a in args))


def load_pipeline(log_dir: str | None = None, log_level: int = logging.ERROR,
                  with_paddle: bool = False) -> types.ModuleType:
    """Import ``paddle_serving_server.pipeline`` with every workaround applied; returns it.

    ``log_dir``: where ``PipelineServingLogs/`` and ``ProcessInfo.json`` go (a server passes
    one); ``None`` (clients) puts them in a temp folder and drops the pipeline's log records.
    ``with_paddle``: import paddle first, in the main thread (servers). Only the first call's
    ``log_dir`` counts: Paddle Serving reads it once, at import.
    """
    with _load_lock:
        loaded = sys.modules.get("paddle_serving_server.pipeline")
        if with_paddle:
            preload_paddle()
        if loaded is not None:
            return loaded
        _install_pb2_finder()
        _install_client_stand_in()
        _install_env_check_stand_in()
        home = os.path.abspath(log_dir) if log_dir else os.path.join(
            tempfile.gettempdir(), f"paddlerec_milvus_serving_{os.getuid()}")
        os.makedirs(home, exist_ok=True)
        os.environ["SERVING_HOME"] = home  # ProcessInfo.json
        os.environ["SERVING_LOG_PATH"] = home  # PipelineServingLogs/
        with _contained_logging(log_dir, log_level):
            import paddle_serving_server.pipeline as pipeline
        for name in _PRINTING_MODULES:
            module = sys.modules.get(f"paddle_serving_server.pipeline.{name}")
            if module is not None:
                module.print = _quiet_print
        sys.modules["paddle_serving_server.pipeline.error_catch"].kill_stop_process_by_pid = \
            _kill_only_this_process
        return pipeline


def process_info_path() -> str:
    """Where Paddle Serving wrote ``ProcessInfo.json`` (its CONF_HOME)."""
    from paddle_serving_server.env import CONF_HOME

    return os.path.join(CONF_HOME, "ProcessInfo.json")


_forking: dict[str, Any] = {"main": False, "pid": 0}


def _before_fork() -> None:
    _forking.update(main=threading.current_thread() is threading.main_thread(), pid=os.getpid())


def _child_signals() -> None:
    """In every child the server forks (Op processes, workers, gateway): the parent's SIGTERM
    handler would only set the parent's stop flag there, so restore the default; Ctrl-C reaches
    the whole process group, and the parent stops its children itself. Forked from the main
    thread, a child also dies with the server, even one killed hard or that ``os._exit``-ed
    (Paddle Serving does that on internal errors)."""
    with contextlib.suppress(ValueError, OSError):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    if _forking["main"]:  # PDEATHSIG follows the forking thread, so only the main one
        _die_with_parent(_forking["pid"])


def _kill_only_this_process(command: str, pid: int) -> None:
    """Stands in for Paddle Serving's ``kill_stop_process_by_pid``, which on an init error kills
    its whole process group: the shell or test runner that started the server with it."""
    logging.getLogger(_PIPELINE_LOGGER).critical("Paddle Serving stops on an internal error (see its logs)")
    os.kill(os.getpid(), signal.SIGKILL)


_fork_hook_installed = False


def _install_fork_hook() -> None:
    global _fork_hook_installed
    if not _fork_hook_installed:
        os.register_at_fork(before=_before_fork, after_in_child=_child_signals)
        _fork_hook_installed = True


def _libc_prctl() -> Any:
    with contextlib.suppress(Exception):
        return ctypes.CDLL(None, use_errno=True).prctl
    return None


_PRCTL = _libc_prctl()  # resolved now: no dlopen in a freshly forked child


def _die_with_parent(parent_pid: int) -> None:
    """Linux: the child gets SIGKILL when its parent dies, even if the parent is killed hard."""
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:
        os._exit(1)


def _run_go_gateway(grpc_port: int, http_port: int, parent_pid: int) -> None:
    """Child process: Paddle Serving's Go grpc-gateway (HTTP/JSON -> gRPC); never returns. It
    binds every interface (``*:http_port``) and has no request body limit."""
    _die_with_parent(parent_pid)
    from paddle_serving_server.pipeline import gateway

    lib = ctypes.cdll.LoadLibrary(os.path.join(os.path.dirname(gateway.__file__), "libproxy_server.so"))
    lib.run_proxy_server(grpc_port, http_port)


@functools.cache
def checked_servicer_class() -> type:
    """Paddle Serving's ``PipelineServicer`` with cheap structural checks before the DAG runs: a
    request it would only trip over deep inside (``err_no 8000 "list index out of range"``) or
    run (a pickled tensor) is answered err_no 51 with what is wrong."""
    load_pipeline()
    from paddle_serving_server.pipeline.pipeline_server import PipelineServicer
    from paddle_serving_server.pipeline.proto import pipeline_service_pb2

    class CheckedPipelineServicer(PipelineServicer):
        def __init__(self, *args: Any, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self.max_inflight: int | None = None  # requests in the DAG at once; past it err_no 54
            self._inflight = 0
            self._lock = threading.Lock()

        def inference(self, request: Any, context: Any) -> Any:
            problem = request_problem(request)
            if problem is not None:
                return pipeline_service_pb2.Response(err_no=ERR_BAD_REQUEST,
                                                     err_msg=f"bad request: {problem}")
            left = context.time_remaining() if context is not None else None
            if left is not None and left <= 0:
                # the caller's gRPC deadline passed while the call waited for a thread: not run
                return pipeline_service_pb2.Response(
                    err_no=ERR_OVERLOADED, err_msg="deadline exceeded: the call's gRPC deadline passed "
                                                   "before a server thread took it; it was not run")
            limit = self.max_inflight
            if limit is not None:
                with self._lock:
                    busy = self._inflight >= limit
                    if not busy:
                        self._inflight += 1
                if busy:  # refused by a free gRPC thread, before the DAG queues it
                    return pipeline_service_pb2.Response(
                        err_no=ERR_OVERLOADED, err_msg=f"overloaded: {limit} requests already in the "
                                                       "pipeline; retry shortly")
            # the request's arrival: its deadline counts from here (RecallService.prepare)
            now = time.monotonic()
            request.key.append(ARRIVAL_KEY)
            request.value.append(repr(now))
            if left is not None and left < _NO_DEADLINE_S:
                # gRPC measured the call's deadline from when it arrived, before any queue in
                # this process: a request that waited there runs only for what is left of it
                request.key.append(CALL_DEADLINE_KEY)
                request.value.append(repr(now + left))
            try:
                return super().inference(request, context)
            finally:
                if limit is not None:
                    with self._lock:
                        self._inflight -= 1

    return CheckedPipelineServicer


def is_concurrency_refusal(code: Any, details: str | None) -> bool:
    """True for gRPC's refusal past ``maximum_concurrent_rpcs`` (an overload, answered as err_no 54),
    as opposed to RESOURCE_EXHAUSTED for a message over the size limit (a bad request)."""
    return getattr(code, "name", code) == "RESOURCE_EXHAUSTED" and GRPC_LIMIT_DETAILS in (details or "")


def grpc_server_options(max_receive_bytes: int, reuse_port: bool = False) -> list[tuple[str, int]]:
    """A request over ``max_receive_bytes`` fails with RESOURCE_EXHAUSTED before it is read in
    full; answers are not limited (gRPC's default for sending)."""
    options = [("grpc.max_receive_message_length", int(max_receive_bytes))]
    if reuse_port:  # worker processes share the port
        options.append(("grpc.so_reuseport", 1))
    return options


def _add_port(server: Any, bind_address: str) -> None:
    try:
        bound = server.add_insecure_port(bind_address)
    except RuntimeError as exc:  # grpcio >= 1.5x raises; older ones return 0
        raise ServingCompatError(f"cannot bind gRPC port {bind_address}: {exc}") from None
    if not bound:
        raise ServingCompatError(f"cannot bind gRPC port {bind_address}")


def _run_worker(name: str, response_op: Any, conf: dict, index: int, bind_address: str,
                options: list, parent_pid: int) -> None:
    """Child process (``build_dag_each_worker``): one gRPC server with its own DAG (what Paddle
    Serving's ``_run_server_func`` does, with our options and checks)."""
    _die_with_parent(parent_pid)
    import grpc
    from paddle_serving_server.pipeline.proto import pipeline_service_pb2_grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1), options=options)
    pipeline_service_pb2_grpc.add_PipelineServiceServicer_to_server(
        checked_servicer_class()(name, response_op, conf, index), server)
    _add_port(server, bind_address)
    server.start()
    server.wait_for_termination()


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host.strip("[]"), port), timeout=timeout):
        return True
    return False


def stop_process(proc: multiprocessing.Process | subprocess.Popen, term_timeout: float = 5.0) -> None:
    """SIGTERM, wait, SIGKILL, reap: the Go gateway ignores SIGTERM, Python children do not."""
    if isinstance(proc, subprocess.Popen):
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(term_timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
        return
    if proc.pid is None:
        return
    if proc.is_alive():
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        proc.join(term_timeout)
    if proc.is_alive():
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)


def _exited(proc: multiprocessing.Process | subprocess.Popen, name: str) -> str | None:
    if isinstance(proc, subprocess.Popen):
        code = proc.poll()
        return None if code is None else f"{name} (pid {proc.pid}, exit code {code})"
    if proc.pid is not None and not proc.is_alive():
        return f"{proc.name} (pid {proc.pid}, exit code {proc.exitcode})"
    return None


def _is_wildcard(host: str) -> bool:
    return host.strip("[]") in ("", "0.0.0.0", "::")


class PipelineRunner:
    """Runs a Paddle Serving pipeline (gRPC server + HTTP gateway) with a real ``stop()``.

    Paddle Serving's own ``run_server`` blocks forever and leaves its gateway child running;
    this starts the same parts (a checked ``PipelineServicer`` on a gRPC server, or one worker
    process per ``worker_num`` with ``build_dag_each_worker``; an HTTP gateway process) and stops
    them all.

    ``host``: where the gRPC server and the HTTP gateway bind. ``gateway``: ``"python"``
    (``paddlerec_milvus.pipeline_gateway``: binds ``host``, bodies up to ``max_body_bytes``) or
    ``"go"`` (Paddle Serving's ``libproxy_server.so``: binds every interface whatever ``host``
    says, and reads bodies of any size). ``max_body_bytes`` also limits gRPC request messages.
    """

    def __init__(self, name: str, response_op: Any, conf: dict[str, Any], host: str = "127.0.0.1",
                 log_dir: str | None = None, gateway: str = "python",
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, max_inflight: int | None = None):
        if gateway not in GATEWAYS:
            raise ServingCompatError(f"gateway = {gateway!r}: expected one of {list(GATEWAYS)}")
        if isinstance(max_body_bytes, bool) or not isinstance(max_body_bytes, int) or max_body_bytes < 1024:
            raise ServingCompatError(f"max_body_bytes = {max_body_bytes!r} must be an integer >= 1024")
        self.name, self.response_op, self.conf, self.host = name, response_op, conf, host
        self.log_dir, self.gateway, self.max_body_bytes = log_dir, gateway, max_body_bytes
        self.max_inflight = max_inflight
        self.rpc_port: int = int(conf["rpc_port"])
        self.http_port: int | None = conf.get("http_port")
        self._server: Any = None
        self._grpc: Any = None
        self._servicer: Any = None
        self._children: list[multiprocessing.Process] = []
        self._gateway: multiprocessing.Process | subprocess.Popen | None = None

    @property
    def gateway_pid(self) -> int | None:
        return self._gateway.pid if self._gateway is not None else None

    def prepare(self) -> None:
        """Check the config and ports, build the DAG's Ops, start the HTTP gateway.

        The gateway starts here, before the caller loads models or opens Milvus connections:
        the Go one is forked, so its child starts from a process without gRPC channels or
        predictors; the Python one is a fresh interpreter and loads meanwhile.
        """
        pipeline = load_pipeline(self.log_dir, with_paddle=True)
        _install_fork_hook()
        server = pipeline.PipelineServer(self.name)
        server.set_response_op(self.response_op)
        try:
            server.prepare_server(yml_dict=self.conf)  # checks ports and Op conf, writes ProcessInfo.json
        except SystemExit as exc:  # Paddle Serving reports config and port problems this way
            raise ServingCompatError(f"Paddle Serving refused to start: {exc}") from None
        self._server = server
        if not self.http_port:
            return
        if self.gateway == "go":
            if not _is_wildcard(self.host):
                logger.warning("the Go HTTP gateway binds every interface (*:%s) whatever host=%r says, "
                               "and reads request bodies of any size", self.http_port, self.host)
            self._gateway = multiprocessing.Process(
                target=_run_go_gateway, name="pipeline-http-gateway",
                args=(self.rpc_port, int(self.http_port), os.getpid()), daemon=True)
            self._gateway.start()
        else:
            self._gateway = self._start_python_gateway(server._conf)

    def _start_python_gateway(self, conf: dict[str, Any]) -> subprocess.Popen:
        """``python -m paddlerec_milvus.pipeline_gateway`` in a fresh interpreter (not a fork of a
        process with gRPC threads), told to die with this process."""
        channels = int(conf["worker_num"]) if conf.get("build_dag_each_worker") else 1
        cmd = [sys.executable, "-m", "paddlerec_milvus.pipeline_gateway", "--name", self.name,
               "--host", self.host.strip("[]"), "--port", str(int(self.http_port)),
               "--rpc", rpc_target(self.host, self.rpc_port), "--max-body-bytes", str(self.max_body_bytes),
               "--channels", str(channels), "--parent-pid", str(os.getpid())]
        env = dict(os.environ)
        env.pop("PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION", None)  # the default (upb) backend: fast protobuf
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        if os.path.basename(package_root) not in ("site-packages", "dist-packages"):  # a source tree
            env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        # PDEATHSIG follows the thread that forks: only from the main one (the gateway also
        # watches its parent pid itself)
        on_main = threading.current_thread() is threading.main_thread()
        preexec = functools.partial(_die_with_parent, os.getpid()) if on_main else None
        try:
            return subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    preexec_fn=preexec)
        except OSError as exc:
            raise ServingCompatError(f"cannot start the HTTP gateway ({cmd[0]}): {exc}") from None

    def start(self, ready_timeout: float = 60.0) -> None:
        """Start the gRPC server (or the worker processes); return once both ports answer."""
        if self._server is None:
            self.prepare()
        from paddle_serving_server.pipeline.proto import pipeline_service_pb2_grpc

        conf = self._server._conf
        bind = rpc_target(self.host, self.rpc_port) if not _is_wildcard(self.host) else \
            f"{'[::]' if ':' in self.host else '0.0.0.0'}:{self.rpc_port}"
        try:
            if conf["build_dag_each_worker"]:
                options = grpc_server_options(self.max_body_bytes, reuse_port=True)
                for i in range(conf["worker_num"]):
                    p = multiprocessing.Process(
                        target=_run_worker, name=f"pipeline-worker-{i}",
                        args=(self.name, self.response_op, conf, i, bind, options, os.getpid()))
                    p.start()
                    self._children.append(p)
            else:
                import grpc

                self._servicer = checked_servicer_class()(self.name, self.response_op, conf)
                if self.max_inflight:
                    self._servicer.max_inflight = min(self.max_inflight, conf["worker_num"])
                    if self.max_inflight >= conf["worker_num"]:
                        logger.warning("max_inflight %d >= worker_num %d: requests past %d wait in "
                                       "gRPC's queue for a thread instead of being refused at once; "
                                       "set worker_num above max_inflight", self.max_inflight,
                                       conf["worker_num"], conf["worker_num"])
                # past GRPC_LIMIT_PER_WORKER x worker_num RPCs, gRPC refuses at once
                # (RESOURCE_EXHAUSTED, before the request is read) instead of queueing it for a
                # thread without bound: under 2x load that queue grew to seconds. The headroom
                # (at most worker_num calls wait, about one service time) is for calls that have
                # answered but not yet left gRPC's count: at exactly worker_num clients a limit
                # of worker_num refused some of them
                limit = GRPC_LIMIT_PER_WORKER * conf["worker_num"]
                self._grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=conf["worker_num"]),
                                         options=grpc_server_options(self.max_body_bytes),
                                         maximum_concurrent_rpcs=limit)
                pipeline_service_pb2_grpc.add_PipelineServiceServicer_to_server(self._servicer, self._grpc)
                _add_port(self._grpc, bind)
                self._grpc.start()
            self._wait_ready(ready_timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float) -> None:
        probe = "127.0.0.1" if _is_wildcard(self.host) else self.host.strip("[]")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = self.dead_child()
            if dead:
                raise ServingCompatError(f"{dead} exited during start (see {self.log_dir or 'logs'} "
                                         "and stderr)")
            if port_open(probe, self.rpc_port) and (not self.http_port or self._gateway_connected()):
                return
            time.sleep(0.1)
        raise ServingCompatError(f"pipeline ports {self.rpc_port}/{self.http_port} not open after "
                                 f"{timeout:.0f} s")

    def _gateway_connected(self) -> bool:
        """Ready means the gateway reaches the gRPC server.

        Python gateway: ``GET /-/ready`` answers 200 with its pid once its channel is connected.
        Go gateway: it dials gRPC once at start and backs off (1 s, 1.6 s, ...) after a refusal,
        answering 503 meanwhile, so a request must reach the gRPC server through it; the probe
        names no service, so the server answers "service name error" without running Ops."""
        import json
        import urllib.error
        import urllib.request

        if self.gateway == "python":
            req = urllib.request.Request(f"http://{rpc_target(self.host, int(self.http_port))}{READY_PATH}")
        else:
            req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}/__ready_probe__/prediction",
                                         data=b"{}", method="POST")
        try:
            with urllib.request.urlopen(req, timeout=2) as r:
                body = r.read()
        except (urllib.error.URLError, OSError):
            return False
        if self.gateway == "go":
            return b"err_no" in body
        with contextlib.suppress(ValueError):
            answer = json.loads(body)
            return answer.get("ready") is True and answer.get("pid") == self.gateway_pid
        return False

    def dead_child(self) -> str | None:
        """Name of a child (gateway, worker) that has exited, if any: the server is then broken."""
        for p in self._children:
            dead = _exited(p, p.name)
            if dead:
                return dead
        if self._gateway is not None:
            return _exited(self._gateway, f"pipeline-http-gateway ({self.gateway})")
        return None

    def stop(self, grace: float = 3.0) -> None:
        """Stop serving: finish in-flight calls (up to ``grace`` s), stop the DAG, end every child."""
        if self._gateway is not None:  # new HTTP requests stop first; the Python one finishes its own
            stop_process(self._gateway, term_timeout=0.5 if self.gateway == "go" else grace + 2)
            self._gateway = None
        if self._grpc is not None:
            self._grpc.stop(grace).wait(grace + 5)
            self._grpc = None
        if self._servicer is not None:
            with contextlib.suppress(Exception):
                self._servicer._dag_executor.stop()
            self._servicer = None
        for p in self._children:
            stop_process(p)
        self._children = []
        if self._server is not None and not self._server._conf["dag"]["is_thread_op"]:
            for p in multiprocessing.active_children():  # Op processes and their channel managers
                stop_process(p, term_timeout=2.0)
        if self._server is not None:
            with contextlib.suppress(Exception):
                path = process_info_path()
                if os.path.isfile(path):
                    os.remove(path)
            self._server = None
