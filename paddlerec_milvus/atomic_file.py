"""Files that readers must never see half-written (best.json, a tuned config, a server's settings):
written beside their final name and renamed over it in one step."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from typing import TextIO


def write_atomically(path: str, write: Callable[[TextIO], None]) -> str:
    """Call ``write`` on a temporary file in ``path``'s folder, then rename it to ``path``; a
    failure leaves the old file (if any) as it was and no temporary file behind."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            write(f)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
