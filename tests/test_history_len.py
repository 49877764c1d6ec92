"""recall.history_len: the user tower reads each user's latest n clicks at recall time, n chosen on
validation (``auto``) or given; offline evaluation, export and the services read the same n."""

import json
import os

import numpy as np
import pytest

from paddlerec_milvus.checkpoint import history_bonus_for, history_len_for
from paddlerec_milvus.config import history_len_setting
from paddlerec_milvus.errors import ConfigError
from paddlerec_milvus.recall import latest_clicks
from paddlerec_milvus.serving_contract import Manifest


def test_latest_clicks_hand_computed():
    hist = np.array([[1, 2, 3, 0], [4, 0, 0, 0], [5, 6, 7, 8]])
    lens = np.array([3, 1, 4])
    got, got_lens = latest_clicks(hist, lens, 2)
    assert got.tolist() == [[2, 3, 0, 0], [4, 0, 0, 0], [7, 8, 0, 0]]
    assert got_lens.tolist() == [2, 1, 2]
    same, same_lens = latest_clicks(hist, lens, None)
    assert same.tolist() == hist.tolist() and same_lens.tolist() == lens.tolist()
    wide, _ = latest_clicks(hist, lens, 4)  # n >= width: unchanged
    assert wide.tolist() == hist.tolist()
    col, col_lens = latest_clicks(hist, lens.reshape(-1, 1), 3)  # [B, 1] lengths keep their shape
    assert col.tolist() == [[1, 2, 3, 0], [4, 0, 0, 0], [6, 7, 8, 0]] and col_lens.shape == (3, 1)
    assert col_lens.ravel().tolist() == [3, 1, 3]


def test_setting_parsing_and_recorded_choice(tmp_path):
    cfg = {"hyper_parameters.maxlen": 20}
    assert history_len_setting(cfg) is None
    assert history_len_setting({**cfg, "recall.history_len": 0}) is None
    assert history_len_setting({**cfg, "recall.history_len": "Auto"}) == "auto"
    assert history_len_setting({**cfg, "recall.history_len": 8}) == 8
    assert history_len_setting({**cfg, "recall.history_len": "20"}) == 20
    for bad in (-1, 21, "x", True, 2.5):
        with pytest.raises(ConfigError, match=r"recall.history_len.*maxlen \(20\)"):
            history_len_setting({**cfg, "recall.history_len": bad})
    (tmp_path / "best.json").write_text(json.dumps({"epoch": 3, "history_len": {"3": 8}}))
    auto = {**cfg, "recall.history_len": "auto"}
    assert history_len_for(auto, str(tmp_path), 3) == 8
    assert history_len_for(auto, str(tmp_path), 2) is None  # not chosen for that epoch
    assert history_len_for({**cfg, "recall.history_len": 5}, str(tmp_path), 3) == 5
    assert history_len_for(auto, str(tmp_path / "none"), 3) is None
    (tmp_path / "best.json").write_text(json.dumps({"epoch": 3, "history_len": {"3": 0}}))
    assert history_len_for(auto, str(tmp_path), 3) is None  # 0 = the whole history won
    # the bonus re-chosen with the shortened history is the one used, only when the length is auto
    (tmp_path / "best.json").write_text(json.dumps({"epoch": 3, "history_bonus": {"3": 0.5},
                                                    "history_len": {"3": 8},
                                                    "history_len_bonus": {"3": 2.0}}))
    both = {**auto, "recall.history_bonus": "auto"}
    assert history_bonus_for(both, str(tmp_path), 3) == 2.0
    assert history_bonus_for({**both, "recall.history_len": 0}, str(tmp_path), 3) == 0.5


def test_manifest_history_len_is_optional_and_checked(tmp_path):
    fields = dict(model_version="v", epoch=0, embedding_dim=8, max_k=4, maxlen=20, item_count=5,
                  items_indexed=4, milvus_uri="x.db", collection="c", physical_collection="c",
                  model_file="m", params_file="p")
    (tmp_path / "manifest.json").write_text(json.dumps(fields))
    assert Manifest.load(str(tmp_path)).history_len == 0
    (tmp_path / "manifest.json").write_text(json.dumps(dict(fields, history_len=8)))
    assert Manifest.load(str(tmp_path)).history_len == 8
    for bad in (21, -1, 2.5, "8"):
        (tmp_path / "manifest.json").write_text(json.dumps(dict(fields, history_len=bad)))
        with pytest.raises(ConfigError, match="history_len"):
            Manifest.load(str(tmp_path))


def drifting_clicks(path, n_users=900, n_clusters=24, per_cluster=15, clicks=30, seed=3):
    """Each user's taste moves: the first two thirds of the clicks from one cluster, the last
    third (and so the held-out items) from another. The latest clicks say where the user is now;
    the whole history is mostly the old taste."""
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        f.write("user,item,timestamp\n")
        for u in range(n_users):
            old, new = rng.choice(n_clusters, size=2, replace=False)
            for t in range(clicks):
                c = old if t < 2 * clicks // 3 else new
                f.write(f"{u},{1000 + c * per_cluster + rng.integers(per_cluster)},{t}\n")
    return path


@pytest.mark.slow
def test_validation_shortens_the_history_on_drifting_tastes(demo_model_dir, tmp_path):
    """On data whose users drift, validation picks a short history, and infer.py's test score at
    that length beats the whole history's: the choice is made on validation and holds on test."""
    from conftest import _run_cli

    from paddlerec_milvus.config import load_config
    from paddlerec_milvus.data_prep import prepare_data
    from paddlerec_milvus.runner import train

    data = str(tmp_path / "data")
    prepare_data(drifting_clicks(str(tmp_path / "drift.csv")), data, seed=1, overwrite=True)
    ckpt = str(tmp_path / "ckpt")
    over = [f"runner.train_data_dir={data}/train", f"runner.valid_data_dir={data}/valid",
            f"runner.test_data_dir={data}/test", f"runner.model_save_path={ckpt}",
            f"runner.infer_load_path={ckpt}", "hyper_parameters.item_count=auto",
            "runner.epochs=2", "runner.batches_per_epoch=40", "runner.early_stop_patience=0",
            "recall.history_len=auto", "recall.history_bonus=0", f"milvus.uri={tmp_path}/m.db"]
    cfg = load_config(os.path.join(demo_model_dir, "config.yaml"), over)
    summary = train(cfg)
    best = json.load(open(os.path.join(ckpt, "best.json")))
    tried = {int(k): v for k, v in best["history_len_tried"].items()}
    assert sorted(tried) == [5, 8, 10, 12, 15, 20]
    chosen = best["history_len"][str(best["epoch"])]
    assert chosen and chosen < 20 and summary.history_len == chosen, best
    assert tried[chosen] == max(tried.values()) and tried[chosen] > 1.01 * tried[20]

    def test_recall(*extra: str) -> float:
        out = _run_cli("infer", "-m", cfg["config_path"], "-o", *over, *extra, "--best", "--exact",
                       "-top_n", "50")
        line = [x for x in out.splitlines() if "Recall@50" in x][-1]
        return float(line.split("Recall@50")[1].split()[0])

    short, full = test_recall(), test_recall("recall.history_len=0")
    assert short > full, (short, full)


@pytest.mark.slow
def test_export_and_service_read_the_latest_clicks(trained_demo, tmp_path):
    """An export made with recall.history_len=5 says so in its manifest; the service (alone and
    batched) computes the same interests from a long history as from its latest 5 clicks, while
    the history bonus and exclude_history still see the whole (maxlen) history."""
    from concurrent.futures import ThreadPoolExecutor

    from conftest import _run_cli

    from paddlerec_milvus.service import RecallService
    from paddlerec_milvus.serving_contract import ServingLimits

    uri, out = str(tmp_path / "len.db"), str(tmp_path / "model")
    _run_cli("export", "-m", trained_demo["config_path"], "-o", *trained_demo["overrides"],
             f"milvus.uri={uri}", "recall.history_len=5", "--collection", "len_serving", "--output", out)
    assert Manifest.load(out).history_len == 5
    svc = RecallService(out, limits=ServingLimits(batch_max_users=64, batch_window_ms=5.0))
    try:
        raw = svc.raw_ids[1:]
        rng = np.random.default_rng(5)
        hists = [rng.choice(raw, size=12, replace=False).tolist() for _ in range(16)]
        for h in hists[:3]:
            long_i, _ = svc.interests([h])
            short_i, _ = svc.interests([h[-5:]])
            np.testing.assert_allclose(long_i, short_i, rtol=1e-5, atol=1e-5)
            v = svc.current()  # the tower on all 12 clicks (the encoded, uncut history) differs
            assert not np.allclose(long_i, v.predictor(*svc.encode([h], v)[:2]), atol=1e-4)
        with ThreadPoolExecutor(8) as pool:  # batched: the same answers as the latest-5 request
            long_answers = list(pool.map(lambda h: svc.recall([h], 30, True), hists))
        for h, got in zip(hists, long_answers):
            alone = svc.recall([h[-5:]], 30 + len(h))
            want = [i for i in alone.items[0] if i not in set(h)][:len(got.items[0])]
            assert got.items[0] == want  # exclude_history leaves out all 12, not only the latest 5
            assert not set(got.items[0]) & set(h)
    finally:
        svc.close()
