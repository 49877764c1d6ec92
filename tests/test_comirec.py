"""ComiRec-DR and ComiRec-SA (models/comirec_dr, models/comirec_sa): the networks, the copies of
MIND's shared files, export of the user tower, and quality on planted structure."""

import importlib.util
import os
import sys

import numpy as np
import paddle
import pytest
import yaml
from conftest import MODELS
from synthetic import planted_clusters

from paddlerec_milvus.config import flatten, load_config
from paddlerec_milvus.data_prep import prepare_data
from paddlerec_milvus.evaluate import evaluate_epochs
from paddlerec_milvus.model_dir import load_dygraph_model
from paddlerec_milvus.runner import train
from paddlerec_milvus.scoring import score_popularity

MODELS_UNDER_TEST = ("comirec_dr", "comirec_sa")
SHARED_FILES = ("multi_interest.py", "mind_reader.py", "mind_infer_reader.py")


def _load(model, name):
    """A model dir's module under a unique name: every dir has its own ``net.py``."""
    spec = importlib.util.spec_from_file_location(f"{model}_{name}",
                                                  os.path.join(MODELS, model, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_net(model):
    """``net.py`` of ``model``, its ``import multi_interest`` bound to that dir's copy."""
    saved = sys.modules.get("multi_interest")
    sys.modules["multi_interest"] = _load(model, "multi_interest")
    try:
        return _load(model, "net")
    finally:
        if saved is None:
            del sys.modules["multi_interest"]
        else:
            sys.modules["multi_interest"] = saved


def small(model, **kw):
    paddle.seed(0)
    net = load_net(model)
    layer = net.ComiRecDRLayer if model == "comirec_dr" else net.ComiRecSALayer
    m = layer(item_count=100, embedding_dim=16, neg_samples=32, maxlen=8, capsual_max_k=4, **kw)
    m.eval()
    return m


def t(x):
    return paddle.to_tensor(np.asarray(x, dtype=np.int64))


@pytest.mark.parametrize("model", MODELS_UNDER_TEST)
def test_shapes(model):
    m = small(model)
    hist = t([[1, 2, 3, 0, 0, 0, 0, 0], [4, 5, 6, 7, 8, 9, 10, 11]])
    interests, weight = m(hist, t([3, 8]))
    assert interests.shape == [2, 4, 16] and weight.shape == [2, 4, 8]
    assert m.interests(hist, t([[3], [8]])).shape == [2, 4, 16]  # [B, 1] lengths work too


@pytest.mark.parametrize("model,kw", [("comirec_dr", {}), ("comirec_dr", {"bilinear": "shared"}),
                                      ("comirec_sa", {}), ("comirec_sa", {"add_positions": False})])
def test_padding_never_influences_interests(model, kw):
    m = small(model, **kw)
    a, wa = m(t([[5, 9, 13, 0, 0, 0, 0, 0]]), t([3]))
    b, wb = m(t([[5, 9, 13, 77, 2, 98, 41, 6]]), t([3]))  # garbage after seq_len
    np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert float(wa[:, :, 3:].abs().sum()) == 0.0 and float(wb[:, :, 3:].abs().sum()) == 0.0


@pytest.mark.parametrize("model", MODELS_UNDER_TEST)
def test_interests_are_deterministic_and_distinct(model):
    m = small(model)
    hist, n = t([[3, 1, 4, 1, 5, 9, 2, 6]]), t([8])
    a, _ = m(hist, n)
    b, _ = m(hist, n)
    np.testing.assert_array_equal(a.numpy(), b.numpy())
    # zero routing logits (DR) / one head per interest (SA): the interests still differ
    assert np.abs(a.numpy()[0, 0] - a.numpy()[0, 1]).max() > 1e-4


def test_dr_splits_each_behaviour_among_the_interests():
    m = small("comirec_dr")
    interests, w = m(t([[1, 2, 3, 4, 5, 0, 0, 0]]), t([5]))
    np.testing.assert_allclose(w.numpy()[0, :, :5].sum(axis=0), np.ones(5), rtol=1e-5)
    norms = np.linalg.norm(interests.numpy(), axis=-1)
    assert (norms < 1).all() and (norms > 0).all()  # squashed
    assert m.routing.bilinear.shape == [8, 16, 4 * 16]  # a map per (position, interest)
    assert small("comirec_dr", bilinear="shared").routing.bilinear.shape == [16, 4 * 16]


def test_sa_interests_mix_the_item_embeddings_without_positions():
    m = small("comirec_sa")
    hist, n = t([[1, 2, 3, 4, 5, 0, 0, 0]]), t([5])
    interests, w = m(hist, n)
    np.testing.assert_allclose(w.numpy()[0, :, :5].sum(axis=1), np.ones(4), rtol=1e-5)
    want = paddle.matmul(w, m.item_emb(hist)).numpy()
    np.testing.assert_allclose(interests.numpy(), want, rtol=1e-6)
    assert m.attention.w1.weight.shape == [16, 64]  # hidden size defaults to 4 D


def test_hard_readout_picks_the_closest_interest_and_soft_mixes():
    shared = _load("mind", "multi_interest")  # the copies are identical (test above)
    interests = paddle.to_tensor([[[1.0, 0.0], [0.0, 2.0], [-1.0, 0.0]]])
    target = paddle.to_tensor([[0.5, 1.0]])  # scores 0.5, 2, -0.5
    np.testing.assert_array_equal(shared.select_interest(interests, target, "hard").numpy(), [[0.0, 2.0]])
    att = np.exp([0.5, 2.0, -0.5]) / np.exp([0.5, 2.0, -0.5]).sum()
    np.testing.assert_allclose(shared.select_interest(interests, target, "soft").numpy()[0],
                               att @ interests.numpy()[0], rtol=1e-5)


@pytest.mark.parametrize("model,kw", [("comirec_dr", {"bilinear": "full"}),
                                      ("comirec_dr", {"readout_mode": "max"}),
                                      ("comirec_sa", {"readout_mode": "max"})])
def test_bad_options_are_clear_errors(model, kw):
    with pytest.raises(ValueError, match="must be one of"):
        small(model, **kw)


@pytest.mark.parametrize("model", MODELS_UNDER_TEST)
def test_create_model_checks_sizes(model):
    cfg = load_config(os.path.join(MODELS, model, "config.yaml"))
    dm = load_dygraph_model(cfg)
    cfg["hyper_parameters.item_count"] = 1  # past the loader's check against meta.json
    with pytest.raises(ValueError, match="item_count"):
        dm.create_model(cfg)
    cfg["hyper_parameters.item_count"], cfg["hyper_parameters.hidden_size"] = 50, 32
    with pytest.raises(ValueError, match="hidden_size must equal embedding_dim"):
        dm.create_model(cfg)


@pytest.mark.parametrize("model", MODELS_UNDER_TEST)
@pytest.mark.parametrize("name", SHARED_FILES)
def test_shared_files_are_copies_of_minds(model, name):
    with open(os.path.join(MODELS, "mind", name), "rb") as a, \
            open(os.path.join(MODELS, model, name), "rb") as b:
        assert a.read() == b.read(), f"models/{model}/{name} must be a copy of models/mind/{name}"


@pytest.mark.parametrize("model", MODELS_UNDER_TEST)
@pytest.mark.parametrize("name", ["config.yaml", "config_bigdata.yaml"])
def test_configs_load_and_leave_model_init_path_out(model, name):
    path = os.path.join(MODELS, model, name)
    cfg = load_config(path)  # every key known
    suffix = "_bigdata" if "bigdata" in name else ""
    assert cfg["runner.model_save_path"].endswith(f"output_model_{model}{suffix}")
    assert model in cfg["milvus.collection"] and model in cfg["milvus.uri"]
    with open(path) as f:
        assert "runner.model_init_path" not in flatten(yaml.safe_load(f))  # PaddleRec would load it
    if name == "config.yaml":
        assert all(os.path.isdir(cfg[f"runner.{s}_data_dir"]) for s in ("train", "test", "valid"))


@pytest.mark.parametrize("model", MODELS_UNDER_TEST)
def test_user_tower_exports_and_reloads_with_the_same_interests(model, tmp_path):
    cfg = load_config(os.path.join(MODELS, model, "config.yaml"))
    paddle.seed(0)
    dm = load_dygraph_model(cfg)
    dy_model = dm.create_model(cfg)
    tower = dm.user_tower(dy_model)
    tower.eval()
    maxlen = cfg["hyper_parameters.maxlen"]
    spec = [paddle.static.InputSpec([None, maxlen], "int64", "hist_item"),
            paddle.static.InputSpec([None], "int64", "seq_len")]
    paddle.jit.save(paddle.jit.to_static(tower, input_spec=spec, full_graph=True), str(tmp_path / "tower"))
    loaded = paddle.jit.load(str(tmp_path / "tower"))
    rng = np.random.default_rng(0)
    seq_len = rng.integers(1, maxlen + 1, 16)
    hist = rng.integers(1, cfg["hyper_parameters.item_count"], (16, maxlen))
    hist[np.arange(maxlen)[None, :] >= seq_len[:, None]] = 0
    want = tower(t(hist), t(seq_len)).numpy()
    np.testing.assert_allclose(loaded(t(hist), t(seq_len)).numpy(), want, rtol=1e-5, atol=1e-6)
    user_embs, _ = dm.infer_forward(dy_model, None, (hist, seq_len), cfg)  # PaddleRec's infer.py
    np.testing.assert_allclose(user_embs.numpy(), want, rtol=1e-6)
    assert dm.item_vectors(dy_model).shape == (cfg["hyper_parameters.item_count"], want.shape[-1])


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    base = tmp_path_factory.mktemp("planted_comirec")
    data = base / "data"
    stats = prepare_data(planted_clusters(str(base / "clicks.csv")), str(data), seed=5)
    return base, data, stats


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS_UNDER_TEST)
def test_beats_most_popular_on_planted_clusters(planted, model):
    base, data, stats = planted
    out = base / model
    cfg = load_config(os.path.join(MODELS, model, "config.yaml"), [
        f"runner.train_data_dir={data}/train", f"runner.test_data_dir={data}/test",
        f"runner.valid_data_dir={data}/valid", f"runner.model_save_path={out}/ckpt",
        f"runner.infer_load_path={out}/ckpt",
        f"hyper_parameters.item_count={stats.item_count}", "hyper_parameters.neg_samples=64",
        "runner.batches_per_epoch=120", "runner.epochs=3", "runner.train_batch_size=64",
        "runner.infer_start_epoch=2", "runner.infer_end_epoch=3", f"milvus.uri={out}/m.db"])
    train(cfg)
    result = evaluate_epochs(cfg, top_n=50, exact=True)[0]
    pop = score_popularity(cfg, top_n=50)
    # As for MIND (test_training.py): 20 equal clusters, 2 per user, popularity near chance.
    assert pop["Recall@50"] < 0.2
    assert result.metrics["Recall@50"] > 2.5 * pop["Recall@50"]
    assert result.metrics["Recall@50"] > 0.5
    assert result.metrics["HitRate@50"] >= pop["HitRate@50"]
    assert result.users == stats.test_users
