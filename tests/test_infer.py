"""infer.py end to end: Milvus-backed metrics equal exact numpy search on the same checkpoint."""

import json
import os
import subprocess
import sys

import pytest
from conftest import MODELS

from paddlerec_milvus.config import load_config
from paddlerec_milvus.evaluate import evaluate_epochs, evaluate_popularity

pytestmark = pytest.mark.slow


def test_infer_script_prints_and_saves_metrics(trained_demo, tmp_path):
    cmd = [sys.executable, "-u", os.path.join(MODELS, "infer.py"), "-m", trained_demo["config_path"],
           "-top_n", "50", "--paddlerec-metrics", "-o", *trained_demo["overrides"],
           f"milvus.uri={tmp_path}/infer.db"]
    proc = subprocess.run(cmd, cwd=MODELS, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = [s for s in proc.stdout.splitlines() if s.startswith("epoch 1:")][0]
    for key in ("Recall@50", "NDCG@50", "HitRate@50", "Recall@20", "PaddleRecNDCG@50", "users 250"):
        assert key in line
    cfg = load_config(trained_demo["config_path"], trained_demo["overrides"])
    saved = json.load(open(os.path.join(cfg["runner.infer_load_path"], "1", "metrics_top50.json")))
    assert saved["users"] == 250 and set(saved["metrics"]) >= {"Recall@50", "NDCG@50", "HitRate@50"}
    assert saved["metrics"]["PaddleRecNDCG@50"] >= saved["metrics"]["NDCG@50"]


@pytest.mark.parametrize("engine", ["lite", pytest.param("server", marks=pytest.mark.server)])
def test_milvus_metrics_equal_exact_numpy(trained_demo, tmp_path, engine, request):
    uri = str(tmp_path / "eq.db") if engine == "lite" else request.getfixturevalue("milvus_server").uri
    cfg = load_config(trained_demo["config_path"],
                      trained_demo["overrides"] + [f"milvus.uri={uri}", "milvus.collection=eq_check"])
    milvus = evaluate_epochs(cfg, top_n=50)[0]
    exact = evaluate_epochs(cfg, top_n=50, exact=True)[0]
    assert milvus.users == exact.users == 250  # every test user, no dropped batch
    assert milvus.metrics == pytest.approx(exact.metrics, abs=1e-9)
    # a trained model beats the most-popular baseline on real data
    assert milvus.metrics["Recall@50"] > evaluate_popularity(cfg, 50)["Recall@50"]


def test_infer_without_checkpoint_is_a_clear_error(tmp_path):
    cmd = [sys.executable, "-u", os.path.join(MODELS, "infer.py"), "-m", "mind/config.yaml",
           "-o", f"runner.infer_load_path={tmp_path}/none", f"milvus.uri={tmp_path}/x.db"]
    proc = subprocess.run(cmd, cwd=MODELS, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "no checkpoint at" in proc.stderr and "Traceback" not in proc.stderr
