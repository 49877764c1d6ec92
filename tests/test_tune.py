"""``paddlerec-milvus tune``: Optuna on the validation split, resumable, never reading the test split."""

import json
import os
import shutil

import pytest
from conftest import MODELS
from synthetic import planted_clusters

from paddlerec_milvus.config import load_config
from paddlerec_milvus.data_prep import prepare_data
from paddlerec_milvus.errors import ConfigError
from paddlerec_milvus.tune import format_report, parse_budget, space_for, tune

CONFIG = os.path.join(MODELS, "mind", "config.yaml")


@pytest.mark.parametrize("text, seconds",
                         [("30m", 1800), ("2h", 7200), ("90s", 90), ("45", 45), ("1.5m", 90)])
def test_budget_parses(text, seconds):
    assert parse_budget(text) == seconds


@pytest.mark.parametrize("text", ["", "0m", "ten minutes", "5d", "-3m"])
def test_bad_budget_is_a_clear_error(text):
    with pytest.raises(ConfigError, match="--budget"):
        parse_budget(text)


def test_space_holds_the_configs_own_values():
    space = space_for({"hyper_parameters.optimizer.learning_rate": 0.05, "hyper_parameters.neg_samples": 64,
                       "runner.train_batch_size": 128})
    assert space["hyper_parameters.optimizer.learning_rate"][2] == 0.05
    assert 64 in space["hyper_parameters.neg_samples"][1]
    assert "hyper_parameters.pow_p" not in space  # only keys the config has
    dropout = space_for({"hyper_parameters.embedding_dropout": 0.25})["hyper_parameters.embedding_dropout"]
    assert dropout == ("choice", [0.0, 0.1, 0.2, 0.25, 0.3])


@pytest.mark.slow
def test_tune_finds_settings_on_validation_resumes_and_never_reads_test(tmp_path):
    data = tmp_path / "data"
    stats = prepare_data(planted_clusters(str(tmp_path / "clicks.csv"), n_users=400), str(data), seed=5)
    os.rename(data / "test", data / "test_hidden")  # the test split must not be needed
    over = [f"runner.train_data_dir={data}/train", f"runner.valid_data_dir={data}/valid",
            f"runner.test_data_dir={data}/test", f"hyper_parameters.item_count={stats.item_count}",
            "hyper_parameters.neg_samples=64", "runner.epochs=2", "runner.batches_per_epoch=20",
            "hyper_parameters.optimizer.learning_rate=0.0003"]
    out = str(tmp_path / "study")
    model_dir = tmp_path / "mind"  # the tuned config is written beside the config
    shutil.copytree(os.path.dirname(CONFIG), model_dir, ignore=shutil.ignore_patterns("data", "output*"))
    config = str(model_dir / "config.yaml")
    rep = tune(load_config(config, over), 600, out, max_trials=3, overrides=over)
    assert [t.number for t in rep.trials] == [0, 1, 2]
    assert rep.trials[0].params["hyper_parameters.optimizer.learning_rate"] == 0.0003  # trial 0 = the config
    assert rep.best_value >= rep.baseline_value > 0
    assert sorted(os.listdir(os.path.join(out, "trials"))) == [str(rep.best_trial)]  # others pruned away
    best = load_config(os.path.join(out, "best_config.yaml"))
    for key, value in rep.best_params.items():
        assert best[key] == value
    assert best["runner.batches_per_epoch"] == 20  # the -o settings the trials ran with
    with open(os.path.join(out, "tune_report.json")) as f:
        assert json.load(f)["best_trial"] == rep.best_trial
    assert "| 0 | complete |" in format_report(rep)
    assert rep.tuned_config == str(model_dir / "config_tuned.yaml")
    tuned = load_config(rep.tuned_config)
    assert tuned["config_abs_dir"] == str(model_dir)  # -m finds the model folder and its data paths
    assert {k: tuned[k] for k in rep.best_params} == rep.best_params

    again = tune(load_config(config, over), 600, out, max_trials=1, overrides=over)
    assert [t.number for t in again.trials] == [0, 1, 2, 3]  # the study continued
    assert again.best_value >= rep.best_value


def test_tune_needs_a_validation_split(tmp_path):
    cfg = load_config(CONFIG, ["runner.valid_data_dir="])
    with pytest.raises(ConfigError, match="runner.valid_data_dir"):
        tune(cfg, 60, str(tmp_path / "s"))


def test_the_tuned_config_never_overwrites_a_users_file(tmp_path):
    from paddlerec_milvus.tune import tuned_config_path, write_best_config

    src = tmp_path / "config.yaml"
    src.write_text("hyper_parameters:\n  neg_samples: 64\n")
    path = tuned_config_path(str(src))
    assert path == str(tmp_path / "config_tuned.yaml")
    write_best_config(str(src), {"hyper_parameters.neg_samples": 128}, path)
    write_best_config(str(src), {"hyper_parameters.neg_samples": 256}, path)  # ours: replaced
    assert load_config(path)["hyper_parameters.neg_samples"] == 256
    (tmp_path / "mine.yaml").write_text("runner: {}\n")
    with pytest.raises(ConfigError, match="not written by tune"):
        write_best_config(str(src), {}, str(tmp_path / "mine.yaml"))
    assert (tmp_path / "mine.yaml").read_text() == "runner: {}\n"
