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


CLI = os.path.join(os.path.dirname(sys.executable), "paddlerec-milvus")
MODELS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models")


@pytest.mark.parametrize("command", [
    ["train"], ["infer"], ["export", "--output", "{tmp}/export"],
    [sys.executable, os.path.join(MODELS, "trainer.py")],
    [sys.executable, os.path.join(MODELS, "infer.py")],
])
def test_every_command_applies_cpu_threads_before_importing_paddle(command, tmp_path):
    """Each command stops early here (no data, no checkpoint), but only after Paddle was imported
    with the configured thread count; a command importing Paddle first would log "not applied"."""
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "PADDLE_LOCAL_SIZE")}
    args = [a.format(tmp=tmp_path) for a in command]
    argv = ([CLI, "-v", *args] if not args[0].startswith("/") else args)
    argv += ["-m", os.path.join(MODELS, "mind", "config.yaml"), "-o", "runner.cpu_threads=3",
             f"runner.train_data_dir={tmp_path}/none", f"runner.model_save_path={tmp_path}/ckpt",
             f"runner.infer_load_path={tmp_path}/ckpt", f"milvus.uri={tmp_path}/m.db"]
    proc = subprocess.run(argv, capture_output=True, text=True, env=base, timeout=180, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]  # a user's error, not a crash
    assert "Paddle CPU threads: 3" in proc.stderr, proc.stderr[-2000:]
    assert "not applied" not in proc.stderr
