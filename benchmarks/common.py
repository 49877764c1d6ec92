"""What every benchmark section shares: the machine, versions, timing and process helpers."""

from __future__ import annotations

import datetime as dt
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = os.path.join(REPO, "models")
BENCH_DIR = os.environ.get("PADDLEREC_MILVUS_BENCH_DIR", os.path.join(REPO, "output", "bench"))
SHARED_DATASETS = os.environ.get(
    "PADDLEREC_MILVUS_DATASETS", os.path.join(os.path.dirname(REPO), "shared", "datasets"))


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    cpu = platform.processor() or platform.machine() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return cpu


def memory_gb() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def machine() -> dict[str, str]:
    """Cores, memory, CPU model, versions and date: printed beside every figure."""
    cpu = cpu_model()
    mem_gb = memory_gb()
    versions = {}
    for name in ("paddle", "pymilvus", "milvus_lite", "numpy"):
        try:
            mod = __import__(name)
            versions[name] = getattr(mod, "__version__", "?")
        except Exception:  # a missing optional package is reported, not fatal
            versions[name] = "not installed"
    return {
        "cores": str(os.cpu_count()),
        "memory_gb": f"{mem_gb:.0f}",
        "cpu": cpu,
        "python": platform.python_version(),
        "date": dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        **{f"{k}_version": v for k, v in versions.items()},
    }


def percentiles(samples_ms: Sequence[float]) -> tuple[float, float]:
    arr = np.asarray(samples_ms, dtype=np.float64)
    return float(np.percentile(arr, 50)), float(np.percentile(arr, 99))


_WRAPPER = ("import resource, subprocess, sys\n"
            "code = subprocess.call(sys.argv[2:])\n"
            "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))\n"
            "sys.exit(code)\n")


def run_measured(cmd: list[str], cwd: str | None = None, timeout: float = 3600) -> tuple[str, float, float]:
    """Run a command; returns (stdout, wall seconds, peak RSS in MB of its largest process).

    A fresh wrapper process runs it, so the peak RSS is this command's alone."""
    import tempfile

    with tempfile.NamedTemporaryFile("r", suffix=".rss") as rss:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", _WRAPPER, rss.name, *cmd], cwd=cwd,
                              capture_output=True, text=True, timeout=timeout,
                              env=dict(os.environ, PYTHONUNBUFFERED="1"))
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd[:4])}... failed ({proc.returncode}): {proc.stderr[-1500:]}")
        peak_kb = float(rss.read() or 0)
    return proc.stdout, wall, peak_kb / 1024.0


def process_children() -> dict[int, list[int]]:
    """Parent pid -> child pids of every process visible in /proc."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d))
    return children


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, grandchildren, ...)."""
    tree, out, todo = process_children(), [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def python() -> str:
    return sys.executable
