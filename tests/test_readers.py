"""The model directory's readers: coverage, shapes, determinism, PaddleRec DataLoader use."""

import os

import numpy as np
import paddle
import pytest
from conftest import MODELS

from paddlerec_milvus.config import load_config
from paddlerec_milvus.errors import DataError
from paddlerec_milvus.model_dir import create_reader

CONFIG = os.path.join(MODELS, "mind", "config.yaml")


def _write_clicks(path, n_users, per_user=12, n_items=50, seed=0):
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for u in range(n_users):
            for t in range(per_user):
                f.write(f"{u},{rng.integers(1, n_items)},{t}\n")


def _reader(tmp_path, n_users, **over):
    d = tmp_path / f"train{n_users}"
    d.mkdir()
    _write_clicks(d / "part-0.txt", n_users)
    opts = [f"runner.train_data_dir={d}", "hyper_parameters.item_count=50",
            "runner.batches_per_epoch=20", "runner.train_batch_size=32"]
    opts += [f"{k}={v}" for k, v in over.items()]
    return create_reader(load_config(CONFIG, opts), "train")


def _epoch_pairs(reader, epoch):
    reader.set_epoch(epoch)
    users, pairs = set(), set()
    for hist, target, seq_len in reader.iter_batches(with_negatives=False):
        for h, t, n in zip(hist, target[:, 0], seq_len[:, 0]):
            users.add(tuple(h[:4]))
            pairs.add((tuple(h[:n]), int(t)))
    return users, pairs


def test_epoch_covers_users_and_grows_with_data(tmp_path):
    small, big = _reader(tmp_path, 100), _reader(tmp_path, 600)
    _, pairs_small = _epoch_pairs(small, 0)
    _, pairs_big = _epoch_pairs(big, 0)
    # 640 samples an epoch: a stuck sampler would repeat a few batches; ours draws new pairs.
    assert len(pairs_big) > len(pairs_small) > 300


def test_every_user_seen_once_per_pass_and_epochs_differ(tmp_path):
    reader = _reader(tmp_path, 640)  # 20 x 32 = exactly one pass over the users
    reader.set_epoch(0)
    seen = np.concatenate([reader._next_users(32) for _ in range(20)])
    assert sorted(seen.tolist()) == list(range(640))
    _, p0 = _epoch_pairs(reader, 0)
    _, p1 = _epoch_pairs(reader, 1)
    _, p0_again = _epoch_pairs(reader, 0)
    assert p0 == p0_again and p0 != p1


def test_sample_shapes_history_before_target_and_padding(tmp_path):
    reader = _reader(tmp_path, 50)
    reader.set_epoch(0)
    hist, target, seq_len = reader.sample_batch(64)
    assert hist.shape == (64, 20) and target.shape == (64, 1) and seq_len.shape == (64, 1)
    assert hist.dtype == np.int64 and seq_len.min() >= 4 and seq_len.max() <= 11
    for h, n in zip(hist, seq_len[:, 0]):
        assert (h[:n] > 0).all() and (h[n:] == 0).all()


def test_history_is_the_items_right_before_the_target(tmp_path):
    d = tmp_path / "seq"
    d.mkdir()
    # user u clicks items 1..30 in time order (file order reversed to check sorting)
    lines = [f"0,{i},{i}" for i in range(1, 31)][::-1]
    (d / "part-0.txt").write_text("\n".join(lines) + "\n")
    cfg = load_config(CONFIG, [f"runner.train_data_dir={d}", "hyper_parameters.item_count=50"])
    reader = create_reader(cfg, "train")
    reader.set_epoch(0)
    hist, target, seq_len = reader.sample_batch(200)
    for h, t, n in zip(hist, target[:, 0], seq_len[:, 0]):
        assert 5 <= t <= 30 and n == min(t - 1, 20)
        assert h[:n].tolist() == list(range(t - n, t))


def test_bad_training_lines_are_clear(tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    (d / "part-0.txt").write_text("1,2,3\n1,x,4\n")
    cfg = load_config(CONFIG, [f"runner.train_data_dir={d}"])
    with pytest.raises(DataError, match=r"part-0.txt:2: ids and time must be integers"):
        create_reader(cfg, "train")
    (d / "part-0.txt").write_text("1,2,3\n1,5000,4\n")
    with pytest.raises(DataError, match=r"part-0.txt:2: item id 5000 outside 1..1940"):
        create_reader(cfg, "train")
    (d / "part-0.txt").write_text("1,-3,3\n")
    with pytest.raises(DataError, match=r"item id -3"):
        create_reader(cfg, "train")


def test_infer_reader_keeps_all_eval_items_and_every_user(tmp_path):
    d = tmp_path / "test"
    d.mkdir()
    lines = []
    for u in range(7):
        hist = " ".join(f"hist_item:{i}" for i in range(1, 31))
        evals = " ".join(f"eval_item:{i}" for i in range(100, 100 + 25 + u))
        lines.append(f"user_id:{u} target_item:0 {hist} {evals}")
    (d / "part-0.txt").write_text("\n".join(lines) + "\n")
    cfg = load_config(CONFIG, [f"runner.test_data_dir={d}", f"runner.train_data_dir={tmp_path}/train",
                               "hyper_parameters.item_count=200"])  # no meta.json there: any count
    reader = create_reader(cfg, "test")
    batches = list(reader.iter_batches(3))
    assert [len(b[0]) for b in batches] == [3, 3, 1]  # the last partial batch is kept
    users, hist, seq_len, evals = batches[0]
    assert hist.shape == (3, 20) and seq_len.tolist() == [20, 20, 20]
    assert hist[0].tolist() == list(range(11, 31))  # the last maxlen items
    assert [len(e) for e in evals] == [25, 26, 27]


def test_infer_reader_errors_name_file_and_line(tmp_path):
    d = tmp_path / "t"
    d.mkdir()
    (d / "part-0.txt").write_text("user_id:1 hist_item:3 eval_item:4\nuser_id:2 eval_item:5\n")
    cfg = load_config(CONFIG, [f"runner.test_data_dir={d}"])
    with pytest.raises(DataError, match=r"part-0.txt:2: empty history"):
        create_reader(cfg, "test")
    (d / "part-0.txt").write_text("user_id:1 hist_item:abc eval_item:4\n")
    with pytest.raises(DataError, match=r"part-0.txt:1: hist_item value 'abc' is not an integer"):
        create_reader(cfg, "test")


def test_paddle_dataloader_batches_both_readers():
    """PaddleRec's tools wrap RecDataset in paddle.io.DataLoader: per-sample iteration must batch."""
    cfg = load_config(CONFIG, ["runner.batches_per_epoch=2", "runner.train_batch_size=16"])
    train = create_reader(cfg, "train")
    batches = [b for b in paddle.io.DataLoader(train, batch_size=16, drop_last=True)]
    assert len(batches) == 2
    assert [list(t.shape) for t in batches[0]] == [[16, 20], [16, 1], [16, 1]]
    test = create_reader(cfg, "test")
    first = next(iter(paddle.io.DataLoader(test, batch_size=8)))
    assert list(first[0].shape) == [8, 20] and list(first[1].shape) == [8, 1]
    assert first[2].shape[0] == 8 and first[2].shape[1] == 1


def test_fast_path_batches_carry_negatives_and_their_logit_bias(tmp_path):
    reader = _reader(tmp_path, 100, **{"hyper_parameters.neg_samples": 16})
    reader.set_epoch(0)
    hist, target, seq_len, negs, bias = next(reader.iter_batches())
    assert negs.shape == (16,) and negs.min() >= 1 and negs.max() <= 49
    assert bias.shape == (32, 17) and bias.dtype == np.float32
    hit = negs[None, :] == target
    assert (bias[:, 1:][hit] == -1e9).all() and (bias[:, 1:][~hit] > -1e3).all()
    # log-Q: popular (low) ids are sampled more often, so they are corrected down more
    order = np.argsort(negs)
    finite = bias[0, 1:][order][~hit[0][order]]
    assert (np.diff(finite) >= -1e-5).all()
