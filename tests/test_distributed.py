"""Data-parallel training with PaddlePaddle's own launcher: 2 CPU processes on the demo data."""

import os
import subprocess
import sys

import pytest
from conftest import MODELS

from paddlerec_milvus.config import load_config
from paddlerec_milvus.evaluate import evaluate_epochs
from paddlerec_milvus.runner import train

pytestmark = pytest.mark.slow


def test_two_process_training_matches_single_process(demo_model_dir, tmp_path):
    cfg_path = os.path.join(demo_model_dir, "config.yaml")
    common = ["runner.epochs=2", "runner.batches_per_epoch=100", "runner.infer_start_epoch=1",
              "runner.infer_end_epoch=2"]
    dist_out = tmp_path / "dist"
    cmd = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2",
           "--log_dir", str(tmp_path / "logs"), os.path.join(MODELS, "trainer.py"), "-m", cfg_path,
           "-o", "runner.use_fleet=True", f"runner.model_save_path={dist_out}", *common]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
    logs = "".join(p.read_text() for p in (tmp_path / "logs").glob("workerlog.*"))
    assert proc.returncode == 0, proc.stdout[-2000:] + logs[-3000:]
    assert "rank 0 of 2" in logs and "rank 1 of 2" in logs
    # each rank read its own shard of the users
    shards = [line for line in logs.splitlines() if "train reader:" in line]
    assert len(shards) == 2
    # checkpoints written once, by rank 0, in the usual layout; rank 0 alone validates
    assert sorted(os.listdir(dist_out)) == ["0", "1", "best.json"]
    assert sum("validation: epoch" in line for line in logs.splitlines()) == 2
    assert os.path.isfile(dist_out / "1" / "rec.pdparams")

    single_out = tmp_path / "single"
    train(load_config(cfg_path, [f"runner.model_save_path={single_out}", *common]))
    dist_res = evaluate_epochs(load_config(cfg_path, [f"runner.infer_load_path={dist_out}", *common]),
                               top_n=50, exact=True)[0]
    single_res = evaluate_epochs(load_config(cfg_path, [f"runner.infer_load_path={single_out}", *common]),
                                 top_n=50, exact=True)[0]
    # same global batch and number of steps: the same quality within noise (250 test users)
    assert abs(dist_res.metrics["Recall@50"] - single_res.metrics["Recall@50"]) < 0.04
    assert dist_res.metrics["Recall@50"] > 0.12
