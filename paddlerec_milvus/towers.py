"""The only way this package touches a model: the two tower hooks of its model directory's
``DygraphModel`` (docs/design.md, "Model hooks"). Evaluation, validation, export and serving go
through here, so a new model needs no change in the package.

- ``item_vectors(dy_model)``: float32 [item_count, D], row i for dense item id i (0 = padding);
- ``user_tower(dy_model)``: a ``paddle.nn.Layer`` mapping (hist_item [B, L], seq_len [B]) int64
  to [B, K, D] interests; evaluation runs it and export saves it with ``paddle.jit.save``.
"""

from __future__ import annotations

import numpy as np
import paddle

from .errors import ConfigError

HOOKS = ("item_vectors", "user_tower")


def _hook(dm, name: str):
    fn = getattr(dm, name, None)
    if not callable(fn):
        raise ConfigError(f"{type(dm).__module__}.DygraphModel has no {name}(dy_model) hook; a model "
                          f"directory must define {' and '.join(HOOKS)} (docs/design.md, 'Model hooks')")
    return fn


def item_table(dm, model) -> np.ndarray:
    """Every item's vector, row i for dense id i (row 0 is padding)."""
    table = np.asarray(_hook(dm, "item_vectors")(model), dtype=np.float32)
    if table.ndim != 2 or table.shape[0] < 2:
        raise ConfigError(f"{type(dm).__module__}.DygraphModel.item_vectors returned shape "
                          f"{list(table.shape)}; expected [item_count, dim]")
    return table


def indexed_items(dm, model) -> tuple[np.ndarray, np.ndarray]:
    """Dense ids 1..n and their vectors: what goes into an index (padding row 0 never does)."""
    table = item_table(dm, model)
    return np.arange(1, table.shape[0], dtype=np.int64), table[1:]


def user_tower(dm, model) -> paddle.nn.Layer:
    tower = _hook(dm, "user_tower")(model)
    if not isinstance(tower, paddle.nn.Layer):
        raise ConfigError(f"{type(dm).__module__}.DygraphModel.user_tower returned "
                          f"{type(tower).__name__}, not a paddle.nn.Layer")
    return tower


def user_interests(tower: paddle.nn.Layer, hist: np.ndarray, seq_len: np.ndarray) -> np.ndarray:
    """[B, K, D] interests of B padded histories, in inference mode."""
    tower.eval()
    with paddle.no_grad():
        out = tower(paddle.to_tensor(np.asarray(hist, dtype=np.int64)),
                    paddle.to_tensor(np.asarray(seq_len, dtype=np.int64).reshape(-1)))
    return out.numpy()


def interest_shape(tower: paddle.nn.Layer, maxlen: int) -> tuple[int, int]:
    """(K, D) of a tower, read off one padded history."""
    hist = np.zeros((1, maxlen), dtype=np.int64)
    hist[0, 0] = 1
    out = user_interests(tower, hist, np.ones(1, dtype=np.int64))
    if out.ndim != 3:
        raise ConfigError(f"the user tower returned shape {list(out.shape)}; expected [B, K, dim]")
    return int(out.shape[1]), int(out.shape[2])
