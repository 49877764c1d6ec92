"""infer.py end to end: Milvus-backed metrics equal exact numpy search on the same checkpoint."""

import json
import os
import statistics
import subprocess
import sys

import pytest
from conftest import MODELS

from paddlerec_milvus.config import load_config
from paddlerec_milvus.evaluate import evaluate_epochs
from paddlerec_milvus.scoring import score_popularity

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
    assert milvus.metrics["Recall@50"] > score_popularity(cfg, 50)["Recall@50"]


def test_infer_without_checkpoint_is_a_clear_error(tmp_path):
    cmd = [sys.executable, "-u", os.path.join(MODELS, "infer.py"), "-m", "mind/config.yaml",
           "-o", f"runner.infer_load_path={tmp_path}/none", f"milvus.uri={tmp_path}/x.db"]
    proc = subprocess.run(cmd, cwd=MODELS, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "no checkpoint at" in proc.stderr and "Traceback" not in proc.stderr


def _count(uri: str, collection: str) -> int:
    from paddlerec_milvus.milvus_index import ItemIndex

    with ItemIndex(uri, collection, 64, create=False) as index:
        return index.count()


def test_evaluation_refuses_an_exports_serving_collection(exported_demo, tmp_path):
    """Evaluation drops and refills its collection with dense ids: pointed at what an export
    serves (raw ids), it must refuse and leave every item in place."""
    import shutil

    from paddlerec_milvus.errors import ConfigError

    uri = str(tmp_path / "serving.db")
    shutil.copy(exported_demo["milvus_uri"], uri)
    before = _count(uri, exported_demo["collection"])
    cfg = load_config(exported_demo["config_path"],
                      exported_demo["overrides"] + [f"milvus.uri={uri}",
                                                    f"milvus.collection={exported_demo['collection']}"])
    with pytest.raises(ConfigError, match="holds an export's serving items"):
        evaluate_epochs(cfg, top_n=50)
    assert _count(uri, exported_demo["collection"]) == before > 0


@pytest.mark.server
def test_evaluation_refuses_an_alias(exported_demo_server):
    from paddlerec_milvus.errors import ConfigError

    uri, alias = exported_demo_server["milvus_uri"], exported_demo_server["collection"]
    before = _count(uri, alias)
    cfg = load_config(exported_demo_server["config_path"],
                      exported_demo_server["overrides"] + [f"milvus.uri={uri}", f"milvus.collection={alias}"])
    with pytest.raises(ConfigError, match=f"'{alias}' is an alias of '{alias}_v"):
        evaluate_epochs(cfg, top_n=50)
    assert _count(uri, alias) == before > 0


def _ann_run(trained_demo, milvus: list[str], builds: int = 2) -> tuple[subprocess.CompletedProcess, list]:
    cmd = [sys.executable, "-u", os.path.join(MODELS, "infer.py"), "-m", trained_demo["config_path"],
           "-top_n", "50", "--ann-builds", str(builds), "-o", *trained_demo["overrides"], *milvus]
    return subprocess.run(cmd, cwd=MODELS, capture_output=True, text=True, timeout=600), cmd


@pytest.mark.server
def test_ann_evaluation_scores_the_index_against_exact_on_the_same_interests(trained_demo,
                                                                             milvus_server):
    ivf = ["milvus.index_type=IVF_FLAT", "milvus.index_params.nlist=64",
           "milvus.search_params.nprobe=2", f"milvus.uri={milvus_server.uri}", "milvus.collection=ann"]
    proc, cmd = _ann_run(trained_demo, ivf)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "IVF_FLAT build 2" in proc.stdout and "mean Recall@50 loss" in proc.stdout
    cfg = load_config(trained_demo["config_path"], trained_demo["overrides"] + ivf)
    saved = json.load(open(os.path.join(cfg["runner.infer_load_path"], "1", "ann_top50_ivf_flat.json")))
    exact = evaluate_epochs(cfg, top_n=50, exact=True)[0]
    assert saved["users"] == exact.users == 250 and saved["epoch"] == 1
    assert saved["exact"]["metrics"] == pytest.approx(exact.metrics, abs=1e-9)
    # FLAT on the same Milvus is exact: same metrics, every interest's exact top-50
    assert saved["flat"]["metrics"] == pytest.approx(exact.metrics, abs=1e-9)
    assert saved["flat"]["interest_overlap"] == pytest.approx(1.0)
    # 2 of 64 lists is approximate: interests lose neighbours, and the loss is what it says
    builds = saved["builds"]
    assert len(builds) == 2 and all(b["interest_overlap"] < 0.95 for b in builds)
    losses = [1 - b["metrics"]["Recall@50"] / exact.metrics["Recall@50"] for b in builds]
    assert saved["summary"]["ann_recall50_rel_loss"] == pytest.approx(sum(losses) / 2)
    assert all(b["build_s"] > 0 for b in builds)
    # each build timed in 3 turns beside FLAT's; the ratio is the mean of the builds' median ratios
    assert all(len(b["pass_ms_per_user"]) == len(b["flat_pass_ms_per_user"]) == 3 for b in builds)
    ratios = [statistics.median(b["flat_pass_ms_per_user"]) / statistics.median(b["pass_ms_per_user"])
              for b in builds]
    assert saved["summary"]["ann_speedup_vs_flat"] == pytest.approx(sum(ratios) / 2)
    assert saved["summary"]["ann_speedup_vs_flat_min"] == pytest.approx(min(ratios))
    assert all(b["search_ms_per_user"] == statistics.median(b["pass_ms_per_user"]) for b in builds)
    bad = subprocess.run(cmd + ["--exact"], cwd=MODELS, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "drop --exact" in bad.stderr and "Traceback" not in bad.stderr


def test_ann_evaluation_of_an_exact_profile_loses_nothing(trained_demo, tmp_path):
    proc, _ = _ann_run(trained_demo, [f"milvus.uri={tmp_path}/ann.db", "milvus.collection=ann"], 1)
    assert proc.returncode == 0, proc.stderr[-2000:]
    cfg = load_config(trained_demo["config_path"], trained_demo["overrides"])
    saved = json.load(open(os.path.join(cfg["runner.infer_load_path"], "1", "ann_top50_flat.json")))
    assert saved["flat"] is None  # the profile's index is FLAT already: no second FLAT pass
    (build,) = saved["builds"]
    assert build["metrics"] == pytest.approx(saved["exact"]["metrics"], abs=1e-9)
    assert build["interest_overlap"] == pytest.approx(1.0)
    assert saved["summary"]["ann_recall50_rel_loss"] == pytest.approx(0.0, abs=1e-12)
