"""Validation every epoch: the best epoch is recorded and used; early stopping."""

import json
import os

import pytest
from conftest import MODELS, _run_cli
from synthetic import planted_clusters

from paddlerec_milvus.checkpoint import best_epoch
from paddlerec_milvus.config import load_config
from paddlerec_milvus.data_prep import prepare_data
from paddlerec_milvus.errors import ConfigError
from paddlerec_milvus.runner import train
from paddlerec_milvus.scoring import score_popularity
from paddlerec_milvus.validation import BestEpoch, Validator

CONFIG = os.path.join(MODELS, "mind", "config.yaml")


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    base = tmp_path_factory.mktemp("planted_valid")
    data = base / "data"
    stats = prepare_data(planted_clusters(str(base / "clicks.csv"), n_users=400), str(data), seed=5)
    return data, stats


def _overrides(tmp_path, data, stats, *extra):
    return [f"runner.train_data_dir={data}/train", f"runner.test_data_dir={data}/test",
            f"runner.valid_data_dir={data}/valid", f"runner.model_save_path={tmp_path}/ckpt",
            f"runner.infer_load_path={tmp_path}/ckpt", f"hyper_parameters.item_count={stats.item_count}",
            "hyper_parameters.neg_samples=64", "runner.train_batch_size=64", f"milvus.uri={tmp_path}/m.db",
            *extra]


def _validator(patience):
    v = Validator.__new__(Validator)  # the bookkeeping alone, without a reader
    v.metric, v.patience, v.best, v.stale = "Recall@50", patience, BestEpoch("Recall@50"), 0
    v.popular = 0.2
    return v


def test_patience_counts_epochs_without_improvement():
    v = _validator(patience=2)
    assert [v.update(e, s) for e, s in enumerate([0.1, 0.3, 0.2, 0.3, 0.25])] == \
        [False, False, False, True, True]
    assert (v.best.epoch, v.best.value) == (1, 0.3)  # a tie is no improvement
    never = _validator(patience=0)
    assert not any(never.update(e, 0.1) for e in range(10))
    assert never.best.epoch == 0


def test_an_epoch_no_better_than_most_popular_is_reported(caplog):
    v = _validator(patience=0)
    with caplog.at_level("WARNING", logger="paddlerec_milvus.validation"):
        v.update(0, 0.35)
        assert not caplog.records
        v.update(1, 0.15)
    assert "epoch 1 is no better than most-popular on validation (Recall@50 0.15000 <= 0.20000)" \
        in caplog.text


def test_training_records_the_best_epoch_and_infer_and_export_use_it(planted, tmp_path):
    data, stats = planted
    over = _overrides(tmp_path, data, stats, "runner.epochs=3", "runner.batches_per_epoch=40")
    summary = train(load_config(CONFIG, over))
    with open(tmp_path / "ckpt" / "best.json") as f:
        best = json.load(f)
    scores = {int(k): v for k, v in best["history"].items()}
    assert sorted(scores) == [0, 1, 2] and [e.valid for e in summary.epochs] == list(scores.values())
    assert best["epoch"] == max(scores, key=scores.get) == summary.best_epoch
    assert best_epoch(str(tmp_path / "ckpt")) == best["epoch"]
    cfg = load_config(CONFIG, over)
    valid_users = Validator(cfg).reader
    assert best["popular"] == score_popularity(cfg, 50, reader=valid_users)["Recall@50"]
    assert best["popular"] < best["value"]  # planted clusters: the model beats the floor

    out = _run_cli("infer", "-m", CONFIG, "-o", *over, "--best", "--exact")
    assert out.startswith(f"epoch {best['epoch']}:") and len(out.strip().splitlines()) == 1
    _run_cli("export", "-m", CONFIG, "-o", *over, "--output", str(tmp_path / "export"))
    with open(tmp_path / "export" / "manifest.json") as f:
        assert json.load(f)["epoch"] == best["epoch"]


def test_no_improvement_stops_early(planted, tmp_path):
    data, stats = planted
    over = _overrides(tmp_path, data, stats, "runner.epochs=6", "runner.batches_per_epoch=5",
                      "hyper_parameters.optimizer.learning_rate=0.0", "runner.early_stop_patience=2",
                      "runner.valid_max_users=30")
    summary = train(load_config(CONFIG, over))
    assert summary.stopped_early
    assert [e.epoch for e in summary.epochs] == [0, 1, 2]  # epochs 1 and 2 did not improve on 0
    assert summary.best_epoch == 0
    assert not os.path.isdir(tmp_path / "ckpt" / "3")


@pytest.mark.parametrize("key, value, message", [
    ("runner.valid_metric", "MRR@10", "expected Recall@N, NDCG@N or HitRate@N"),
    ("runner.early_stop_patience", "-1", "must be >= 0"),
])
def test_bad_validation_settings(planted, tmp_path, key, value, message):
    data, stats = planted
    with pytest.raises(ConfigError, match=message):
        train(load_config(CONFIG, _overrides(tmp_path, data, stats, f"{key}={value}")))


def test_infer_best_without_validation_is_a_clear_error(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "paddlerec_milvus.cli", "infer", "-m", CONFIG, "-o",
                           f"runner.infer_load_path={tmp_path}", "--best"], capture_output=True, text=True)
    assert proc.returncode == 2 and "no " in proc.stderr and "best.json" in proc.stderr


def test_a_resumed_run_keeps_the_earlier_epochs_record(planted, tmp_path):
    data, stats = planted
    straight = _overrides(tmp_path / "a", data, stats, "runner.epochs=3", "runner.batches_per_epoch=20")
    train(load_config(CONFIG, straight))
    first = _overrides(tmp_path / "b", data, stats, "runner.epochs=2", "runner.batches_per_epoch=20")
    train(load_config(CONFIG, first))
    resumed = train(load_config(CONFIG, first[:-2] + [
        "runner.epochs=3", "runner.batches_per_epoch=20", f"runner.model_init_path={tmp_path}/b/ckpt/1"]))
    assert [e.epoch for e in resumed.epochs] == [2]
    with open(tmp_path / "a" / "ckpt" / "best.json") as f:
        want = json.load(f)
    with open(tmp_path / "b" / "ckpt" / "best.json") as f:
        got = json.load(f)
    assert got == want and sorted(got["history"]) == ["0", "1", "2"]
