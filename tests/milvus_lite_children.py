"""Fault tests' helper: the Milvus Lite processes a server process started, killed hard."""

from __future__ import annotations

import os
import signal

from benchmarks.common import descendants


def kill_milvus_lite_children(pid: int) -> list[int]:
    """SIGKILL every Milvus Lite process below ``pid`` (found by its binary); returns their pids."""
    lite = []
    for child in descendants(pid):
        try:
            with open(f"/proc/{child}/cmdline", "rb") as f:
                if b"milvus_lite" in f.read():
                    lite.append(child)
        except OSError:  # exited meanwhile
            continue
    for child in lite:
        os.kill(child, signal.SIGKILL)
    return lite
