"""Start, stop and kill a real Milvus standalone server from the PyPI ``milvus`` package.

For tests, benchmarks and single-machine deployments without Docker. Every port is picked free,
so it never collides with another Milvus, and every listener binds ``host`` (loopback by default).

Milvus 2.3.5 itself cannot be told where to listen: its gRPC servers (proxy, internal proxy,
root/data/query coordinators, query/data/index nodes) call ``net.Listen("tcp", ":PORT")`` and the
metrics/health HTTP server ``":$METRICS_PORT"`` whatever ``proxy.ip``, ``rootCoord.ip``, ... say (those
keys only set the address a component *advertises* to the others), so all of them bind every
interface (``*:PORT``). The embedded etcd listens on fixed ``localhost:2379`` and ``:2380`` unless
given its own config file. What this module does about each:

* embedded etcd: an etcd config file (``ETCD_CONFIG_PATH``) with ``listen-client-urls`` and
  ``listen-peer-urls`` on ``host`` and free ports (so two servers on one host no longer clash on
  2379/2380 either); ``etcd.endpoints`` points there;
* advertised addresses: ``proxy.ip``, ``rootCoord.ip``, ``queryCoord.ip``, ``queryNode.ip``,
  ``indexNode.ip``, ``dataCoord.ip``, ``dataNode.ip`` are set to ``host``, so the components talk to
  each other over loopback instead of the machine's first unicast address;
* the wildcard listeners: the server runs under a seccomp filter that hands every ``bind(2)`` to a
  supervising thread in this process (``SECCOMP_RET_USER_NOTIF``); a bind to ``0.0.0.0`` or ``::`` is
  done by the supervisor instead, on a duplicate of the same socket (``pidfd_getfd``), to ``host``
  (``::ffff:HOST`` for a dual-stack IPv6 socket, ``::1`` for an IPv6-only one) and the same port;
  any other bind runs unchanged. So proxy, metrics and internal ports all listen on loopback only.

It needs Linux >= 5.9 on x86_64 or aarch64 and the right to ``pidfd_getfd`` a child's socket (the
same user; Yama ``ptrace_scope`` <= 1 is fine, this process is the server's ancestor); where that is
missing ``start`` raises rather than let Milvus open ``*:PORT``. The filter answers binds only
while this process lives (Milvus binds at start-up only); a server outliving it would get ENOSYS.
It keeps a well-behaved server on ``host``; it is no sandbox against code that wants out (other ABIs,
a later bind racing the check). ``host="0.0.0.0"`` (or ``"::"``) turns the filter off: Milvus's own
listeners then bind all interfaces as it does by default (etcd stays on loopback).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import ipaddress
import json
import logging
import os
import platform
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from importlib.util import find_spec

from .atomic_file import write_atomically
from .errors import MilvusIndexError

logger = logging.getLogger(__name__)

# launcher flags of `milvus-server` (values picked free per server), besides --proxy-port
_PORT_FLAGS = ("--etcd-port", "--root-coord-port", "--proxy-internal-port", "--query-coord-port",
               "--query-node-port", "--index-coord-port", "--index-node-port", "--data-coord-port",
               "--data-node-port")
_IP_KEYS = ("proxy.ip", "rootCoord.ip", "queryCoord.ip", "queryNode.ip", "indexNode.ip",
            "dataCoord.ip", "dataNode.ip")
_WILDCARD_HOSTS = ("0.0.0.0", "::", "")
# Server settings for a data directory this launcher creates. A bulk refill (insert, flush, index,
# load; 38.5k x 64) waits on the server's own clocks: a sealed segment is flushed only once its
# row assignments expire (dataCoord.segment.assignmentExpiration, 2,000 ms), and load steps advance
# on query-coordinator ticks (checkInterval 1,000 ms, distPullInterval 500 ms). With these: refill
# 6.9-7.0 s -> 4.9-5.0 s (flush 2.4 -> 1.1 s, load 3.4-4.0 -> 3.0-3.4 s). Milvus warns that a lower
# assignmentExpiration than a data directory was last run with can lose data, so a directory is
# only ever started with the settings it was created with (SETTINGS_FILE); one made without this
# file keeps Milvus's defaults.
FAST_HANDOFF = {"dataCoord.segment.assignmentExpiration": 500, "queryCoord.checkInterval": 100,
                "queryCoord.distPullInterval": 100}
SETTINGS_FILE = "launcher_settings.json"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _port_free(host: str, port: int) -> bool:
    """Whether ``port`` can be listened on (SO_REUSEADDR: TIME_WAIT leftovers do not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            s.listen()
        except OSError:
            return False
    return True


# -- seccomp user notification: wildcard bind(2) -> bind to ``host`` ------------------------------
# machine: (AUDIT_ARCH_*, __NR_bind, __NR_seccomp); pidfd_open/pidfd_getfd are 434/438 on both
_ARCHES = {"x86_64": (0xC000003E, 49, 317), "aarch64": (0xC00000B7, 200, 277)}
_NR_PIDFD_OPEN, _NR_PIDFD_GETFD = 434, 438
_PR_SET_NO_NEW_PRIVS = 38
_SECCOMP_SET_MODE_FILTER = 1
_FLAG_NEW_LISTENER, _FLAG_WAIT_KILLABLE_RECV = 1 << 3, 1 << 5
_RET_USER_NOTIF, _RET_ALLOW = 0x7FC00000, 0x7FFF0000
_NOTIF = struct.Struct("=QIIiIQ6Q")  # struct seccomp_notif: id, pid, flags, seccomp_data
_RESP = struct.Struct("=QqiI")  # struct seccomp_notif_resp: id, val, error, flags
_IOCTL_RECV = 0xC0000000 | (_NOTIF.size << 16) | 0x2100  # _IOWR('!', 0, struct seccomp_notif)
_IOCTL_SEND = 0xC0000000 | (_RESP.size << 16) | 0x2101  # _IOWR('!', 1, struct seccomp_notif_resp)
_IOCTL_ID_VALID = 0x40000000 | (8 << 16) | 0x2102  # _IOW('!', 2, __u64)
_USER_NOTIF_FLAG_CONTINUE = 1


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc


def _syscall(libc: ctypes.CDLL, nr: int, *args: object) -> int:
    ret = libc.syscall(nr, *args)
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


def _install_bind_filter() -> int:
    """In the server's first process: notify every bind(2) to a listener; returns its fd."""
    machine = platform.machine()
    if sys.platform != "linux" or machine not in _ARCHES:
        raise OSError(errno.ENOSYS, f"bind rewriting is implemented for Linux x86_64/aarch64, "
                                    f"not {sys.platform} {machine}")
    audit_arch, nr_bind, nr_seccomp = _ARCHES[machine]
    libc = _libc()
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_NO_NEW_PRIVS): {os.strerror(err)}")
    ld, jeq, ret = 0x20, 0x15, 0x06  # BPF_LD|BPF_W|BPF_ABS, BPF_JMP|BPF_JEQ|BPF_K, BPF_RET|BPF_K
    code = [(ld, 0, 0, 4),  # A = seccomp_data.arch
            (jeq, 0, 3, audit_arch),  # another ABI: allow
            (ld, 0, 0, 0),  # A = seccomp_data.nr
            (jeq, 0, 1, nr_bind),
            (ret, 0, 0, _RET_USER_NOTIF),
            (ret, 0, 0, _RET_ALLOW)]
    raw = b"".join(struct.pack("=HBBI", *insn) for insn in code)
    buf = ctypes.create_string_buffer(raw, len(raw))

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    prog = SockFprog(len(code), ctypes.cast(buf, ctypes.c_void_p))
    try:  # WAIT_KILLABLE_RECV (5.19+): Go's preemption signals do not restart a bind being handled
        return _syscall(libc, nr_seccomp, _SECCOMP_SET_MODE_FILTER,
                        _FLAG_NEW_LISTENER | _FLAG_WAIT_KILLABLE_RECV, ctypes.byref(prog))
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
    return _syscall(libc, nr_seccomp, _SECCOMP_SET_MODE_FILTER, _FLAG_NEW_LISTENER, ctypes.byref(prog))


class _BindRewriter:
    """Answers the filter's notifications: a wildcard bind is done on ``ip`` instead."""

    def __init__(self, listener: int, ip: str):
        self.listener, self.ip = listener, ip
        self.rewritten: list[tuple[int, str, int]] = []  # (pid, bound address, port)
        self._libc = _libc()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="milvus-bind-rewriter", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        if self.listener >= 0:
            os.close(self.listener)
            self.listener = -1

    def _loop(self) -> None:
        poller = select.poll()
        poller.register(self.listener, select.POLLIN)
        while not self._stop.is_set():
            events = poller.poll(200)
            if not events:
                continue
            if not events[0][1] & select.POLLIN:
                return  # POLLHUP: every process under the filter has exited
            buf = bytearray(_NOTIF.size)
            try:
                fcntl.ioctl(self.listener, _IOCTL_RECV, buf, True)
            except OSError:
                continue  # ENOENT: the caller died (or was interrupted) before we got it
            nid, tid, _flags, _nr, _arch, _ip, sockfd, addr, addrlen, *_ = _NOTIF.unpack(buf)
            try:
                result = self._handle(nid, tid, sockfd, addr, addrlen)
            except Exception:  # fail closed: the bind fails rather than go through unchanged
                logger.exception("bind rewriter: cannot handle a bind of pid %d", tid)
                result = errno.EPERM
            if result is None:
                resp = _RESP.pack(nid, 0, 0, _USER_NOTIF_FLAG_CONTINUE)
            else:
                resp = _RESP.pack(nid, 0, -result, 0)
            try:
                fcntl.ioctl(self.listener, _IOCTL_SEND, bytearray(resp), True)
            except OSError:
                pass  # the caller is gone

    def _handle(self, nid: int, tid: int, sockfd: int, addr: int, addrlen: int) -> int | None:
        """None: let the bind run as asked; else the errno it returns (0: done here)."""
        if not 2 <= addrlen <= 128:
            return None
        fd = os.open(f"/proc/{tid}/mem", os.O_RDONLY)
        try:
            raw = os.pread(fd, addrlen, addr)
        finally:
            os.close(fd)
        fcntl.ioctl(self.listener, _IOCTL_ID_VALID, bytearray(struct.pack("=Q", nid)), True)
        family = struct.unpack_from("=H", raw)[0]
        if family == socket.AF_INET and len(raw) >= 8:
            wildcard = raw[4:8] == bytes(4)
        elif family == socket.AF_INET6 and len(raw) >= 24:
            wildcard = raw[8:24] == bytes(16)
        else:
            return None  # unix sockets and the like
        if not wildcard:
            return None
        port = struct.unpack_from("!H", raw, 2)[0]
        with open(f"/proc/{tid}/status") as f:
            tgid = next(int(line.split()[1]) for line in f if line.startswith("Tgid:"))
        pidfd = _syscall(self._libc, _NR_PIDFD_OPEN, tgid, 0)
        try:
            dup = _syscall(self._libc, _NR_PIDFD_GETFD, pidfd, sockfd, 0)
        finally:
            os.close(pidfd)
        with socket.socket(fileno=dup) as s:  # the caller's socket, through our own fd
            if s.family == socket.AF_INET6:
                v6only = s.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)
                target = ("::1" if v6only else "::ffff:" + self.ip, port)
            else:
                target = (self.ip, port)
            try:
                s.bind(target)
            except OSError as exc:  # a bind restarted after a signal: it is already done
                bound = s.getsockname()
                if exc.errno != errno.EINVAL or bound[0] != target[0] or port not in (0, bound[1]):
                    return exc.errno or errno.EINVAL
            bound = s.getsockname()
        self.rewritten.append((tgid, bound[0], bound[1]))
        return 0


def _child_main() -> None:
    """The server's first process: install the filter, hand it over, become ``milvus-server``.

    argv: NOTIFY_FD (-1: no filter) HOST METRICS_PORT LAUNCHER_ARGS..."""
    notify_fd, host, metrics_port = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    if notify_fd >= 0:
        with socket.socket(fileno=notify_fd) as chan:
            try:
                listener = _install_bind_filter()
            except OSError as exc:
                chan.sendall(f"E{exc}".encode())
                sys.exit(3)
            socket.send_fds(chan, [b"L"], [listener])
            os.close(listener)
    import milvus  # the launcher of the PyPI package, patched where it cannot be configured

    def try_bind_port(self: object, port: int) -> socket.socket | None:
        # the launcher's probe of each port, on HOST, and with SO_REUSEADDR: Milvus itself listens
        # with it, so connections of a killed server in TIME_WAIT must not make a restart fail
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
            sock.listen()
            return sock
        except (OSError, OverflowError, ValueError):
            sock.close()
            return None

    milvus.MilvusServerConfig.try_bind_port = try_bind_port
    milvus.default_server.webservice_port = metrics_port  # else the first free port from 9091 on
    milvus.default_server.wait_for_started = False  # it polls 127.0.0.1; MilvusServer waits itself
    sys.argv = ["milvus-server", *sys.argv[4:]]
    sys.exit(milvus.main())


def _group_members(pgid: int) -> list[int]:
    """Processes of process group ``pgid`` that still hold resources (ports, files).

    A zombie counts as gone unless other threads of it are still exiting: the main thread of a
    killed multi-threaded process (Milvus) turns zombie before the last thread closes its sockets."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if len(fields) < 3 or int(fields[2]) != pgid:
                continue
            if fields[0] == "Z" and len(os.listdir(f"/proc/{d}/task")) <= 1:
                continue
        except (OSError, IndexError, ValueError):
            continue
        out.append(int(d))
    return out


class MilvusServer:
    """``with MilvusServer(data_dir) as srv: srv.uri`` -> ``http://127.0.0.1:PORT``.

    Every listener binds ``host`` (see the module docstring for how, and what it needs): the
    proxy on ``port`` (gRPC and REST), metrics/health HTTP on ``metrics_port`` (``/healthz``,
    ``/metrics``), the internal gRPC ports and the embedded etcd on ``ports``. ``kill`` (SIGKILL, for
    fault tests) and ``stop`` keep ``data_dir``, and ``start`` again serves the same data on the same
    ports (another free one for an internal port taken meanwhile).
    """

    def __init__(self, data_dir: str, port: int | None = None, ready_timeout: float = 90.0,
                 host: str = "127.0.0.1"):
        host = "127.0.0.1" if host == "localhost" else host
        if host not in _WILDCARD_HOSTS and ipaddress.ip_address(host).version != 4:
            raise ValueError(f"host must be an IPv4 address or 0.0.0.0, not {host!r}")
        self.data_dir = os.path.abspath(data_dir)
        self.host = host
        self.bind_host = "127.0.0.1" if host in _WILDCARD_HOSTS else host  # etcd, internal ips
        self.port = port or free_port(self.bind_host)
        self.ready_timeout = ready_timeout
        self.proc: subprocess.Popen | None = None
        self.ports: dict[str, int] = {}  # launcher flag (and etcd-peer, metrics) -> port
        self._pgid: int | None = None
        self._rewriter: _BindRewriter | None = None
        self.settings: dict[str, int] = {}  # --extra-config of this data directory (start reads it)

    @property
    def uri(self) -> str:
        return f"http://{self.bind_host}:{self.port}"

    @property
    def metrics_port(self) -> int | None:
        return self.ports.get("metrics")

    def _pick_ports(self) -> None:
        """Keep the ports of an earlier start where they are still free, else pick new ones."""
        taken = {self.port}
        for name in (*_PORT_FLAGS, "etcd-peer", "metrics"):
            port = self.ports.get(name)
            if port is None or port in taken or not _port_free(self.bind_host, port):
                port = free_port(self.bind_host)
                while port in taken:
                    port = free_port(self.bind_host)
            self.ports[name] = port
            taken.add(port)

    def _write_etcd_config(self) -> str:
        client = f"http://{self.bind_host}:{self.ports['--etcd-port']}"
        peer = f"http://{self.bind_host}:{self.ports['etcd-peer']}"
        path = os.path.join(self.data_dir, "etcd.yaml")
        with open(path, "w") as f:  # "default": the member name of data dirs made without this file
            f.write(f"name: default\nlisten-client-urls: {client}\nadvertise-client-urls: {client}\n"
                    f"listen-peer-urls: {peer}\ninitial-advertise-peer-urls: {peer}\n"
                    f"initial-cluster: default={peer}\n")
        return path

    def _command(self, notify_fd: int) -> list[str]:
        if find_spec("milvus") is None:
            raise MilvusIndexError("the milvus package is not installed: pip install milvus==2.3.5")
        pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        boot = (f"import sys; sys.path.insert(0, {pkg_parent!r}); "
                "from paddlerec_milvus.milvus_server import _child_main; _child_main()")
        probe_host = self.bind_host if notify_fd >= 0 else "0.0.0.0"  # where the launcher checks ports
        cmd = [sys.executable, "-c", boot, str(notify_fd), probe_host, str(self.ports["metrics"]),
               "--data", self.data_dir, "--proxy-port", str(self.port)]
        for flag in _PORT_FLAGS:
            cmd += [flag, str(self.ports[flag])]
        cmd += ["--extra-config", f"etcd.endpoints={self.bind_host}:{self.ports['--etcd-port']}"]
        for key in _IP_KEYS:
            cmd += ["--extra-config", f"{key}={self.bind_host}"]
        for key, value in self.settings.items():
            cmd += ["--extra-config", f"{key}={value}"]
        return cmd

    def _load_settings(self) -> dict[str, int]:
        """The server settings of this data directory: FAST_HANDOFF for one created here, Milvus's
        defaults for one created without them; recorded on first start, never changed after."""
        path = os.path.join(self.data_dir, SETTINGS_FILE)
        if os.path.exists(path):
            try:
                with open(path, encoding="utf-8") as f:
                    settings = json.load(f)
                if not isinstance(settings, dict):
                    raise ValueError("not a JSON object")
                return {str(k): int(v) for k, v in settings.items()}
            except (ValueError, TypeError) as e:
                raise MilvusIndexError(f"{path}: unreadable server settings ({e}); restore it, or "
                                       "write {} to start with Milvus's defaults") from None
        fresh = not os.path.exists(os.path.join(self.data_dir, "data"))
        settings = dict(FAST_HANDOFF) if fresh else {}
        write_atomically(path, lambda f: json.dump(settings, f, indent=2))
        return settings

    def start(self) -> MilvusServer:
        if self.proc is not None and self.proc.poll() is None:
            raise MilvusIndexError(f"Milvus server at {self.uri} is already running")
        self._reap()  # whatever an earlier kill (ours or anyone's) left behind
        os.makedirs(self.data_dir, exist_ok=True)
        self.settings = self._load_settings()
        self._pick_ports()
        env = dict(os.environ, ETCD_CONFIG_PATH=self._write_etcd_config())
        confine = self.host not in _WILDCARD_HOSTS
        ours, theirs = socket.socketpair() if confine else (None, None)
        log = open(os.path.join(self.data_dir, "server.log"), "ab")
        try:
            self.proc = subprocess.Popen(self._command(theirs.fileno() if theirs else -1), stdout=log,
                                         stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                         pass_fds=[theirs.fileno()] if theirs else ())
        finally:
            log.close()
            if theirs:
                theirs.close()
        self._pgid = self.proc.pid
        try:
            if ours:
                self._rewriter = self._receive_filter(ours)
            self._wait_ready()
        except BaseException:
            self.kill()
            raise
        logger.info("Milvus server ready at %s (data %s)", self.uri, self.data_dir)
        return self

    def _receive_filter(self, chan: socket.socket) -> _BindRewriter:
        with chan:
            chan.settimeout(30)
            try:
                msg, fds, _, _ = socket.recv_fds(chan, 512, 1, socket.MSG_CMSG_CLOEXEC)
            except OSError as exc:
                msg, fds = f"E{exc}".encode(), []
        if msg != b"L" or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            why = msg[1:].decode(errors="replace") if msg.startswith(b"E") else "it exited"
            raise MilvusIndexError(
                f"cannot keep Milvus's listeners on {self.host}: no seccomp bind filter ({why}); "
                "Milvus 2.3.5 binds its ports on all interfaces by itself, pass host='0.0.0.0' to allow that")
        return _BindRewriter(fds[0], self.bind_host)

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise MilvusIndexError(
                    f"milvus-server exited with {self.proc.returncode}; see {self.data_dir}/server.log "
                    f"and {self.data_dir}/logs/")
            if self._ready():
                return
            time.sleep(0.5)
        raise MilvusIndexError(f"milvus-server not ready after {self.ready_timeout:.0f} s; "
                               f"see {self.data_dir}/server.log and {self.data_dir}/logs/")

    def _ready(self) -> bool:
        try:
            with socket.create_connection((self.bind_host, self.port), timeout=0.5):
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

    # -- stopping -------------------------------------------------------------------------------
    def _signal_group(self, sig: int, only: list[int] | None = None) -> None:
        if only is not None:
            for pid in only:
                try:
                    os.kill(pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
            return
        try:
            os.killpg(self._pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def _wait_group(self, timeout: float, pids: list[int] | None = None) -> bool:
        """Wait until the process group (or just ``pids`` of it) is gone; reaps our child."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc is not None:
                self.proc.poll()
            alive = _group_members(self._pgid)
            if pids is not None:
                alive = [p for p in alive if p in pids]
            if not alive:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)

    def _reap(self) -> None:
        """Make sure nothing of the last server is left: processes (SIGKILL), filter, ``proc``."""
        if self._pgid is not None:
            if _group_members(self._pgid):
                self._signal_group(signal.SIGKILL)
                if not self._wait_group(15):
                    logger.warning("processes of Milvus group %d outlive SIGKILL: %s", self._pgid,
                                   _group_members(self._pgid))
            self._pgid = None
        if self.proc is not None:
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            self.proc = None
        if self._rewriter is not None:
            self._rewriter.close()
            self._rewriter = None

    def kill(self) -> None:
        """SIGKILL the whole server at once (a crash, for fault tests); ``data_dir`` stays."""
        if self._pgid is not None:
            self._signal_group(signal.SIGKILL)
        self._reap()

    def stop(self, timeout: float = 30.0) -> None:
        """Graceful stop: SIGTERM to Milvus, then the launcher; SIGKILL whatever is left after
        ``timeout`` s. Never raises for a server already dead or killed by someone else."""
        if self._pgid is None:
            self._reap()
            return
        launcher = self.proc.pid if self.proc is not None else self._pgid
        milvus = [p for p in _group_members(self._pgid) if p != launcher]
        if milvus:  # the launcher would give Milvus 1 s before its SIGKILL; ask Milvus directly
            self._signal_group(signal.SIGTERM, only=milvus)
            if not self._wait_group(timeout, pids=milvus):
                logger.warning("Milvus did not stop within %.0f s of SIGTERM; killing it", timeout)
        self._signal_group(signal.SIGINT, only=[launcher])  # its handler exits once Milvus is gone
        self._wait_group(min(10.0, timeout), pids=[launcher])
        self._reap()  # SIGKILL for anything still there

    def __enter__(self) -> MilvusServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
