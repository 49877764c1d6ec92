"""Per-epoch checkpoints in PaddleRec's layout: ``{model_save_path}/{epoch}/rec.pdparams``."""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import paddle

from .errors import ConfigError


def save_checkpoint(model, optimizer, save_path: str, epoch: int, info: dict | None = None) -> str:
    """Write params (+ optimizer state) for ``epoch`` atomically; returns the folder."""
    os.makedirs(save_path, exist_ok=True)
    final = os.path.join(save_path, str(epoch))
    tmp = tempfile.mkdtemp(prefix=f".{epoch}.tmp-", dir=save_path)
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
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


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


def load_checkpoint(model, folder: str, optimizer=None) -> None:
    """Load params (and optimizer state when given and present); shape mismatches are clear."""
    state = paddle.load(os.path.join(folder, "rec.pdparams"))
    own = model.state_dict()
    for name, value in state.items():
        if name in own and list(own[name].shape) != list(value.shape):
            raise ConfigError(
                f"checkpoint {folder}: {name} has shape {list(value.shape)}, the model expects "
                f"{list(own[name].shape)} (item_count / embedding_dim / maxlen / max_k differ?)"
            )
    model.set_state_dict(state)
    opt_path = os.path.join(folder, "rec.pdopt")
    if optimizer is not None and os.path.isfile(opt_path):
        optimizer.set_state_dict(_rename_optimizer_state(model, folder, paddle.load(opt_path)))


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
