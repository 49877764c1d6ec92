import pytest

from paddlerec_milvus.config import apply_overrides, flatten, load_config, require
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
  name: mind
  ids: [1, 2]
"""


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
        "hyper_parameters.name=comirec", "hyper_parameters.ids=[3, 4, 5]"])
    assert cfg["runner.epochs"] == 7 and isinstance(cfg["runner.epochs"], int)
    assert cfg["runner.use_gpu"] is True
    assert cfg["hyper_parameters.optimizer.learning_rate"] == 0.01
    assert cfg["hyper_parameters.name"] == "comirec"
    assert cfg["hyper_parameters.ids"] == [3, 4, 5]


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


def test_new_key_in_known_section_is_allowed():
    cfg = apply_overrides({"runner.epochs": 1}, ["runner.seed=5"])
    assert cfg["runner.seed"] == 5


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
