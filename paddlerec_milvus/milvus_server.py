"""Start and stop a real Milvus standalone server from the PyPI ``milvus`` package.

For tests, benchmarks and single-machine deployments without Docker. Every port is picked
free on loopback, so it never collides with another Milvus; ``stop`` sends SIGINT (what the
launcher expects), waits, and makes sure the ``milvus run standalone`` child is gone.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

from .errors import MilvusIndexError

logger = logging.getLogger(__name__)
_PORT_FLAGS = ("--etcd-port", "--root-coord-port", "--proxy-internal-port", "--query-coord-port",
               "--query-node-port", "--index-coord-port", "--index-node-port", "--data-coord-port",
               "--data-node-port")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MilvusServer:
    """``with MilvusServer(data_dir) as srv: srv.uri`` -> ``http://127.0.0.1:PORT``."""

    def __init__(self, data_dir: str, port: int | None = None, ready_timeout: float = 90.0):
        self.data_dir = os.path.abspath(data_dir)
        self.port = port or free_port()
        self.ready_timeout = ready_timeout
        self.proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _launcher(self) -> list[str]:
        exe = shutil.which("milvus-server", path=os.path.dirname(sys.executable) + os.pathsep
                           + os.environ.get("PATH", ""))
        if not exe:
            raise MilvusIndexError("milvus-server not found: pip install milvus==2.3.5")
        return [exe]

    def start(self) -> MilvusServer:
        os.makedirs(self.data_dir, exist_ok=True)
        cmd = self._launcher() + ["--data", self.data_dir, "--proxy-port", str(self.port)]
        for flag in _PORT_FLAGS:
            cmd += [flag, str(free_port())]
        log = open(os.path.join(self.data_dir, "server.log"), "ab")
        env = dict(os.environ, METRICS_PORT=str(free_port()))
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        log.close()
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise MilvusIndexError(
                    f"milvus-server exited with {self.proc.returncode}; see {self.data_dir}/server.log")
            if self._ready():
                logger.info("Milvus server ready at %s (data %s)", self.uri, self.data_dir)
                return self
            time.sleep(0.5)
        self.stop()
        raise MilvusIndexError(f"milvus-server not ready after {self.ready_timeout:.0f} s; "
                               f"see {self.data_dir}/server.log")

    def _ready(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                pass
        except OSError:
            return False
        from pymilvus import MilvusClient

        try:
            client = MilvusClient(uri=self.uri, timeout=3)
            client.list_collections()
            client.close()
            return True
        except Exception:
            return False

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is None:
            return
        pgid = self.proc.pid
        if self.proc.poll() is None:
            try:
                os.killpg(pgid, signal.SIGINT)
                self.proc.wait(timeout=timeout)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                pass
        try:  # the standalone child shares the process group; make sure it is gone
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if self.proc.poll() is None:
            self.proc.wait(timeout=10)
        self.proc = None

    def __enter__(self) -> MilvusServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
