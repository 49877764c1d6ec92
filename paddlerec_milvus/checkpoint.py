"""Per-epoch checkpoints in PaddleRec's layout: ``{model_save_path}/{epoch}/rec.pdparams``, and
the epoch validation chose, ``{model_save_path}/best.json``."""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import paddle

from .config import history_bonus_setting, history_len_setting
from .errors import ConfigError

BEST_FILE = "best.json"  # written by validation.Validator.save


def save_checkpoint(model, optimizer, save_path: str, epoch: int, info: dict | None = None) -> str:
    """Write params (+ optimizer state) for ``epoch`` atomically; returns the folder.

    A folder that cannot be written (read-only, a file in the way, disk full) is a ConfigError
    naming it."""
    final = os.path.join(save_path, str(epoch))
    try:
        os.makedirs(save_path, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{epoch}.tmp-", dir=save_path)
    except OSError as exc:
        raise ConfigError(f"cannot write checkpoint to {final}: {_reason(exc)}") from None
    try:
        paddle.save(model.state_dict(), os.path.join(tmp, "rec.pdparams"))
        if optimizer is not None:
            paddle.save(optimizer.state_dict(), os.path.join(tmp, "rec.pdopt"))
        names = {k: p.name for k, p in model.named_parameters()}
        with open(os.path.join(tmp, "rec.json"), "w", encoding="utf-8") as f:
            json.dump(dict(info or {}, epoch=epoch, param_names=names), f, indent=2)
        if os.path.isdir(final):
            shutil.rmtree(final)
        os.chmod(tmp, 0o755)
        os.rename(tmp, final)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ConfigError(f"cannot write checkpoint to {final}: {_reason(exc)}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def ensure_writable(save_path: str) -> None:
    """Fail before training, not after the first epoch, when ``save_path`` cannot be written."""
    try:
        os.makedirs(save_path, exist_ok=True)
        os.rmdir(tempfile.mkdtemp(prefix=".probe-", dir=save_path))
    except OSError as exc:
        raise ConfigError(f"cannot write checkpoints to {save_path}: {_reason(exc)}") from None


def _reason(exc: BaseException) -> str:
    """A short cause: ``Permission denied``, ``Not a directory``, or the first line of the message."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__


def checkpoint_dir(path: str, epoch: int | None = None) -> str:
    """Resolve a checkpoint folder: ``path`` itself, or ``path/epoch``."""
    folder = path if epoch is None else os.path.join(path, str(epoch))
    if not os.path.isfile(os.path.join(folder, "rec.pdparams")):
        raise ConfigError(f"no checkpoint at {folder} (expected {folder}/rec.pdparams; train first)")
    return folder


def latest_epoch(save_path: str) -> int | None:
    """The highest epoch with a checkpoint under ``save_path``, or None."""
    if not os.path.isdir(save_path):
        return None
    epochs = [int(d) for d in os.listdir(save_path)
              if d.isdigit() and os.path.isfile(os.path.join(save_path, d, "rec.pdparams"))]
    return max(epochs) if epochs else None


def _load_state(path: str) -> dict:
    """``paddle.load`` of a state dict; a truncated or foreign file is a ConfigError, no trace."""
    try:
        state = paddle.load(path)
    except OSError as exc:
        raise ConfigError(f"checkpoint {path} cannot be read ({_reason(exc)})") from None
    except Exception as exc:  # noqa: BLE001 - paddle.load raises ValueError, EOFError, pickle errors...
        reason = _reason(exc)
        if "can not parse" in reason:
            reason = "paddle.load cannot parse it"
        elif isinstance(exc, EOFError):
            reason = "unexpected end of file"
        raise ConfigError(f"checkpoint {path} cannot be read ({reason}); it may be truncated: "
                          "re-train or pick another epoch") from None
    if not isinstance(state, dict):
        raise ConfigError(f"checkpoint {path} cannot be read (holds a {type(state).__name__}, not a "
                          "state dict); it may be truncated: re-train or pick another epoch")
    return state


def load_checkpoint(model, folder: str, optimizer=None) -> None:
    """Load params (and optimizer state when given and present); shape mismatches are clear."""
    folder = checkpoint_dir(folder)
    state = _load_state(os.path.join(folder, "rec.pdparams"))
    own = model.state_dict()
    for name, value in state.items():
        shape = getattr(value, "shape", None)
        if name in own and shape is not None and list(own[name].shape) != list(shape):
            raise ConfigError(
                f"checkpoint {folder}: {name} has shape {list(shape)}, the model expects "
                f"{list(own[name].shape)} (item_count / embedding_dim / maxlen / max_k differ?)"
            )
    model.set_state_dict(state)
    opt_path = os.path.join(folder, "rec.pdopt")
    if optimizer is not None and os.path.isfile(opt_path):
        optimizer.set_state_dict(_rename_optimizer_state(model, folder, _load_state(opt_path)))


def _rename_optimizer_state(model, folder: str, state: dict) -> dict:
    """Optimizer state is keyed by Paddle's generated parameter names (``embedding_0.w_0``),
    which differ between processes or models; map them through the structured names."""
    meta_path = os.path.join(folder, "rec.json")
    if not os.path.isfile(meta_path):
        return state
    with open(meta_path, encoding="utf-8") as f:
        saved = json.load(f).get("param_names", {})
    current = {k: p.name for k, p in model.named_parameters()}
    mapping = {old: current[k] for k, old in saved.items() if k in current and current[k] != old}
    if not mapping:
        return state
    renamed = {}
    for key, value in state.items():
        for old, new in mapping.items():
            if key.startswith(old + "_") or key == old:
                key = new + key[len(old):]
                break
        renamed[key] = value
    return renamed


def best_epoch(save_path: str) -> int | None:
    """The epoch recorded by validation under ``save_path``, or None."""
    path = os.path.join(save_path, BEST_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            epoch = int(json.load(f)["epoch"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path}: unreadable ({exc}); delete it or train again") from None
    return epoch if epoch >= 0 else None


def history_bonus_for(config: dict, save_path: str, epoch: int) -> float:
    """The history bonus to rank ``epoch``'s recall with: ``recall.history_bonus`` when it is a
    number, else (``auto``) the one validation chose for that epoch (``best.json``; re-chosen
    with the history length when ``recall.history_len: auto`` shortened it), else 0."""
    setting = history_bonus_setting(config)
    if setting != "auto":
        return float(setting)
    path = os.path.join(save_path, BEST_FILE)
    if not os.path.isfile(path):
        return 0.0
    try:
        with open(path, encoding="utf-8") as f:
            best = json.load(f)
        chosen = best.get("history_bonus") or {}
        with_len = best.get("history_len_bonus") or {} if history_len_setting(config) == "auto" else {}
        return float(with_len.get(str(epoch), chosen.get(str(epoch), 0.0)))
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        raise ConfigError(f"{path}: unreadable ({exc}); delete it or train again") from None


def history_len_for(config: dict, save_path: str, epoch: int) -> int | None:
    """How many latest clicks the tower reads for ``epoch``'s recall: ``recall.history_len`` when
    it is a number, else (``auto``) the one validation chose for that epoch (``best.json``), else
    None (all ``maxlen``)."""
    setting = history_len_setting(config)
    if setting != "auto":
        return setting
    path = os.path.join(save_path, BEST_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            chosen = json.load(f).get("history_len") or {}
        n = chosen.get(str(epoch))
        return int(n) if n else None
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        raise ConfigError(f"{path}: unreadable ({exc}); delete it or train again") from None
