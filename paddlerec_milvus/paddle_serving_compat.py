"""Running Paddle Serving 0.9 (built for Python <= 3.9) on Python 3.11: the only module that knows how.

``paddle-serving-server==0.9.0`` is installed with ``--no-deps`` (its pins do not resolve on 3.11).
Its pipeline mode then works, given what this module does (DESIGN.md, "Paddle Serving 0.9 on
Python 3.11"):

1. ``PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python`` before ``google.protobuf`` is imported: its
   generated ``_pb2`` files predate protobuf 4 and fail on the upb backend. Set when this module
   is imported, so import it first.
2. A stand-in ``paddle_serving_client`` module: the pipeline imports it at import time, but its
   0.9 wheels stop at Python 3.9 and local Ops never use it.
3. ``paddle`` and ``paddle.inference`` imported in the main thread before the server starts:
   importing them in an Op's thread while the server forks its HTTP gateway can deadlock.
4. Its side effects contained: ``PipelineServingLogs/`` and ``ProcessInfo.json`` go to a chosen
   folder (not the working directory), the root logger is restored (it sets it to DEBUG with file
   handlers and disables every existing logger), and its ``print`` calls go to ``logging``.
5. Its children stopped: the Go HTTP gateway ignores SIGTERM, so it is killed; worker and Op
   processes are terminated, then killed; all of them are told to die with the server. On an
   init error Paddle Serving SIGKILLs its whole process group: here only its own process.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import os
import signal
import socket
import sys
import tempfile
import threading
import time
import types
from collections.abc import Iterator
from concurrent import futures
from typing import Any

os.environ.setdefault("PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION", "python")

from .errors import PaddleRecMilvusError  # noqa: E402 - after the protobuf setting, on purpose

logger = logging.getLogger(__name__)
_PIPELINE_LOGGER = "paddle_serving_server"
_PRINTING_MODULES = ("pipeline_client", "operator", "pipeline_server", "dag", "error_catch", "analyse")
_GRPC_OPTIONS = [("grpc.max_send_message_length", 256 * 1024 * 1024),
                 ("grpc.max_receive_message_length", 256 * 1024 * 1024)]
_load_lock = threading.Lock()


class ServingCompatError(PaddleRecMilvusError):
    """Paddle Serving cannot run in this process as it is (the message says why and what to do)."""


def _check_protobuf() -> None:
    """The old ``_pb2`` files need the pure-Python protobuf; too late once protobuf chose upb."""
    if "google.protobuf" not in sys.modules:
        return
    from google.protobuf.internal import api_implementation

    if api_implementation.Type() != "python":
        raise ServingCompatError(
            f"google.protobuf was imported with the {api_implementation.Type()!r} backend before "
            "paddlerec_milvus.paddle_serving_compat; Paddle Serving 0.9 needs "
            "PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python: import this module first or set the variable")


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
        _check_protobuf()
        _install_client_stand_in()
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


def _run_gateway(grpc_port: int, http_port: int, parent_pid: int) -> None:
    """Child process: Paddle Serving's Go grpc-gateway (HTTP/JSON -> gRPC); never returns."""
    _die_with_parent(parent_pid)
    from paddle_serving_server.pipeline import gateway

    lib = ctypes.cdll.LoadLibrary(os.path.join(os.path.dirname(gateway.__file__), "libproxy_server.so"))
    lib.run_proxy_server(grpc_port, http_port)


def _run_worker(server: Any, bind_address: str, response_op: Any, conf: dict, index: int,
                parent_pid: int) -> None:
    """Child process (``build_dag_each_worker``): one gRPC server with its own DAG."""
    _die_with_parent(parent_pid)
    server._run_server_func(bind_address, response_op, conf, index)


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=timeout):
        return True
    return False


def stop_process(proc: multiprocessing.Process, term_timeout: float = 5.0) -> None:
    """SIGTERM, wait, SIGKILL, reap: the Go gateway ignores SIGTERM, Python workers do not."""
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


class PipelineRunner:
    """Runs a Paddle Serving pipeline (gRPC server + HTTP gateway) with a real ``stop()``.

    Paddle Serving's own ``run_server`` blocks forever and leaves its gateway child running;
    this starts the same parts (``PipelineServicer`` on a gRPC server, or one worker process per
    ``worker_num`` with ``build_dag_each_worker``; the Go gateway in a child) and stops them all.
    """

    def __init__(self, name: str, response_op: Any, conf: dict[str, Any], host: str = "0.0.0.0",
                 log_dir: str | None = None):
        self.name, self.response_op, self.conf, self.host = name, response_op, conf, host
        self.log_dir = log_dir
        self.rpc_port: int = int(conf["rpc_port"])
        self.http_port: int | None = conf.get("http_port")
        self._server: Any = None
        self._grpc: Any = None
        self._servicer: Any = None
        self._children: list[multiprocessing.Process] = []
        self._gateway: multiprocessing.Process | None = None

    def prepare(self) -> None:
        """Check the config and ports, build the DAG's Ops, fork the HTTP gateway.

        The gateway is forked here, before the caller loads models or opens Milvus
        connections, so the child starts from a process without gRPC channels or predictors.
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
        if self.http_port:
            self._gateway = multiprocessing.Process(
                target=_run_gateway, name="pipeline-http-gateway",
                args=(self.rpc_port, int(self.http_port), os.getpid()), daemon=True)
            self._gateway.start()

    def start(self, ready_timeout: float = 60.0) -> None:
        """Start the gRPC server (or the worker processes); return once both ports answer."""
        if self._server is None:
            self.prepare()
        from paddle_serving_server.pipeline.pipeline_server import PipelineServicer
        from paddle_serving_server.pipeline.proto import pipeline_service_pb2_grpc

        conf = self._server._conf
        try:
            if conf["build_dag_each_worker"]:
                for i in range(conf["worker_num"]):
                    p = multiprocessing.Process(
                        target=_run_worker, name=f"pipeline-worker-{i}",
                        args=(self._server, f"{self.host}:{self.rpc_port}", self.response_op, conf, i,
                              os.getpid()))
                    p.start()
                    self._children.append(p)
            else:
                import grpc

                self._servicer = PipelineServicer(self.name, self.response_op, conf)
                self._grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=conf["worker_num"]),
                                         options=_GRPC_OPTIONS)
                pipeline_service_pb2_grpc.add_PipelineServiceServicer_to_server(self._servicer, self._grpc)
                if not self._grpc.add_insecure_port(f"{self.host}:{self.rpc_port}"):
                    raise ServingCompatError(f"cannot bind gRPC port {self.host}:{self.rpc_port}")
                self._grpc.start()
            self._wait_ready(ready_timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float) -> None:
        probe = "127.0.0.1" if self.host in ("0.0.0.0", "", "[::]", "::") else self.host
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = self.dead_child()
            if dead:
                raise ServingCompatError(f"{dead} exited during start (see {self.log_dir or 'logs'})")
            if port_open(probe, self.rpc_port) and (not self.http_port or self._gateway_connected()):
                return
            time.sleep(0.1)
        raise ServingCompatError(f"pipeline ports {self.rpc_port}/{self.http_port} not open after "
                                 f"{timeout:.0f} s")

    def _gateway_connected(self) -> bool:
        """The Go gateway dials gRPC once at start and backs off (1 s, 1.6 s, ...) after a refusal,
        answering 503 meanwhile: ready means a request reached the gRPC server through it. The
        probe names no service, so the server answers "service name error" without running Ops."""
        import urllib.error
        import urllib.request

        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}/__ready_probe__/prediction",
                                     data=b"{}", method="POST")
        try:
            with urllib.request.urlopen(req, timeout=2) as r:
                return b"err_no" in r.read()
        except (urllib.error.URLError, OSError):
            return False

    def dead_child(self) -> str | None:
        """Name of a child (gateway, worker) that has exited, if any: the server is then broken."""
        for p in [*self._children, *([self._gateway] if self._gateway else [])]:
            if p.pid is not None and not p.is_alive():
                return f"{p.name} (pid {p.pid}, exit code {p.exitcode})"
        return None

    def stop(self, grace: float = 3.0) -> None:
        """Stop serving: finish in-flight calls (up to ``grace`` s), stop the DAG, end every child."""
        if self._gateway is not None:
            stop_process(self._gateway, term_timeout=0.5)  # new HTTP requests stop first
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
