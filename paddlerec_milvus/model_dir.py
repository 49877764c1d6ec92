"""Load a PaddleRec-style model directory: its DygraphModel and its readers.

The model directory is put on ``sys.path`` (as PaddleRec's tools do) so ``net.py``,
``dygraph_model.py`` and the readers import each other by plain module name.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from typing import Any

from .config import resolve_path
from .errors import ConfigError, DataError

logger = logging.getLogger(__name__)
_LOADED_DIR: str | None = None


def _use_model_dir(model_dir: str) -> None:
    """Make ``model_dir``'s modules importable. Every model directory names its modules alike
    (``net``, ``dygraph_model``, readers): a module of that name loaded from elsewhere (another
    model directory, a test) is dropped so the import finds this directory's file."""
    global _LOADED_DIR
    if _LOADED_DIR not in (None, model_dir) and _LOADED_DIR in sys.path:
        sys.path.remove(_LOADED_DIR)
    if model_dir in sys.path:
        sys.path.remove(model_dir)
    sys.path.insert(0, model_dir)
    own = {f[:-3] for f in os.listdir(model_dir) if f.endswith(".py")}
    for name in own & set(sys.modules):
        where = os.path.dirname(os.path.abspath(getattr(sys.modules[name], "__file__", "") or ""))
        if where != os.path.abspath(model_dir):
            del sys.modules[name]
    _LOADED_DIR = model_dir


def load_dygraph_model(config: dict[str, Any]):
    """An instance of the model directory's ``DygraphModel``."""
    model_dir = config["config_abs_dir"]
    if not os.path.isfile(os.path.join(model_dir, "dygraph_model.py")):
        raise ConfigError(f"{model_dir}: no dygraph_model.py (is -m pointing at a model dir's config?)")
    _use_model_dir(model_dir)
    module = importlib.import_module("dygraph_model")
    return module.DygraphModel()


def data_files(config: dict[str, Any], key: str) -> list[str]:
    """Sorted files of the data folder named by ``key`` (hidden files skipped)."""
    folder = resolve_path(config, config.get(key))
    if not folder:
        raise ConfigError(f"{config.get('config_path', 'config')}: missing {key}")
    if not os.path.isdir(folder):
        raise DataError(f"{key}: folder not found: {folder}")
    files = sorted(
        os.path.join(folder, f) for f in os.listdir(folder)
        if not f.startswith(".") and os.path.isfile(os.path.join(folder, f))
    )
    if not files:
        raise DataError(f"{key}: no data files in {folder}")
    return files


def create_reader(config: dict[str, Any], mode: str = "train", files: list[str] | None = None):
    """The model dir's ``RecDataset`` for ``train`` or ``test``; data errors become DataError."""
    _use_model_dir(config["config_abs_dir"])
    if mode == "train":
        reader_path = config.get("runner.train_reader_path", "mind_reader")
        files = files or data_files(config, "runner.train_data_dir")
    else:
        reader_path = config.get("runner.infer_reader_path", "mind_infer_reader")
        files = files or data_files(config, "runner.test_data_dir")
    module = importlib.import_module(reader_path)
    try:
        return module.RecDataset(files, config=config)
    except ValueError as exc:
        raise DataError(str(exc)) from None
