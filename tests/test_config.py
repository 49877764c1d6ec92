import glob
import json
import os
import re

import pytest

from paddlerec_milvus.config import KNOWN_KEYS, apply_overrides, flatten, is_known_key, load_config, require
from paddlerec_milvus.errors import ConfigError

YAML = """
runner:
  train_data_dir: "data/train"
  epochs: 2
  use_gpu: False
  model_save_path: "/abs/out"
hyper_parameters:
  optimizer:
    learning_rate: 0.001
  maxlen: 20
milvus:
  scalar_fields: [a, b]
"""
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIND_CONFIG = os.path.join(REPO, "models", "mind", "config.yaml")


@pytest.fixture
def cfg_file(tmp_path):
    p = tmp_path / "config.yaml"
    p.write_text(YAML)
    return p


def test_flatten_gives_dotted_keys():
    assert flatten({"a": {"b": {"c": 1}}, "d": 2}) == {"a.b.c": 1, "d": 2}


def test_load_resolves_relative_paths_against_config_folder(cfg_file):
    cfg = load_config(str(cfg_file))
    assert cfg["runner.train_data_dir"] == str(cfg_file.parent / "data" / "train")
    assert cfg["runner.model_save_path"] == "/abs/out"
    assert cfg["hyper_parameters.optimizer.learning_rate"] == 0.001
    assert cfg["config_abs_dir"] == str(cfg_file.parent)


def test_overrides_cast_to_existing_type(cfg_file):
    cfg = load_config(str(cfg_file), [
        "runner.epochs=7", "runner.use_gpu=True", "hyper_parameters.optimizer.learning_rate=0.01",
        "runner.train_reader_path=other_reader", "milvus.scalar_fields=[x, y, z]"])
    assert cfg["runner.epochs"] == 7 and isinstance(cfg["runner.epochs"], int)
    assert cfg["runner.use_gpu"] is True
    assert cfg["hyper_parameters.optimizer.learning_rate"] == 0.01
    assert cfg["runner.train_reader_path"] == "other_reader"
    assert cfg["milvus.scalar_fields"] == ["x", "y", "z"]


def test_override_relative_path_is_resolved_too(cfg_file):
    cfg = load_config(str(cfg_file), ["runner.train_data_dir=other/train"])
    assert cfg["runner.train_data_dir"] == str(cfg_file.parent / "other" / "train")


@pytest.mark.parametrize("override, message", [
    ("runner.epochs=three", "expected an integer"),
    ("runner.use_gpu=maybe", "expected a boolean"),
    ("hyper_parameters.optimizer.learning_rate=fast", "expected a number"),
    ("runner.epocs=3", "did you mean 'runner.epochs'"),
    ("epochs=3", "did you mean 'runner.epochs'"),
    ("runner.epochs", "expected key=value"),
])
def test_bad_overrides_are_clear_errors(cfg_file, override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_config(str(cfg_file), [override])


def test_known_key_absent_from_the_file_may_be_set():
    cfg = apply_overrides({"runner.epochs": 1}, ["runner.seed=5", "milvus.index_params.nlist=8"])
    assert cfg["runner.seed"] == 5 and cfg["milvus.index_params.nlist"] == 8


def test_override_of_a_key_no_code_reads_is_an_error(cfg_file):
    with pytest.raises(ConfigError, match="override of unknown key 'runner.my_flag'"):
        load_config(str(cfg_file), ["runner.my_flag=1"])


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(str(tmp_path / "nope.yaml"))


def test_bad_yaml_names_file_and_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("runner:\n  epochs: 2\n  bad: [1, 2\nhyper_parameters: {}\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: invalid YAML"):
        load_config(str(p))


def test_require_checks_presence_and_type(cfg_file):
    cfg = load_config(str(cfg_file))
    assert require(cfg, "runner.epochs", int) == 2
    with pytest.raises(ConfigError, match="missing required key 'runner.seed'"):
        require(cfg, "runner.seed")
    with pytest.raises(ConfigError, match="wrong type"):
        require(cfg, "runner.use_gpu", int)


def test_new_key_next_to_a_similar_sibling_is_a_typo(cfg_file):
    cfg = load_config(str(cfg_file), ["hyper_parameters.optimizer.lazy_mode=False"])
    assert cfg["hyper_parameters.optimizer.lazy_mode"] is False
    with pytest.raises(ConfigError, match="did you mean 'hyper_parameters.optimizer.learning_rate'"):
        load_config(str(cfg_file), ["hyper_parameters.optimizer.learning_rat=0.1"])


def _mind_yaml_with(tmp_path, old, new):
    text = open(MIND_CONFIG, encoding="utf-8").read()
    assert old in text
    p = tmp_path / "config.yaml"
    p.write_text(text.replace(old, new, 1))
    return p


@pytest.mark.parametrize("old, new, key, suggestion", [
    ("  epochs: 4", "  epochz: 4", "runner.epochz", "runner.epochs"),
    ("    learning_rate: 0.005", "    learning_rte: 0.5", "hyper_parameters.optimizer.learning_rte",
     "hyper_parameters.optimizer.learning_rate"),
    ("  capsual:", "  capsule:", "hyper_parameters.capsule.iters", "hyper_parameters.capsual.iters"),
    ("  metric: \"IP\"", "  metrc: \"IP\"", "milvus.metrc", "milvus.metric"),
])
def test_typo_key_in_yaml_names_file_key_and_suggestion(tmp_path, old, new, key, suggestion):
    p = _mind_yaml_with(tmp_path, old, new)
    with pytest.raises(ConfigError) as err:
        load_config(str(p))
    assert str(err.value).startswith(f"{p}: unknown key {key!r} (did you mean {suggestion!r}?)")


def test_several_unknown_yaml_keys_are_all_named(tmp_path):
    p = _mind_yaml_with(tmp_path, "  seed: 2021", "  sead: 2021\n  bogus_flag: 1")
    with pytest.raises(ConfigError, match=r"unknown key 'runner.sead' \(did you mean 'runner.seed'\?\); "
                       r"also unknown: 'runner.bogus_flag'"):
        load_config(str(p))


def test_free_form_maps_and_workspace_are_not_checked(tmp_path):
    p = _mind_yaml_with(tmp_path, "  index_params: {}", "  index_params: {nlist: 8, anything: 1}")
    p.write_text("workspace: \"models/mind\"\n" + p.read_text())
    cfg = load_config(str(p))
    assert cfg["milvus.index_params.anything"] == 1 and cfg["workspace"] == "models/mind"


def test_typo_key_in_milvus_profile_names_the_profile(tmp_path):
    prof = tmp_path / "prof.yaml"
    prof.write_text("milvus:\n  uri: \"x.db\"\n  index_tpye: FLAT\n")
    with pytest.raises(ConfigError, match=re.escape(
            f"{prof}: unknown key 'milvus.index_tpye' (did you mean 'milvus.index_type'?)")):
        load_config(MIND_CONFIG, [f"milvus.profile={prof}"])


@pytest.mark.parametrize("name", ["config.yaml", "config_bigdata.yaml"])
def test_shipped_model_configs_load(name):
    cfg = load_config(os.path.join(REPO, "models", "mind", name))
    assert cfg["runner.epochs"] >= 1


@pytest.mark.parametrize("profile", sorted(glob.glob(os.path.join(REPO, "configs", "*.yaml"))))
def test_shipped_milvus_profiles_load(profile, monkeypatch):
    monkeypatch.setenv("MILVUS_TOKEN", "t")
    monkeypatch.setenv("MILVUS_URI", "https://example.invalid:19530")
    cfg = load_config(MIND_CONFIG, [f"milvus.profile={profile}"])
    assert cfg["milvus.profile_path"] == profile


_READ = re.compile(r"""(?:config|cfg|conf)(?:\.get\(|\[)\s*["']([A-Za-z_][\w]*\.[\w.]+)["']""")


def test_every_key_the_code_reads_is_registered():
    files = [f for d in ("paddlerec_milvus", "models", "benchmarks")
             for f in glob.glob(os.path.join(REPO, d, "**", "*.py"), recursive=True)]
    read = {(os.path.relpath(f, REPO), k) for f in files
            for k in _READ.findall(open(f, encoding="utf-8").read())}
    assert read, "the scan found no config reads"
    missing = sorted((f, k) for f, k in read if not is_known_key(k))
    assert not missing, f"add these keys to config.KNOWN_KEYS: {missing}"
    assert "runner.epochs" in KNOWN_KEYS


def _prepared(tmp_path, item_count=17):
    (tmp_path / "data" / "train").mkdir(parents=True)
    (tmp_path / "data" / "meta.json").write_text(json.dumps({"item_count": item_count}))
    cfg = tmp_path / "c.yaml"
    cfg.write_text("runner:\n  train_data_dir: data/train\nhyper_parameters:\n  item_count: auto\n")
    return str(cfg)


def test_item_count_auto_or_absent_comes_from_the_prepared_data(tmp_path):
    cfg = _prepared(tmp_path)
    assert load_config(cfg)["hyper_parameters.item_count"] == 17
    assert load_config(cfg, ["hyper_parameters.item_count=auto"])["hyper_parameters.item_count"] == 17
    (tmp_path / "c.yaml").write_text("runner:\n  train_data_dir: data/train\n")
    assert load_config(cfg)["hyper_parameters.item_count"] == 17


def test_item_count_that_disagrees_with_the_data_names_both_numbers(tmp_path):
    cfg = _prepared(tmp_path)
    with pytest.raises(ConfigError, match=r"is 38520 but the data has item_count 17 \(.*meta.json\)"):
        load_config(cfg, ["hyper_parameters.item_count=38520"])
    assert load_config(cfg, ["hyper_parameters.item_count=17"])["hyper_parameters.item_count"] == 17


def test_item_count_auto_without_prepared_data_is_a_clear_error(tmp_path):
    cfg = _prepared(tmp_path)
    os.remove(tmp_path / "data" / "meta.json")
    with pytest.raises(ConfigError, match="item_count is auto, but .*meta.json is missing"):
        load_config(cfg)
