"""Milvus profiles in configs/: they load, validate, and the standalone one runs on a real server."""

import os

import numpy as np
import pytest
from conftest import MODELS, REPO

from paddlerec_milvus.config import load_config, section
from paddlerec_milvus.errors import ConfigError, MilvusIndexError
from paddlerec_milvus.milvus_index import ItemIndex, check_index_settings
from paddlerec_milvus.recall import ExactIndex, recall_top_k

CONFIG = os.path.join(MODELS, "mind", "config.yaml")
PROFILES = ["milvus_embedded", "milvus_standalone", "milvus_cluster", "milvus_managed"]


@pytest.mark.parametrize("name", PROFILES)
def test_profiles_load_and_validate(name, monkeypatch):
    monkeypatch.setenv("MILVUS_TOKEN", "user:secret")
    monkeypatch.setenv("MILVUS_URI", "https://example.invalid:443")
    cfg = load_config(CONFIG, [f"milvus.profile=configs/{name}.yaml"])
    assert cfg["milvus.profile_path"] == os.path.join(REPO, "configs", f"{name}.yaml")
    assert cfg["milvus.collection"] == "mind_items_demo"  # the model config keeps its collection
    check_index_settings(cfg["milvus.uri"], 64, cfg["milvus.index_type"],
                         section(cfg, "milvus.index_params"), section(cfg, "milvus.search_params"))
    if name in ("milvus_cluster", "milvus_managed"):
        assert cfg["milvus.token"] == "user:secret"


def test_profile_values_and_overrides_order():
    cfg = load_config(CONFIG, ["milvus.profile=configs/milvus_standalone.yaml",
                               "milvus.uri=http://10.0.0.5:19530"])
    assert cfg["milvus.uri"] == "http://10.0.0.5:19530"  # -o wins over the profile
    assert cfg["milvus.index_type"] == "IVF_FLAT"
    assert section(cfg, "milvus.index_params") == {"nlist": 64}
    assert section(cfg, "milvus.search_params") == {"nprobe": 4}


def test_missing_env_and_missing_profile_are_clear(monkeypatch):
    monkeypatch.delenv("MILVUS_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="needs the environment variable MILVUS_TOKEN"):
        load_config(CONFIG, ["milvus.profile=configs/milvus_cluster.yaml"])
    with pytest.raises(ConfigError, match="milvus.profile 'configs/nope.yaml' not found"):
        load_config(CONFIG, ["milvus.profile=configs/nope.yaml"])


@pytest.mark.parametrize("uri, kind, build, search, message", [
    ("x.db", "HNSW", {"M": 16, "efConstruction": 200}, {}, "not available in Milvus Lite"),
    ("http://h:19530", "IVF_FLAT", {}, {}, "index_params.nlist must be a positive integer"),
    ("http://h:19530", "IVF_FLAT", {"nlist": 64}, {"nprobe": 128}, "nprobe = 128 must be in 1..64"),
    ("http://h:19530", "IVF_PQ", {"nlist": 64, "m": 5}, {}, "must divide dim 64"),
    ("http://h:19530", "ANNOY", {}, {}, "expected one of"),
])
def test_bad_index_settings(uri, kind, build, search, message):
    with pytest.raises(MilvusIndexError, match=message):
        check_index_settings(uri, 64, kind, build, search)


@pytest.mark.server
@pytest.mark.parametrize("profile", ["milvus_standalone", "milvus_cluster"])
def test_server_profiles_run_on_a_real_server(profile, milvus_server, monkeypatch):
    monkeypatch.setenv("MILVUS_TOKEN", "")
    cfg = load_config(CONFIG, [f"milvus.profile=configs/{profile}.yaml", f"milvus.uri={milvus_server.uri}",
                               f"milvus.collection=profile_{profile}"])
    # items around topics, as trained vectors are (uniformly random vectors have no neighbours for an
    # IVF to find: no profile is tuned for them), and users' interests near those topics
    rng = np.random.default_rng(0)
    topics = rng.normal(size=(40, 64)).astype(np.float32)
    ids = np.arange(1, 20001)
    vecs = (topics[rng.integers(0, 40, 20000)] + 0.5 * rng.normal(size=(20000, 64))).astype(np.float32)
    index = ItemIndex.from_config(cfg, 64)
    assert index.index_type in ("IVF_FLAT", "HNSW")
    index.upsert(ids, vecs, progress=False)
    exact = ExactIndex(64)
    exact.upsert(ids, vecs)
    q = (topics[rng.integers(0, 40, (20, 4))] + 0.5 * rng.normal(size=(20, 4, 64))).astype(np.float32)
    got, want = index.search(q, 50), recall_top_k(exact, q, 50)
    overlap = np.mean([len(set(g.ids) & set(w.ids)) / 50 for g, w in zip(got, want)])
    assert overlap > 0.8  # approximate, but close to exact
    index.drop()
