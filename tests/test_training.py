"""Training: quality on planted structure, resume, device fallback, PaddleRec's loop."""

import logging
import os
import shutil

import numpy as np
import paddle
import pytest
from conftest import MODELS
from synthetic import planted_clusters

from paddlerec_milvus.config import load_config
from paddlerec_milvus.data_prep import prepare_data
from paddlerec_milvus.evaluate import evaluate_epochs
from paddlerec_milvus.model_dir import create_reader, load_dygraph_model
from paddlerec_milvus.runner import train
from paddlerec_milvus.scoring import score_popularity

pytestmark = pytest.mark.slow
CONFIG = os.path.join(MODELS, "mind", "config.yaml")


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    base = tmp_path_factory.mktemp("planted")
    data = base / "data"
    stats = prepare_data(planted_clusters(str(base / "clicks.csv")), str(data), seed=5)
    return base, data, stats


def _config(base, data, stats, extra=()):
    return load_config(CONFIG, [
        f"runner.train_data_dir={data}/train", f"runner.test_data_dir={data}/test",
        f"runner.valid_data_dir={data}/valid", f"runner.model_save_path={base}/ckpt",
        f"runner.infer_load_path={base}/ckpt",
        f"hyper_parameters.item_count={stats.item_count}", "hyper_parameters.neg_samples=64",
        "runner.batches_per_epoch=120", "runner.epochs=3", "runner.train_batch_size=64",
        "runner.infer_start_epoch=2", "runner.infer_end_epoch=3", f"milvus.uri={base}/m.db",
        *extra])


def test_mind_beats_most_popular_on_planted_clusters(planted):
    base, data, stats = planted
    cfg = _config(base, data, stats)
    train(cfg)
    result = evaluate_epochs(cfg, top_n=50, exact=True)[0]
    pop = score_popularity(cfg, top_n=50)
    # 20 equal clusters, 2 per user: popularity is near chance (~50/400), the model should
    # find most of a user's two clusters (40 items) in its top 50.
    assert pop["Recall@50"] < 0.2
    assert result.metrics["Recall@50"] > 2.5 * pop["Recall@50"]
    assert result.metrics["Recall@50"] > 0.5
    assert result.metrics["HitRate@50"] >= pop["HitRate@50"]
    assert result.users == stats.test_users


def test_checkpoint_then_resume_gives_the_same_parameters(planted, tmp_path):
    base, data, stats = planted
    straight = _config(tmp_path / "a", data, stats, ["runner.epochs=2", "runner.batches_per_epoch=15"])
    train(straight)
    first = _config(tmp_path / "b", data, stats, ["runner.epochs=1", "runner.batches_per_epoch=15"])
    train(first)
    resumed = _config(tmp_path / "b", data, stats, [
        "runner.epochs=2", "runner.batches_per_epoch=15", f"runner.model_init_path={tmp_path}/b/ckpt/0"])
    summary = train(resumed)
    assert [e.epoch for e in summary.epochs] == [1]
    a = paddle.load(str(tmp_path / "a" / "ckpt" / "1" / "rec.pdparams"))
    b = paddle.load(str(tmp_path / "b" / "ckpt" / "1" / "rec.pdparams"))
    assert set(a) == set(b)
    for name in a:
        np.testing.assert_array_equal(a[name].numpy(), b[name].numpy(), err_msg=name)
    assert os.path.isfile(tmp_path / "b" / "ckpt" / "1" / "rec.pdopt")


def test_same_seed_same_model(planted, tmp_path):
    base, data, stats = planted
    for run in ("x", "y"):
        train(_config(tmp_path / run, data, stats, ["runner.epochs=1", "runner.batches_per_epoch=10"]))
    a = paddle.load(str(tmp_path / "x" / "ckpt" / "0" / "rec.pdparams"))
    b = paddle.load(str(tmp_path / "y" / "ckpt" / "0" / "rec.pdparams"))
    np.testing.assert_array_equal(a["item_emb.weight"].numpy(), b["item_emb.weight"].numpy())


@pytest.mark.skipif(paddle.is_compiled_with_cuda(), reason="checks the CPU-only fallback")
def test_use_gpu_on_cpu_paddle_falls_back_with_one_warning(planted, tmp_path, caplog):
    base, data, stats = planted
    cfg = _config(tmp_path, data, stats, ["runner.use_gpu=True", "runner.epochs=1",
                                          "runner.batches_per_epoch=2"])
    with caplog.at_level(logging.WARNING):
        train(cfg)
    warnings = [r for r in caplog.records if "use_gpu" in r.getMessage()]
    assert len(warnings) == 1 and "CPU" in warnings[0].getMessage()


def test_paddlerec_style_loop_runs_the_model_dir(tmp_path):
    """What PaddleRec's tools/trainer.py does: DataLoader over RecDataset, then the
    DygraphModel methods, backward, step, and save_model's layout."""
    shutil.copytree(os.path.join(MODELS, "mind"), tmp_path / "mind",
                    ignore=shutil.ignore_patterns("output*", "__pycache__", "data_bigdata"))
    cfg = load_config(str(tmp_path / "mind" / "config.yaml"), ["runner.batches_per_epoch=5"])
    paddle.seed(1)
    dm = load_dygraph_model(cfg)
    model = dm.create_model(cfg)
    optimizer = dm.create_optimizer(model, cfg)
    metrics, names = dm.create_metrics()
    loader = paddle.io.DataLoader(create_reader(cfg, "train"), batch_size=128, drop_last=True)
    losses = []
    for batch in loader():
        loss, metrics, print_dict = dm.train_forward(model, metrics, batch, cfg)
        model.clear_gradients()
        loss.backward()
        optimizer.step()
        losses.append(float(print_dict["loss"]))
    assert len(losses) == 5 and all(np.isfinite(losses))
    test_loader = paddle.io.DataLoader(create_reader(cfg, "test"), batch_size=32)
    batch = next(iter(test_loader()))
    user_embs, _ = dm.infer_forward(model, None, batch, cfg)
    assert user_embs.shape == [32, 4, 64]
