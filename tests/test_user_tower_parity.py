"""The served user tower computes the trained model's interests. Paddle 3.3's CPU predictor turns
oneDNN on by default, and its passes computed this tower wrongly (off by up to 12, every row),
while every serving test compared serving against the same wrong predictor."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from paddlerec_milvus.checkpoint import checkpoint_dir, latest_epoch, load_checkpoint
from paddlerec_milvus.config import load_config
from paddlerec_milvus.errors import ConfigError
from paddlerec_milvus.export import check_tower_parity
from paddlerec_milvus.model_dir import load_dygraph_model
from paddlerec_milvus.serving_contract import Manifest
from paddlerec_milvus.towers import user_interests, user_tower

pytestmark = pytest.mark.slow


def trained_tower(trained_demo, epoch: int | None = None, load: bool = True):
    """The model directory's user tower hook, with the checkpoint's weights (or untrained)."""
    config = load_config(trained_demo["config_path"], trained_demo["overrides"])
    dm = load_dygraph_model(config)
    model = dm.create_model(config)
    if load:
        path = config.get("runner.infer_load_path") or config.get("runner.model_save_path")
        load_checkpoint(model, checkpoint_dir(path, epoch if epoch is not None else latest_epoch(path)))
    return user_tower(dm, model)


def test_served_interests_equal_the_trained_models(trained_demo, exported_demo, tmp_path):
    from paddlerec_milvus.service import RecallService

    export_dir = exported_demo["export_dir"]
    manifest = Manifest.load(export_dir)
    tower = trained_tower(trained_demo, manifest.epoch)
    db = str(tmp_path / "items.db")
    shutil.copy(exported_demo["milvus_uri"], db)
    svc = RecallService(export_dir, milvus_uri=db)
    try:
        rng = np.random.default_rng(5)
        raw = svc.raw_ids[1:]
        histories = [rng.choice(raw, size=int(rng.integers(1, 40)), replace=False).tolist()
                     for _ in range(32)]
        served, _ = svc.interests(histories)
        hist, seq_len, _ = svc.encode(histories)
        want = user_interests(tower, hist, seq_len)
        np.testing.assert_allclose(served, want, rtol=1e-4, atol=1e-4)
    finally:
        svc.close()


def test_export_refuses_a_tower_that_disagrees_with_the_model(trained_demo, exported_demo, tmp_path):
    export_dir = exported_demo["export_dir"]
    m = Manifest.load(export_dir)
    trained = trained_tower(trained_demo, m.epoch)
    assert check_tower_parity(trained, export_dir, m.model_file, m.params_file, m.item_count, m.maxlen) < 1e-3
    untrained = trained_tower(trained_demo, load=False)  # not the weights the folder holds
    folder = str(tmp_path / "copy")
    shutil.copytree(export_dir, folder)
    with pytest.raises(ConfigError, match="disagrees with the trained model"):
        check_tower_parity(untrained, folder, m.model_file, m.params_file, m.item_count, m.maxlen)
    assert os.path.isfile(os.path.join(export_dir, m.model_file))
