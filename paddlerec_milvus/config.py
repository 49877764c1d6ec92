"""PaddleRec-style YAML config read as flattened dotted keys.

PaddleRec users write ``runner.train_batch_size`` and override with ``-o key=value``;
this module keeps exactly that contract, adds typed casting of overrides, clear errors,
and resolution of relative paths against the config file's folder.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

import yaml

from .errors import ConfigError

# Keys whose values are paths: resolved against the config file's folder when relative.
PATH_KEYS = (
    "runner.train_data_dir",
    "runner.test_data_dir",
    "runner.valid_data_dir",
    "runner.model_save_path",
    "runner.model_init_path",
    "runner.infer_load_path",
    "runner.metrics_output_path",
    "runner.item_map_path",
    "runner.export_path",
    "milvus.uri",
)
SECTIONS = ("runner", "hyper_parameters", "workspace", "milvus", "serving", "recall")

# Every key a model config (or a Milvus profile, or ``-o``) may set: the keys this package, the
# model zoo (models/mind/*.py) and benchmarks/ read, the keys of the shipped YAML files, and the
# runner keys PaddleRec's own tools read. Anything else is a typo and an error, with the closest
# known key suggested. A new key read anywhere must be added here.
KNOWN_KEYS = frozenset({
    # runner: data, batches, epochs, checkpoints
    "runner.train_data_dir", "runner.train_reader_path", "runner.train_batch_size",
    "runner.batches_per_epoch", "runner.epochs", "runner.seed", "runner.print_interval",
    "runner.model_save_path", "runner.model_init_path",
    "runner.test_data_dir", "runner.infer_reader_path", "runner.infer_batch_size",
    "runner.infer_load_path", "runner.infer_start_epoch", "runner.infer_end_epoch",
    "runner.valid_data_dir", "runner.valid_metric", "runner.early_stop_patience",
    "runner.valid_max_users", "runner.cpu_threads", "runner.use_gpu", "runner.use_fleet",
    "runner.metrics_output_path", "runner.item_map_path", "runner.export_path",
    "runner.rank", "runner.world_size",  # set by the runner for distributed readers
    # runner keys PaddleRec's tools read (accepted so PaddleRec configs load unchanged)
    "runner.use_visual", "runner.use_auc", "runner.use_xpu", "runner.use_npu",
    "runner.use_inference", "runner.save_inference_feed_varnames",
    "runner.save_inference_fetch_varnames", "runner.thread_num", "runner.reader_type",
    "runner.sync_mode", "runner.split_file_list", "runner.geo_step",
    # hyper_parameters of MIND (models/mind/dygraph_model.py, net.py, the readers)
    "hyper_parameters.optimizer.class", "hyper_parameters.optimizer.learning_rate",
    "hyper_parameters.optimizer.lazy_mode", "hyper_parameters.optimizer.decay",
    "hyper_parameters.optimizer.warmup_steps", "hyper_parameters.optimizer.min_lr_ratio",
    "hyper_parameters.item_count", "hyper_parameters.embedding_dim", "hyper_parameters.hidden_size",
    "hyper_parameters.neg_samples", "hyper_parameters.maxlen", "hyper_parameters.pow_p",
    "hyper_parameters.capsual.iters", "hyper_parameters.capsual.max_k",
    "hyper_parameters.capsual.init_std", "hyper_parameters.capsual.softmax_axis",
    "hyper_parameters.capsual.normalize_update", "hyper_parameters.capsual.dynamic_k",
    "hyper_parameters.capsual.relu_layers", "hyper_parameters.item_norm_penalty",
    "hyper_parameters.cosine_temperature", "hyper_parameters.negative_sampler",
    "hyper_parameters.embedding_dropout",
    # ComiRec (models/comirec_dr, models/comirec_sa): interest count is capsual.max_k, as in MIND
    "hyper_parameters.capsual.bilinear", "hyper_parameters.readout",
    "hyper_parameters.self_attention.hidden_size", "hyper_parameters.self_attention.add_positions",
    # milvus (model configs and configs/*.yaml profiles)
    "milvus.uri", "milvus.token", "milvus.collection", "milvus.serving_collection",
    "milvus.index_type", "milvus.index_params", "milvus.search_params", "milvus.metric",
    "milvus.batch_size", "milvus.upsert_workers", "milvus.consistency_level",
    "milvus.scalar_fields", "milvus.timeout", "milvus.write_timeout", "milvus.profile", "milvus.profile_path",
    # recall: how the merged list is ranked (scoring.py, export's manifest)
    "recall.history_bonus", "recall.history_len",
    # set by load_config itself
    "config_abs_dir", "config_path",
})
# Free-form maps (Milvus index/search parameters) and PaddleRec's ``workspace`` section.
FREE_FORM_PREFIXES = ("milvus.index_params.", "milvus.search_params.", "workspace.")
FREE_FORM_KEYS = ("workspace",)


def is_known_key(key: str) -> bool:
    return key in KNOWN_KEYS or key in FREE_FORM_KEYS or key.startswith(FREE_FORM_PREFIXES)


def suggest_key(key: str) -> str | None:
    """The known key closest to ``key``: a sibling first, then any key, then by the last part."""
    parent, _, leaf = key.rpartition(".")
    siblings = [k for k in KNOWN_KEYS if k.rpartition(".")[0] == parent]
    close = (difflib.get_close_matches(key, siblings, n=1, cutoff=0.6)
             or difflib.get_close_matches(key, sorted(KNOWN_KEYS), n=1, cutoff=0.6))
    if close:
        return close[0]
    leaves: dict[str, str] = {}
    for k in sorted(KNOWN_KEYS):
        leaves.setdefault(k.rpartition(".")[2], k)
    close = difflib.get_close_matches(leaf, list(leaves), n=1, cutoff=0.75)
    return leaves[close[0]] if close else None


def _unknown_key_message(key: str) -> str:
    close = suggest_key(key)
    return f"unknown key {key!r}" + (f" (did you mean {close!r}?)" if close else "")


def check_keys(config: Mapping[str, Any], path: str) -> None:
    """A ConfigError naming ``path``, the first unknown key and the closest known one."""
    unknown = [k for k in config if not is_known_key(k)]
    if not unknown:
        return
    more = f"; also unknown: {', '.join(map(repr, unknown[1:]))}" if len(unknown) > 1 else ""
    raise ConfigError(f"{path}: {_unknown_key_message(unknown[0])}{more}")


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mapping -> {"a.b.c": value}, as PaddleRec's load_yaml does."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _cast(key: str, raw: str, current: Any) -> Any:
    """Cast an override string to the type of the value it replaces."""
    if key == ITEM_COUNT and raw.strip().lower() == "auto":
        return "auto"
    if current is None:
        return yaml.safe_load(raw) if raw != "" else None
    if isinstance(current, bool):
        low = raw.strip().lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"override {key}={raw!r}: expected a boolean (True/False)")
    if isinstance(current, int):
        try:
            return int(raw)
        except ValueError:
            raise ConfigError(f"override {key}={raw!r}: expected an integer") from None
    if isinstance(current, float):
        try:
            return float(raw)
        except ValueError:
            raise ConfigError(f"override {key}={raw!r}: expected a number") from None
    if isinstance(current, list):
        value = yaml.safe_load(raw)
        if not isinstance(value, list):
            raise ConfigError(f"override {key}={raw!r}: expected a list like [1, 2]")
        return value
    return raw


def apply_overrides(config: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``key=value`` strings; a key unknown to KNOWN_KEYS is an error with a suggestion."""
    for item in overrides or ():
        item = item.strip()
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if key not in config:
            if not is_known_key(key):
                raise ConfigError(f"override of {_unknown_key_message(key)}")
            config[key] = yaml.safe_load(raw) if raw else None
            continue
        config[key] = _cast(key, raw, config[key])
    return config


def resolve_path(config: Mapping[str, Any], value: str | None) -> str | None:
    """A path from the config, absolute (relative ones are taken from the config's folder)."""
    if value is None or value == "":
        return value
    value = os.path.expanduser(str(value))
    if "://" in value or os.path.isabs(value):
        return value
    return os.path.normpath(os.path.join(config.get("config_abs_dir", "."), value))


def _read_yaml(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            tree = yaml.safe_load(f)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else path
        raise ConfigError(f"{where}: invalid YAML: {getattr(exc, 'problem', exc)}") from None
    if tree is None:
        tree = {}
    if not isinstance(tree, Mapping):
        raise ConfigError(f"{path}: expected a mapping with sections {', '.join(SECTIONS[:3])}")
    return flatten(tree)


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _expand_env(key: str, value: Any) -> Any:
    """``${VAR}`` in Milvus settings comes from the environment (tokens stay out of files)."""
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        if m.group(1) not in os.environ:
            raise ConfigError(f"{key} = {value!r} needs the environment variable {m.group(1)}")
        return os.environ[m.group(1)]

    return _ENV.sub(sub, value)


def _apply_profile(config: dict[str, Any], overrides: Iterable[str]) -> None:
    """``milvus.profile: configs/milvus_standalone.yaml`` supplies the ``milvus.*`` keys;
    the model config's own keys are the defaults and ``-o`` overrides still win."""
    name = config.get("milvus.profile")
    if not name:
        return
    candidates = [resolve_path(config, name), os.path.join(os.getcwd(), name),
                  os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), name)]
    path = next((c for c in candidates if c and os.path.isfile(c)), None)
    if path is None:
        raise ConfigError(f"milvus.profile {name!r} not found (looked in {candidates[:2]})")
    profile = _read_yaml(path)
    unknown = [k for k in profile if not k.startswith("milvus.")]
    if unknown:
        raise ConfigError(f"{path}: a Milvus profile holds only a 'milvus:' section, found {unknown}")
    check_keys(profile, path)
    # The profile defines the index entirely: drop the model config's index/search params.
    for key in [k for k in config if k.startswith(("milvus.index_params.", "milvus.search_params."))]:
        del config[key]
    config.update(profile)
    config["milvus.profile_path"] = path
    apply_overrides(config, [o for o in overrides if o.strip().startswith("milvus.")])


ITEM_COUNT = "hyper_parameters.item_count"


def data_meta_path(config: Mapping[str, Any]) -> str | None:
    """``meta.json`` beside the training folder, as ``prepare-data`` writes it."""
    train_dir = config.get("runner.train_data_dir")
    if not isinstance(train_dir, str) or not train_dir:
        return None
    return os.path.join(os.path.dirname(os.path.normpath(train_dir)), "meta.json")


def _resolve_item_count(config: dict[str, Any]) -> None:
    """``item_count`` absent or ``auto``: the prepared data's; a number that disagrees with the data
    is an error naming both (too large is silent in training and costs quality)."""
    value = config.get(ITEM_COUNT)
    if isinstance(value, str) and value.strip().isdigit():  # -o over a YAML "auto"
        value = config[ITEM_COUNT] = int(value)
    meta_path = data_meta_path(config)
    data_count = None
    if meta_path and os.path.isfile(meta_path):
        try:
            with open(meta_path, encoding="utf-8") as f:
                data_count = int(json.load(f)["item_count"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{meta_path}: no readable item_count ({exc})") from None
    if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
        if data_count is None and value is None:
            return  # the model says what it needs (DygraphModel.create_model)
        if data_count is None:
            raise ConfigError(f"{ITEM_COUNT} is auto, but {meta_path or 'runner.train_data_dir'} "
                              "is missing: set it to the largest item id + 1, or prepare the data "
                              "with `paddlerec-milvus prepare-data`")
        config[ITEM_COUNT] = data_count
    elif data_count is not None and value != data_count:
        raise ConfigError(f"{ITEM_COUNT} is {value!r} but the data has item_count {data_count} "
                          f"({meta_path}); set it to {data_count} or to auto")


HISTORY_BONUS = "recall.history_bonus"


def history_bonus_setting(config: Mapping[str, Any]) -> float | str:
    """``recall.history_bonus``: ``"auto"`` (chosen on the validation split per epoch) or a score
    bonus >= 0 for a user's own history items; absent = 0 (off)."""
    value = config.get(HISTORY_BONUS)
    if value is None:
        return 0.0
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        bonus = float(value) if not isinstance(value, bool) else float("nan")
    except (TypeError, ValueError):
        bonus = float("nan")
    if not bonus >= 0 or bonus == float("inf"):
        raise ConfigError(f"{HISTORY_BONUS} = {value!r}: expected auto or a finite number >= 0")
    return bonus


HISTORY_LEN = "recall.history_len"


def history_len_setting(config: Mapping[str, Any]) -> int | str | None:
    """``recall.history_len``: how many of a user's latest clicks the user tower reads at recall
    time; ``"auto"`` (chosen on the validation split for the chosen epoch), a number
    1..``hyper_parameters.maxlen``, or absent / 0 = all ``maxlen`` (None)."""
    value = config.get(HISTORY_LEN)
    if value is None:
        return None
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    maxlen = int(config.get("hyper_parameters.maxlen", 20) or 20)
    n = value if isinstance(value, int) and not isinstance(value, bool) else None
    if isinstance(value, str) and value.strip().isdigit():
        n = int(value.strip())
    if n is None or not 0 <= n <= maxlen:
        raise ConfigError(f"{HISTORY_LEN} = {value!r}: expected auto, 0 (all) or a whole number "
                          f"1..hyper_parameters.maxlen ({maxlen})")
    return n or None


def load_config(path: str, overrides: Iterable[str] | None = None) -> dict[str, Any]:
    """Load a YAML config as flat dotted keys, apply overrides, resolve relative paths."""
    config = _read_yaml(path)
    check_keys(config, path)
    config["config_abs_dir"] = os.path.dirname(os.path.abspath(path))
    config["config_path"] = os.path.abspath(path)
    overrides = list(overrides or ())
    apply_overrides(config, overrides)
    _apply_profile(config, overrides)
    for key in ("milvus.uri", "milvus.token"):
        config[key] = _expand_env(key, config.get(key))
    for key in PATH_KEYS:
        if isinstance(config.get(key), str):
            config[key] = resolve_path(config, config[key])
    _resolve_item_count(config)
    history_bonus_setting(config)
    history_len_setting(config)
    return config


def section(config: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """The flattened keys under ``prefix`` as a plain dict (``milvus.index_params`` -> {nlist: 1024})."""
    value = config.get(prefix)
    out = dict(value) if isinstance(value, Mapping) else {}
    out.update({k[len(prefix) + 1:]: v for k, v in config.items() if k.startswith(prefix + ".")})
    return out


def require(config: Mapping[str, Any], key: str, kind: type | tuple[type, ...] | None = None) -> Any:
    """A value that must be present (and of ``kind``), else a ConfigError naming the key."""
    if key not in config or config[key] is None:
        raise ConfigError(f"{config.get('config_path', 'config')}: missing required key {key!r}")
    value = config[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    wrong = kind is not None and (
        not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds)
    )
    if wrong:
        raise ConfigError(
            f"{config.get('config_path', 'config')}: key {key!r} = {value!r} has the wrong type"
        )
    return value
