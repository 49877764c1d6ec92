"""Offline evaluation (``infer.py``): checkpoint -> item vectors in Milvus -> each test
user's K interests -> Milvus search + merge -> Recall/NDCG/HitRate@N, printed and saved."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import paddle

from .checkpoint import best_epoch, checkpoint_dir, history_bonus_for, history_len_for, load_checkpoint
from .device import set_device
from .errors import ConfigError
from .milvus_index import SERVING_DESCRIPTION, ItemIndex
from .model_dir import create_reader, load_dygraph_model
from .recall import ExactIndex
from .scoring import score_checkpoint

logger = logging.getLogger(__name__)


@dataclass
class EvalResult:
    epoch: int
    top_n: int
    users: int
    seconds: float
    engine: str
    metrics: dict[str, float] = field(default_factory=dict)
    history_bonus: float = 0.0  # added to the scores of a user's own history items
    history_len: int | None = None  # latest clicks the tower read (None: all maxlen)

    def format_line(self) -> str:
        parts = [f"{k} {v:.5f}" for k, v in self.metrics.items()]
        bonus = f" | history bonus {self.history_bonus:.4g}" if self.history_bonus else ""
        if self.history_len:
            bonus += f" | latest {self.history_len} clicks"
        return (f"epoch {self.epoch}: " + "  ".join(parts)
                + f"  | users {self.users}{bonus} | {self.seconds:.1f} s ({self.engine})")


def check_evaluation_target(config: dict[str, Any], index: ItemIndex) -> None:
    """Evaluation drops and refills its collection with dense ids: refuse a name that serves
    users (an alias, the serving collection or one of its versions) instead of overwriting it."""
    name = index.collection
    if name == config.get("milvus.serving_collection"):
        raise ConfigError(f"milvus.collection {name!r} is milvus.serving_collection: evaluation "
                          "would overwrite it; name a collection of its own")
    target = index.alias_target(name)
    if target is not None:
        raise ConfigError(f"milvus.collection {name!r} is an alias of {target!r} at {index.uri}: "
                          "evaluation would overwrite what it serves; name a collection of its own")
    if index.stored_description() == SERVING_DESCRIPTION:
        raise ConfigError(f"milvus.collection {name!r} at {index.uri} holds an export's serving items: "
                          "evaluation would overwrite them; name a collection of its own")


def epochs_to_evaluate(config: dict[str, Any], best: bool) -> tuple[str, int, int]:
    """(checkpoint folder, first epoch, end epoch): the best by validation (``best``, from
    ``best.json``), else ``runner.infer_start_epoch`` .. ``infer_end_epoch``."""
    load_path = config.get("runner.infer_load_path") or config.get("runner.model_save_path")
    if best:
        start = best_epoch(load_path)
        if start is None:
            raise ConfigError(f"--best: no {load_path}/best.json; train with runner.valid_data_dir set")
        return load_path, start, start + 1
    start = int(config.get("runner.infer_start_epoch", 0))
    return load_path, start, int(config.get("runner.infer_end_epoch", start + 1))


def model_for_evaluation(config: dict[str, Any]):
    """(DygraphModel, its network) on the configured device, seeded; load a checkpoint into it."""
    set_device(config)
    paddle.seed(int(config.get("runner.seed", 12345)))
    dm = load_dygraph_model(config)
    return dm, dm.create_model(config)


def evaluate_epochs(config: dict[str, Any], top_n: int = 50, paddlerec_metrics: bool = False,
                    exact: bool = False, best: bool = False) -> list[EvalResult]:
    """Evaluate epochs ``infer_start_epoch`` .. ``infer_end_epoch - 1`` (``best``: only the epoch
    chosen on validation, from ``best.json``); write JSON per epoch."""
    load_path, start, end = epochs_to_evaluate(config, best)
    dm, model = model_for_evaluation(config)
    reader = create_reader(config, "test")
    dim = int(config.get("hyper_parameters.embedding_dim", 64))
    index = ExactIndex(dim) if exact else ItemIndex.from_config(config, dim)
    engine = "exact numpy" if exact else f"Milvus {index.uri} {index.index_type}"
    results = []
    try:
        if not exact:
            check_evaluation_target(config, index)
        for epoch in range(start, end):
            folder = checkpoint_dir(load_path, epoch)
            load_checkpoint(model, folder)
            t0 = time.perf_counter()
            bonus = history_bonus_for(config, load_path, epoch)
            length = history_len_for(config, load_path, epoch)
            metrics, users = score_checkpoint(config, dm, model, reader, index, top_n,
                                              paddlerec_metrics, history_bonus=bonus, history_len=length)
            res = EvalResult(epoch, top_n, users, time.perf_counter() - t0, engine, metrics, bonus,
                             length)
            out = os.path.join(folder, f"metrics_top{top_n}{'_exact' if exact else ''}.json")
            with open(out, "w", encoding="utf-8") as f:
                json.dump(asdict(res), f, indent=2)
            logger.info("%s (saved %s)", res.format_line(), out)
            results.append(res)
    finally:
        index.close()
    return results
