"""Export for serving: the user tower as a Paddle inference model, the item-id map, a
manifest, and the item vectors in Milvus keyed by the raw item ids users know.

On a Milvus server each export writes a new versioned collection and then points the
serving alias at it, so a running service switches models between two requests and never
sees a half-filled collection. Milvus Lite has no aliases (and one process per file): there
the serving collection is rewritten in place, with the service stopped.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict
from typing import Any

import numpy as np
import paddle

from .checkpoint import (
    best_epoch,
    checkpoint_dir,
    history_bonus_for,
    history_len_for,
    latest_epoch,
    load_checkpoint,
)
from .config import resolve_path
from .errors import ConfigError, DataError, MilvusIndexError
from .milvus_index import SERVING_DESCRIPTION, ItemIndex, is_local_uri
from .model_dir import load_dygraph_model
from .serving_contract import ITEM_MAP, ITEM_VECTORS, MANIFEST, Manifest
from .towers import indexed_items, interest_shape, user_interests, user_tower

logger = logging.getLogger(__name__)
MODEL_NAME = "user_tower"


def read_item_map(path: str | None, item_count: int) -> np.ndarray:
    """raw id per dense id (index 0 = padding). Without a map, raw ids are the dense ids."""
    raw = np.arange(item_count, dtype=np.int64)
    if not path or not os.path.isfile(path):
        return raw
    with open(path, encoding="utf-8") as f:
        header = f.readline()
        if not header.startswith("item_id"):
            raise DataError(f"{path}:1: expected header 'item_id<TAB>raw_id...'")
        for line_no, line in enumerate(f, 2):
            parts = line.rstrip("\n").split("\t")
            try:
                dense, raw_id = int(parts[0]), int(parts[1])
            except (ValueError, IndexError):
                raise DataError(f"{path}:{line_no}: raw item ids must be integers to key a Milvus "
                                f"INT64 collection, got {line.strip()[:80]!r}") from None
            if not 0 < dense < item_count:
                raise DataError(f"{path}:{line_no}: item id {dense} outside 1..{item_count - 1}")
            if raw_id <= 0:
                raise DataError(f"{path}:{line_no}: raw id {raw_id} must be > 0 (0 is padding)")
            raw[dense] = raw_id
    return raw


def default_item_map_path(config: dict[str, Any]) -> str | None:
    if config.get("runner.item_map_path"):
        return resolve_path(config, config["runner.item_map_path"])
    train_dir = config.get("runner.train_data_dir")
    return os.path.join(os.path.dirname(os.path.normpath(train_dir)), "item_map.tsv") if train_dir else None


def save_user_tower(tower: paddle.nn.Layer, maxlen: int, out_dir: str) -> tuple[str, str]:
    """``paddle.jit.save`` the user tower; returns (model file, params file) names."""
    spec = [paddle.static.InputSpec([None, maxlen], "int64", "hist_item"),
            paddle.static.InputSpec([None], "int64", "seq_len")]
    tower.eval()
    paddle.jit.save(paddle.jit.to_static(tower, input_spec=spec, full_graph=True),
                    os.path.join(out_dir, MODEL_NAME))
    for ext in (".json", ".pdmodel"):  # Paddle 3.x writes .json, 2.6 .pdmodel
        if os.path.isfile(os.path.join(out_dir, MODEL_NAME + ext)):
            return MODEL_NAME + ext, MODEL_NAME + ".pdiparams"
    raise RuntimeError(f"paddle.jit.save wrote no model file in {out_dir}")


def check_tower_parity(tower: paddle.nn.Layer, folder: str, model_file: str, params_file: str,
                       item_count: int, maxlen: int, use_gpu: bool = False, users: int = 64,
                       atol: float = 1e-3) -> float:
    """The saved tower, run as serving runs it (``UserTowerPredictor``), must give the dygraph
    model's interests: a predictor setting or graph pass that changes the numbers (Paddle 3.3's
    default oneDNN passes did, by up to 12) fails the export instead of serving wrong answers."""
    from .service import UserTowerPredictor  # paddle.inference: loaded only for the check

    rng = np.random.default_rng(0)
    seq_len = rng.integers(1, maxlen + 1, users).astype(np.int64)
    hist = rng.integers(1, max(2, item_count), (users, maxlen)).astype(np.int64)
    hist[np.arange(maxlen)[None, :] >= seq_len[:, None]] = 0  # padded as the readers pad
    want = user_interests(tower, hist, seq_len)
    probe = Manifest("parity", 0, want.shape[-1], want.shape[1], maxlen, item_count, 0, "", "", "",
                     model_file, params_file)
    got = UserTowerPredictor(folder, probe, use_gpu=use_gpu)(hist, seq_len)
    diff = float(np.abs(got - want).max())
    if got.shape != want.shape or diff > atol * max(1.0, float(np.abs(want).max())):
        raise ConfigError(f"the exported user tower disagrees with the trained model (max |diff| "
                          f"{diff:.4g}, shapes {list(got.shape)} vs {list(want.shape)}): the "
                          "inference predictor would serve wrong interests; export aborted")
    return diff


def export_model(config: dict[str, Any], output_dir: str, epoch: int | None = None,
                 collection: str | None = None) -> Manifest:
    """Write the serving folder and fill the serving collection; returns the manifest."""
    paddle.set_device("cpu")
    load_path = config.get("runner.infer_load_path") or config.get("runner.model_save_path")
    if epoch is None:
        epoch = best_epoch(load_path)
        if epoch is not None and not os.path.isdir(os.path.join(load_path, str(epoch))):
            epoch = None  # best.json of an older run whose checkpoints are gone
        if epoch is None:
            epoch = latest_epoch(load_path)
        if epoch is None:
            raise ConfigError(f"no checkpoint under {load_path}; train first")
    folder = checkpoint_dir(load_path, epoch)
    dm = load_dygraph_model(config)
    model = dm.create_model(config)
    load_checkpoint(model, folder)
    model.eval()
    maxlen = int(config.get("hyper_parameters.maxlen", 20))
    _, vectors = indexed_items(dm, model)
    item_count = len(vectors) + 1
    tower = user_tower(dm, model)
    max_k, dim = interest_shape(tower, maxlen)
    raw_ids = read_item_map(default_item_map_path(config), item_count)
    if len(np.unique(raw_ids[1:])) != item_count - 1:
        raise DataError("item map has duplicate raw ids")

    now = time.time()
    version = time.strftime("%Y%m%d%H%M%S", time.localtime(now)) + f"{int(now * 1000) % 1000:03d}_e{epoch}"
    # A collection of its own: the evaluation collection (dense ids) stays untouched.
    base = collection or str(config.get("milvus.serving_collection") or
                             f"{config.get('milvus.collection') or 'mind_items'}_serving")
    uri = str(config.get("milvus.uri") or "output_milvus/milvus.db")
    server = not is_local_uri(uri)
    physical = f"{base}_v{version}" if server else base

    output_dir = os.path.abspath(output_dir)
    parent = os.path.dirname(output_dir)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".export.tmp-", dir=parent)
    except OSError as exc:
        raise ConfigError(f"cannot write the export to {output_dir}: {exc.strerror or exc}") from None
    index = None
    switched = False
    previous: str | None = None
    try:
        with _sigterm_as_interrupt():
            model_file, params_file = save_user_tower(tower, maxlen, tmp)
            check_tower_parity(tower, tmp, model_file, params_file, item_count, maxlen, use_gpu=False)
            np.save(os.path.join(tmp, ITEM_VECTORS), vectors.astype(np.float32))  # row i = id i+1
            with open(os.path.join(tmp, ITEM_MAP), "w", encoding="utf-8") as f:
                f.write("item_id\traw_id\n")
                f.writelines(f"{d}\t{r}\n" for d, r in enumerate(raw_ids[1:].tolist(), 1))
            if not server:
                ItemIndex.from_config(config, dim, collection=base).drop()
            # on a server the collection is new: refill creates it (no empty one to create,
            # index and load first), and each of its calls may take milvus.write_timeout
            index = ItemIndex.from_config(
                config, dim, collection=physical, bulk_write=True, description=SERVING_DESCRIPTION,
                open_collection=not server)
            written = index.refill(raw_ids[1:], vectors)  # server: sealed, indexed, loaded
            if server:
                # count() is Strong: it returns once the server has applied every write, so searches
                # of other clients (Session consistency) see the whole version when the alias moves
                held = index.count()
                if held != written:
                    raise MilvusIndexError(f"{physical} holds {held} of {written} items; alias not switched")
                previous = index.point_alias(base)
                switched = True
            manifest = Manifest(version, epoch, dim, max_k, maxlen, item_count, written, uri, base,
                                physical, model_file, params_file,
                                history_bonus_for(config, load_path, epoch),
                                history_len_for(config, load_path, epoch) or 0)
            with open(os.path.join(tmp, MANIFEST), "w", encoding="utf-8") as f:
                json.dump(asdict(manifest), f, indent=2)
            os.chmod(tmp, 0o755)
            if os.path.isdir(output_dir):
                old = output_dir + f".old-{os.getpid()}"
                os.rename(output_dir, old)  # two renames: a service never sees a missing manifest
                try:  # for longer than between them
                    os.rename(tmp, output_dir)
                except BaseException:
                    os.rename(old, output_dir)
                    raise
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, output_dir)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if server and index is not None and switched:
            _switch_back(index, base, previous)  # the folder still holds the old version
            switched = False
        if server and index is not None and not switched:
            _drop_unserved(index, physical)
        if isinstance(exc, OSError) and not isinstance(exc, ConnectionError):
            raise ConfigError(f"cannot write the export to {output_dir}: {exc.strerror or exc}") from None
        raise
    finally:
        if index is not None:
            index.close()
    if manifest.history_len:
        logger.info("the user tower reads each user's latest %d clicks (recall.history_len)",
                    manifest.history_len)
    if manifest.history_bonus:
        logger.info("recall ranks a user's own history items %.4g higher (recall.history_bonus)",
                    manifest.history_bonus)
    logger.info("exported epoch %d as version %s to %s; %d items in %s (%s)", epoch, version,
                output_dir, written, physical, "alias " + base if server else "Milvus Lite")
    return manifest


def _drop_unserved(index: ItemIndex, physical: str) -> None:
    """An aborted export's collection serves nobody: drop it, or say it is left behind."""
    try:
        index.drop()
        logger.info("export aborted: dropped its unserved collection %s", physical)
    except MilvusIndexError as exc:
        logger.warning("export aborted: could not drop its collection %s (%s); the next export "
                       "prunes it", physical, exc)


def _switch_back(index: ItemIndex, alias: str, previous: str | None) -> None:
    """The alias moved but the export folder did not: point it back where the folder serves."""
    try:
        index.set_alias(alias, previous)
        logger.info("export aborted: alias %s points at %s again", alias, previous)
    except MilvusIndexError as exc:
        logger.warning("export aborted after moving alias %s; could not move it back (%s)", alias, exc)


class _sigterm_as_interrupt:
    """SIGTERM during an export raises KeyboardInterrupt, so the cleanup above runs (no temp
    folder or half-filled collection is left behind), as it does for Ctrl-C."""

    def __enter__(self) -> None:
        import signal
        import threading

        self._previous = None
        if threading.current_thread() is threading.main_thread():
            def handler(signum: int, frame: Any) -> None:
                raise KeyboardInterrupt("SIGTERM")

            self._previous = signal.signal(signal.SIGTERM, handler)

    def __exit__(self, *exc: object) -> None:
        import signal

        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
