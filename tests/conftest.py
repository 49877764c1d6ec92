"""Shared fixtures: real data from ../shared, a real Milvus server, a small trained model."""

from __future__ import annotations

import gzip
import os
import shutil
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = os.path.join(REPO, "models")
SHARED = os.environ.get("PADDLEREC_MILVUS_SHARED", os.path.join(os.path.dirname(REPO), "shared"))
DATASETS = os.path.join(SHARED, "datasets")
sys.path.insert(0, os.path.join(REPO, "tests"))


def head_users(src: str, dst: str, n_users: int) -> str:
    """Copy the clicks of the first ``n_users`` users of a shared data set (it is grouped by user)."""
    if not os.path.isfile(src):
        pytest.skip(f"shared data set not found: {src}")
    seen: set[str] = set()
    with gzip.open(src, "rt") as f, open(dst, "w") as out:
        out.write(next(f))
        for line in f:
            user = line.split(",", 1)[0]
            if user not in seen:
                if len(seen) == n_users:
                    break
                seen.add(user)
            out.write(line)
    return dst


@pytest.fixture(scope="session")
def ml_sample(tmp_path_factory) -> str:
    """A real sample: the first 300 MovieLens-1M users (long histories)."""
    return head_users(os.path.join(DATASETS, "movielens-1m.csv.gz"),
                      str(tmp_path_factory.mktemp("ml") / "ml300.csv"), 300)


@pytest.fixture(scope="session")
def milvus_server(tmp_path_factory):
    """A real Milvus 2.3 standalone server on free loopback ports, for the whole session."""
    from paddlerec_milvus.milvus_server import MilvusServer

    srv = MilvusServer(str(tmp_path_factory.mktemp("milvus-server")))
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(params=["lite", pytest.param("server", marks=pytest.mark.server)])
def milvus_uri(request, tmp_path) -> str:
    """Each index test runs on embedded Milvus Lite and on the real server."""
    if request.param == "lite":
        return str(tmp_path / "lite.db")
    return request.getfixturevalue("milvus_server").uri


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory) -> str:
    """A copy of models/mind with its demo data, for runs that write checkpoints."""
    dst = tmp_path_factory.mktemp("models") / "mind"
    shutil.copytree(os.path.join(MODELS, "mind"), dst,
                    ignore=shutil.ignore_patterns("output*", "__pycache__", "data_bigdata"))
    return str(dst)


@pytest.fixture(scope="session")
def trained_demo(demo_model_dir) -> dict:
    """A small MIND trained on the demo data (2 epochs x 60 batches); its flat config."""
    from paddlerec_milvus.config import load_config
    from paddlerec_milvus.runner import train

    cfg_path = os.path.join(demo_model_dir, "config.yaml")
    overrides = ["runner.epochs=2", "runner.batches_per_epoch=60",
                 "runner.infer_start_epoch=1", "runner.infer_end_epoch=2"]
    train(load_config(cfg_path, overrides))
    return {"config_path": cfg_path, "overrides": overrides}


def _run_cli(*args: str, cwd: str | None = None) -> str:
    import subprocess

    proc = subprocess.run([sys.executable, "-m", "paddlerec_milvus.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="session")
def exported_demo(trained_demo, tmp_path_factory) -> dict:
    """The trained demo model exported (in a subprocess, so no Lite file stays open here) into
    a fresh Milvus Lite file. Keys: export_dir, milvus_uri, collection, config_path."""
    base = tmp_path_factory.mktemp("export")
    uri = str(base / "serving.db")
    export_dir = str(base / "model")
    _run_cli("export", "-m", trained_demo["config_path"], "-o", *trained_demo["overrides"],
             f"milvus.uri={uri}", "--collection", "demo_serving", "--output", export_dir)
    return {"export_dir": export_dir, "milvus_uri": uri, "collection": "demo_serving",
            "config_path": trained_demo["config_path"], "overrides": trained_demo["overrides"]}


@pytest.fixture(scope="session")
def exported_demo_server(trained_demo, milvus_server, tmp_path_factory) -> dict:
    """The same export into the real Milvus server (versioned collection behind an alias)."""
    export_dir = str(tmp_path_factory.mktemp("export-server") / "model")
    _run_cli("export", "-m", trained_demo["config_path"], "-o", *trained_demo["overrides"],
             f"milvus.uri={milvus_server.uri}", "--collection", "demo_serving",
             "--output", export_dir)
    return {"export_dir": export_dir, "milvus_uri": milvus_server.uri, "collection": "demo_serving",
            "config_path": trained_demo["config_path"], "overrides": trained_demo["overrides"]}
