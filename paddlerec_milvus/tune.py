"""``paddlerec-milvus tune``: hyper-parameter search on the validation split with Optuna.

Each trial trains the model directory with sampled settings and is scored after every epoch on the
validation users (the same ``Validator`` as training); Optuna's median pruner stops trials that
fall behind. The test split is never read: trials run with ``runner.test_data_dir`` unset. The
study lives in ``{output}/study.db``, so a second run with the same output continues it. The
first trial is the config's own settings, so the result is never worse than the config on
validation. Writes ``{output}/best_config.yaml`` and ``{output}/tune_report.{json,md}``.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import yaml

from .atomic_file import write_atomically
from .errors import ConfigError

logger = logging.getLogger(__name__)

# What is searched, where the config has the key: (kind, low/choices, high).
SPACE: dict[str, tuple] = {
    "hyper_parameters.optimizer.learning_rate": ("log", 3e-4, 1e-2),
    "hyper_parameters.neg_samples": ("choice", [256, 640, 1280, 2560]),
    "runner.train_batch_size": ("choice", [64, 128, 256]),
    "hyper_parameters.capsual.max_k": ("choice", [2, 4, 6, 8]),
    "hyper_parameters.pow_p": ("choice", [0.5, 1.0, 2.0, 4.0]),
    "hyper_parameters.embedding_dropout": ("choice", [0.0, 0.1, 0.2, 0.3]),
}
_BUDGET = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*$")


def parse_budget(text: str) -> float:
    """``30m``, ``2h``, ``90s`` or ``90`` (seconds) -> seconds."""
    m = _BUDGET.match(str(text))
    if not m or float(m.group(1)) <= 0:
        raise ConfigError(f"--budget {text!r}: expected a positive duration like 30m, 2h or 90s")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


@dataclass
class TrialRecord:
    number: int
    state: str
    value: float | None
    params: dict[str, Any]
    epochs: int
    best_epoch: int | None
    seconds: float


@dataclass
class TuneReport:
    config: str
    metric: str
    budget_s: float
    best_value: float | None = None
    best_params: dict[str, Any] = field(default_factory=dict)
    best_trial: int | None = None
    best_checkpoints: str | None = None
    baseline_value: float | None = None  # trial 0: the config's own settings
    tuned_config: str | None = None  # beside the config: ``-m`` loads its model folder and data paths
    trials: list[TrialRecord] = field(default_factory=list)


def space_for(config: dict[str, Any]) -> dict[str, tuple]:
    """The searched keys the config has, each range widened to hold the config's own value
    (trial 0 runs it)."""
    space = {}
    for key, (kind, *args) in SPACE.items():
        if key not in config or config[key] is None:
            continue
        value = config[key]
        if kind == "log":
            space[key] = (kind, min(args[0], float(value)), max(args[1], float(value)))
        else:
            space[key] = (kind, sorted(set(args[0]) | {value}))
    return space


def _suggest(trial, key: str, spec: tuple):
    kind, *args = spec
    if kind == "log":
        return trial.suggest_float(key, args[0], args[1], log=True)
    return trial.suggest_categorical(key, args[0])


def _set_nested(tree: dict[str, Any], key: str, value: Any) -> None:
    node = tree
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value


HEADER = "# Written by paddlerec-milvus tune"


def tuned_config_path(config_path: str) -> str:
    """``models/mind/config_bigdata.yaml`` -> ``models/mind/config_bigdata_tuned.yaml``: beside the
    original, because trainer.py/infer.py load the model from the config's folder and resolve its
    relative data paths there."""
    stem, ext = os.path.splitext(config_path)
    return f"{stem}_tuned{ext or '.yaml'}"


def write_best_config(config_path: str, params: dict[str, Any], path: str) -> str:
    """The user's YAML with the best settings in place (comments are not kept). A file at
    ``path`` that tune did not write is never overwritten (ConfigError)."""
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            if not f.readline().startswith(HEADER):
                raise ConfigError(f"{path} exists and was not written by tune; move it away to let "
                                  "tune write the best config there")
    with open(config_path, encoding="utf-8") as f:
        tree = yaml.safe_load(f) or {}
    for key, value in params.items():
        _set_nested(tree, key, value)
    def write(f) -> None:
        f.write(f"{HEADER} from {config_path}: its settings with the best\n"
                "# trial's (chosen on the validation split).\n")
        yaml.safe_dump(tree, f, sort_keys=False)

    write_atomically(path, write)
    return path


def tune(config: dict[str, Any], budget_s: float, output: str, max_trials: int | None = None,
         overrides: list[str] | tuple[str, ...] = (), tuned_config: str | None = "") -> TuneReport:
    """Run (or continue) the study within ``budget_s`` seconds; returns its report. ``overrides``
    (the ``-o`` keys the trials ran with) go into ``best_config.yaml`` with the best settings, and
    into ``tuned_config`` ("": ``tuned_config_path`` of the config; None: not written)."""
    import optuna

    from .runner import train

    if not config.get("runner.valid_data_dir"):
        raise ConfigError("tune scores trials on the validation split: set runner.valid_data_dir")
    space = space_for(config)
    keys = list(space)
    if not keys:
        raise ConfigError(f"no tunable key in the config (tunes {', '.join(SPACE)})")
    os.makedirs(output, exist_ok=True)
    base = copy.deepcopy(config)
    base["runner.test_data_dir"] = None  # never read while tuning
    if not int(base.get("runner.early_stop_patience") or 0):
        base["runner.early_stop_patience"] = 2
    metric = str(base.get("runner.valid_metric") or "Recall@50")
    seed = int(base.get("runner.seed", 12345))
    study = optuna.create_study(
        study_name="tune", storage=f"sqlite:///{os.path.abspath(output)}/study.db",
        load_if_exists=True, direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=seed),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1))
    if not study.trials:
        study.enqueue_trial({k: config[k] for k in keys}, user_attrs={"baseline": True})
    trials_dir = os.path.join(output, "trials")

    def objective(trial) -> float:
        trial_config = copy.deepcopy(base)
        for key in keys:
            trial_config[key] = _suggest(trial, key, space[key])
        trial_config["runner.model_save_path"] = os.path.join(trials_dir, str(trial.number))
        t0 = time.perf_counter()

        def report(epoch: int, value: float) -> None:
            trial.report(value, epoch)
            trial.set_user_attr("epochs", epoch + 1)
            if trial.should_prune():
                raise optuna.TrialPruned()

        try:
            summary = train(trial_config, on_epoch=report)
        finally:
            trial.set_user_attr("seconds", time.perf_counter() - t0)
        trial.set_user_attr("best_epoch", summary.best_epoch)
        return max(e.valid for e in summary.epochs if e.valid is not None)

    def keep_only_best(study, trial) -> None:
        best = _best(study)
        for name in os.listdir(trials_dir) if os.path.isdir(trials_dir) else ():
            if best is None or name != str(best.number):
                shutil.rmtree(os.path.join(trials_dir, name), ignore_errors=True)

    logger.info("tuning %s on valid %s for %.0f s: %s", config.get("config_path"), metric, budget_s,
                ", ".join(keys))
    study.optimize(objective, n_trials=max_trials, timeout=budget_s, callbacks=[keep_only_best],
                   catch=(FloatingPointError,), show_progress_bar=False)
    over_keys = [o.split("=", 1)[0].strip() for o in overrides if "=" in o]
    fixed = {k: config.get(k) for k in over_keys if k not in ("config_abs_dir", "config_path")}
    return _report(study, config, metric, budget_s, output, fixed, tuned_config)


def _best(study):
    done = [t for t in study.trials if t.value is not None and t.state.name == "COMPLETE"]
    return max(done, key=lambda t: t.value) if done else None


def _report(study, config: dict[str, Any], metric: str, budget_s: float, output: str,
            fixed: dict[str, Any], tuned_config: str | None = None) -> TuneReport:
    rep = TuneReport(config=str(config.get("config_path")), metric=metric, budget_s=budget_s)
    for t in study.trials:
        value = t.value if t.value is not None else (max(t.intermediate_values.values())
                                                      if t.intermediate_values else None)
        rep.trials.append(TrialRecord(t.number, t.state.name, value, dict(t.params),
                                      int(t.user_attrs.get("epochs", 0)), t.user_attrs.get("best_epoch"),
                                      float(t.user_attrs.get("seconds", math.nan))))
        if t.user_attrs.get("baseline"):
            rep.baseline_value = value
    best = _best(study)
    if best is not None:
        rep.best_value, rep.best_params, rep.best_trial = best.value, dict(best.params), best.number
        rep.best_checkpoints = os.path.join(output, "trials", str(best.number))
        params = {**fixed, **rep.best_params}
        write_best_config(str(config["config_path"]), params, os.path.join(output, "best_config.yaml"))
        if tuned_config is not None:
            path = tuned_config or tuned_config_path(str(config["config_path"]))
            rep.tuned_config = write_best_config(str(config["config_path"]), params, path)
    with open(os.path.join(output, "tune_report.json"), "w", encoding="utf-8") as f:
        json.dump(asdict(rep), f, indent=2)
    with open(os.path.join(output, "tune_report.md"), "w", encoding="utf-8") as f:
        f.write(format_report(rep))
    return rep


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def format_report(rep: TuneReport) -> str:
    keys = sorted({k for t in rep.trials for k in t.params})
    lines = [f"# tune: {rep.config}", "",
             f"valid {rep.metric}; budget {rep.budget_s:.0f} s; best trial {rep.best_trial} "
             f"({rep.best_value if rep.best_value is None else f'{rep.best_value:.5f}'}) against the "
             f"config's own settings (trial 0) "
             f"{rep.baseline_value if rep.baseline_value is None else f'{rep.baseline_value:.5f}'}", "",
             "| trial | state | valid | epochs | seconds | " + " | ".join(k.rsplit('.', 1)[-1] for k in keys)
             + " |", "|---" * (5 + len(keys)) + "|"]
    for t in rep.trials:
        value = "-" if t.value is None else f"{t.value:.5f}"
        lines.append(f"| {t.number} | {t.state.lower()} | {value} | {t.epochs} | {t.seconds:.0f} | "
                     + " | ".join(_short(t.params.get(k, "-")) for k in keys) + " |")
    return "\n".join(lines) + "\n"
