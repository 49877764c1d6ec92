"""Paddle's CPU thread count is set before Paddle is imported (it forces 1 otherwise)."""

import os
import subprocess
import sys

import pytest

from paddlerec_milvus.cpu_threads import available_cores

PROBE = ("import os; from paddlerec_milvus.cpu_threads import configure_cpu_threads as c; "
         "n = c({'runner.cpu_threads': %d}); import paddle; print(n, os.environ['OMP_NUM_THREADS'])")


def _probe(setting: int, **env: str) -> tuple[str, str]:
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "PADDLE_LOCAL_SIZE")}
    proc = subprocess.run([sys.executable, "-c", PROBE % setting], capture_output=True, text=True,
                          env={**base, **env}, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip(), proc.stderr


@pytest.mark.parametrize("setting, env, expected", [
    (0, {}, available_cores()),
    (0, {"PADDLE_LOCAL_SIZE": "2"}, max(1, available_cores() // 2)),
    (3, {}, 3),
    (0, {"OMP_NUM_THREADS": "1"}, 1),  # what the user exported wins
])
def test_thread_count(setting, env, expected):
    out, err = _probe(setting, **env)
    assert out == f"{expected} {expected}"
    assert "OMP_NUM_THREADS" not in err  # Paddle's generic warning is not shown
