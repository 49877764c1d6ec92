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
from paddlerec_milvus.recall import latest_clicks
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
        want = user_interests(tower, *latest_clicks(hist, seq_len, manifest.history_len or None))
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


def test_a_clone_made_after_a_reexport_still_runs_its_own_versions_tower(trained_demo, exported_demo,
                                                                          tmp_path):
    """Paddle 3's clone() reads the model files again: a pool clone made after a re-export
    replaced the folder ran the new tower inside the old version (CI: answers labelled e0 that
    were e1's tower on e0's vectors)."""
    from paddlerec_milvus.export import save_user_tower
    from paddlerec_milvus.service import UserTowerPredictor

    folder = str(tmp_path / "export")
    shutil.copytree(exported_demo["export_dir"], folder)
    m = Manifest.load(folder)
    hist = np.zeros((3, m.maxlen), dtype=np.int64)
    hist[:, :4] = [[5, 9, 30, 2], [100, 7, 2, 1], [11, 12, 13, 14]]
    seq_len = np.array([4, 4, 4])
    pred = UserTowerPredictor(folder, m)
    before = pred(hist, seq_len)

    other = str(tmp_path / "other")  # a re-export: other weights, renamed into place
    os.makedirs(other)
    save_user_tower(trained_tower(trained_demo, load=False), m.maxlen, other)
    os.rename(folder, folder + ".old")
    os.rename(other, folder)
    shutil.rmtree(folder + ".old")
    assert np.abs(UserTowerPredictor(folder, m)(hist, seq_len) - before).max() > 1e-3  # it differs

    busy = pred._free.pop()  # every clone busy: the next call makes a new one
    try:
        np.testing.assert_allclose(pred(hist, seq_len), before, rtol=1e-5, atol=1e-6)
    finally:
        pred._free.append(busy)


def test_tower_folders_of_services_that_are_gone_are_swept(tmp_path):
    import subprocess
    import sys

    from paddlerec_milvus.service import TOWER_LINKS_PREFIX, sweep_stale_tower_links

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    dead, live = f"{TOWER_LINKS_PREFIX}{int(gone.stdout)}-abc_1", f"{TOWER_LINKS_PREFIX}{os.getpid()}-xyz"
    for name in (dead, live, "unrelated-1-x"):
        os.makedirs(tmp_path / name)
        (tmp_path / name / "user_tower.pdiparams").write_bytes(b"x")
    assert sweep_stale_tower_links(str(tmp_path)) == [dead]
    assert sorted(os.listdir(tmp_path)) == sorted([live, "unrelated-1-x"])
