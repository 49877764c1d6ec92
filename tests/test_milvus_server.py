"""MilvusServer: every socket of the server's processes is on loopback (proxy, metrics, internal
gRPC ports, embedded etcd), and kill -9 / stop then start serve the same data on the same port."""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import socket
import subprocess
import sys
import urllib.request

import pytest

from benchmarks.common import descendants
from paddlerec_milvus.errors import MilvusIndexError
from paddlerec_milvus.milvus_server import FAST_HANDOFF, SETTINGS_FILE, MilvusServer, _group_members

# Listeners that cannot be kept off other interfaces, as (process name, port) pairs: none since
# wildcard binds are rebound to the loopback by MilvusServer's bind filter (see its docstring).
ALLOWED_ON_ALL_INTERFACES: frozenset[tuple[str, int]] = frozenset()
_TCP_LISTEN, _TCP_ESTABLISHED = "0A", "01"


def _tree(srv: MilvusServer) -> list[int]:
    return [srv.proc.pid, *descendants(srv.proc.pid)]


def _inodes(pids: list[int]) -> dict[int, int]:
    """Socket inode -> pid, for every socket the processes hold."""
    out = {}
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                out[int(link[8:-1])] = pid
    return out


def _addr(hexaddr: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    host, port = hexaddr.split(":")
    raw = bytes.fromhex(host)  # 32-bit words in host byte order
    if sys.byteorder == "little":
        raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    ip = ipaddress.ip_address(raw)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return ip, int(port, 16)


def _inet_sockets(pids: list[int]) -> list[dict]:
    """The processes' TCP and UDP sockets (IPv4 and IPv6) from /proc/net."""
    owned = _inodes(pids)
    out = []
    for proto in ("tcp", "tcp6", "udp", "udp6"):
        with open(f"/proc/net/{proto}") as f:
            next(f)
            for line in f:
                cols = line.split()
                inode = int(cols[9])
                if inode in owned:
                    (lip, lport), (rip, rport) = _addr(cols[1]), _addr(cols[2])
                    out.append({"proto": proto, "state": cols[3], "local": lip, "port": lport,
                                "remote": rip, "rport": rport, "pid": owned[inode]})
    return out


def _name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


def assert_all_on_loopback(srv: MilvusServer) -> list[dict]:
    socks = _inet_sockets(_tree(srv))
    listening = [s for s in socks if s["proto"].startswith("udp") or s["state"] == _TCP_LISTEN]
    ports = {s["port"] for s in listening}
    expected = {srv.port, srv.metrics_port, srv.ports["--etcd-port"], srv.ports["etcd-peer"]}
    assert expected <= ports, (expected - ports, listening)  # the check sees the server's sockets
    wrong = [s for s in listening if not s["local"].is_loopback
             and (_name(s["pid"]), s["port"]) not in ALLOWED_ON_ALL_INTERFACES]
    assert not wrong, f"listening beyond loopback: {wrong}"
    talking = [s for s in socks if s["state"] == _TCP_ESTABLISHED and not s["remote"].is_loopback]
    assert not talking, f"connected beyond loopback: {talking}"
    if shutil.which("ss"):  # the same, as ss sees it
        pids = _tree(srv)
        lines = [ln for ln in subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True,
                                             check=True).stdout.splitlines()
                 if any(f"pid={p}," in ln for p in pids)]
        assert len(lines) >= len(expected), lines
        for ln in lines:
            local = ln.split()[3].rsplit(":", 1)[0].strip("[]")
            assert local in ("127.0.0.1", "::ffff:127.0.0.1", "::1"), ln
    return listening


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return True
    return False


def test_host_must_be_ipv4_or_wildcard(tmp_path):
    with pytest.raises(ValueError):
        MilvusServer(str(tmp_path), host="::1")
    assert MilvusServer(str(tmp_path), host="localhost").uri.startswith("http://127.0.0.1:")
    assert MilvusServer(str(tmp_path), port=1234).uri == "http://127.0.0.1:1234"


def _config_value(srv: MilvusServer, key: str) -> str:
    with open(os.path.join(srv.data_dir, "configs", "milvus.yaml")) as f:
        return next(line.split(":", 1)[1].split("#")[0].strip() for line in f
                    if line.strip().startswith(key + ":"))


def test_server_settings_fixed_per_data_directory(tmp_path):
    """A data directory is started with the settings it was created with: Milvus's defaults for
    one made without the launcher's settings file (a lower assignmentExpiration than the one a
    directory last ran with can lose data), FAST_HANDOFF for a new one; a recorded choice stays."""
    old = tmp_path / "made_elsewhere"
    (old / "data").mkdir(parents=True)
    assert MilvusServer(str(old))._load_settings() == {}
    assert json.loads((old / SETTINGS_FILE).read_text()) == {}
    new = tmp_path / "new"
    new.mkdir()
    assert MilvusServer(str(new))._load_settings() == FAST_HANDOFF
    (new / "data").mkdir()  # the server has run: the recorded settings stand
    assert MilvusServer(str(new))._load_settings() == FAST_HANDOFF
    assert MilvusServer(str(old))._load_settings() == {}
    assert FAST_HANDOFF["dataCoord.segment.assignmentExpiration"] < 2000
    (old / SETTINGS_FILE).write_text("{half written")
    with pytest.raises(MilvusIndexError, match=f"{SETTINGS_FILE}: unreadable server settings"):
        MilvusServer(str(old))._load_settings()


@pytest.mark.slow
@pytest.mark.server
def test_listeners_on_loopback_and_kill_then_start_keeps_data_and_port(tmp_path):
    from pymilvus import MilvusClient

    srv = MilvusServer(str(tmp_path / "milvus"))
    try:
        srv.start()
        assert srv.settings == FAST_HANDOFF  # a directory created here: quick seal and load
        assert _config_value(srv, "assignmentExpiration") == "500"
        assert _config_value(srv, "checkInterval") == "100"
        before = assert_all_on_loopback(srv)
        with urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/healthz", timeout=10) as r:
            assert b"OK" in r.read()
        client = MilvusClient(uri=srv.uri, timeout=30)
        client.create_collection("kept_over_kill", dimension=4)
        client.insert("kept_over_kill", [{"id": i, "vector": [0.1 * i] * 4} for i in range(1, 4)])
        client.close()

        port, pgid, ports = srv.port, srv._pgid, dict(srv.ports)
        srv.kill()
        assert srv.proc is None and not _group_members(pgid), "processes survive kill()"
        assert _refused(port) and _refused(ports["metrics"]), "a port still answers after kill()"

        srv.start()
        assert srv.port == port and srv.ports == ports  # same data dir, same ports
        assert srv.settings == FAST_HANDOFF
        after = assert_all_on_loopback(srv)
        assert {s["port"] for s in after} == {s["port"] for s in before}
        client = MilvusClient(uri=srv.uri, timeout=30)
        assert "kept_over_kill" in client.list_collections()
        client.close()

        pgid = srv._pgid
        srv.stop()
        assert srv.proc is None and not _group_members(pgid), "processes survive stop()"
        assert _refused(port)
        srv.stop()  # stopping a stopped server, or killing it, is a no-op
        srv.kill()
    finally:
        srv.kill()
