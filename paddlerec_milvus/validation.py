"""Validation after every epoch: the best epoch is recorded, and training stops early when
the validation metric has not improved for ``runner.early_stop_patience`` epochs.

The test split is never looked at while training; ``infer.py --best`` and ``export`` (without
``--epoch``) use the epoch recorded in ``{model_save_path}/best.json``.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from .atomic_file import write_atomically
from .checkpoint import BEST_FILE
from .config import history_bonus_setting
from .errors import ConfigError
from .model_dir import create_reader, data_files
from .recall import ExactIndex
from .scoring import choose_history_bonus, score_checkpoint, score_popularity

logger = logging.getLogger(__name__)
_METRIC = re.compile(r"^(Recall|NDCG|HitRate)@([1-9][0-9]*)$")


@dataclass
class BestEpoch:
    metric: str
    epoch: int = -1
    value: float = float("-inf")
    history: dict[int, float] = field(default_factory=dict)
    popular: float | None = None  # most-popular's score on the same users
    # recall.history_bonus: auto -> the bonus chosen per epoch (score units), read by infer/export
    history_bonus: dict[int, float] = field(default_factory=dict)


class Validator:
    """Scores a model on the validation users with exact search (no Milvus needed)."""

    chosen_bonus: float | None = None  # by the last score(), with recall.history_bonus auto

    def __init__(self, config: dict[str, Any]):
        self.config = config
        self.metric = str(config.get("runner.valid_metric") or "Recall@50")
        m = _METRIC.match(self.metric)
        if not m:
            raise ConfigError(f"runner.valid_metric {self.metric!r}: expected Recall@N, NDCG@N or "
                              "HitRate@N")
        self.top_n = int(m.group(2))
        self.patience = int(config.get("runner.early_stop_patience") or 0)
        if self.patience < 0:
            raise ConfigError(f"runner.early_stop_patience must be >= 0, got {self.patience}")
        files = data_files(config, "runner.valid_data_dir")
        self.reader = create_reader(config, "valid", files=files)
        limit = int(config.get("runner.valid_max_users") or 0)
        if limit > 0 and hasattr(self.reader, "keep_first"):
            self.reader.keep_first(limit)
        self.best = BestEpoch(self.metric)
        # the floor every checkpoint must clear: most-popular on the same validation users
        self.popular = score_popularity(config, self.top_n, reader=self.reader)[self.metric]
        self.stale = 0

    @staticmethod
    def enabled(config: dict[str, Any]) -> bool:
        return bool(config.get("runner.valid_data_dir"))

    def score(self, dm, model) -> float:
        """The epoch's validation score (at the history bonus it chooses, with ``auto``)."""
        dim = int(self.config.get("hyper_parameters.embedding_dim", 64))
        setting = history_bonus_setting(self.config)
        self.chosen_bonus = None
        if setting == "auto":
            choice = choose_history_bonus(self.config, dm, model, self.reader, ExactIndex(dim),
                                          self.top_n, self.metric)
            self.chosen_bonus = choice.bonus
            logger.info("history bonus: %s by spreads of the top-%d scores -> %s", "  ".join(
                f"{step:g}: {v:.5f}" for step, v in choice.tried.items()), self.top_n,
                f"{choice.bonus:.4g}" if choice.bonus else "off")
            return choice.value
        metrics, _ = score_checkpoint(self.config, dm, model, self.reader, ExactIndex(dim),
                                      self.top_n, progress=False, history_bonus=float(setting))
        return metrics[self.metric]

    def update(self, epoch: int, value: float) -> bool:
        """Record ``epoch``'s score; True when training should stop."""
        if self.chosen_bonus is not None:
            self.best.history_bonus[epoch] = float(self.chosen_bonus)
        self._record(epoch, value)
        logger.info("epoch %d: valid %s %.5f (best %.5f at epoch %d; most-popular %.5f)", epoch,
                    self.metric, value, self.best.value, self.best.epoch, self.popular)
        if value <= self.popular:
            logger.warning("epoch %d is no better than most-popular on validation (%s %.5f <= %.5f)",
                           epoch, self.metric, value, self.popular)
        if self.patience and self.stale >= self.patience:
            logger.info("early stop: no better valid %s for %d epochs; best epoch %d",
                        self.metric, self.stale, self.best.epoch)
            return True
        return False

    def resume(self, save_path: str, start_epoch: int) -> None:
        """Continue the record of an interrupted run: keep the scores of epochs before
        ``start_epoch`` from its ``best.json`` (same metric), so the best epoch and the patience
        count are those of an uninterrupted run."""
        path = os.path.join(save_path, BEST_FILE)
        if start_epoch <= 0 or not os.path.isfile(path):
            return
        try:
            with open(path, encoding="utf-8") as f:
                saved = json.load(f)
            history = {int(e): float(v) for e, v in saved["history"].items() if int(e) < start_epoch}
            bonus = {int(e): float(v) for e, v in (saved.get("history_bonus") or {}).items()
                     if int(e) < start_epoch}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ConfigError(f"{path}: unreadable ({exc}); delete it or train again") from None
        if saved.get("metric") != self.metric:
            logger.warning("%s scored %s, not %s; starting a new record", path, saved.get("metric"),
                           self.metric)
            return
        for epoch in sorted(history):
            self._record(epoch, history[epoch])
        self.best.history_bonus.update(bonus)

    def _record(self, epoch: int, value: float) -> None:
        self.best.history[epoch] = value
        if value > self.best.value:
            self.best.epoch, self.best.value, self.stale = epoch, value, 0
        else:
            self.stale += 1

    def save(self, save_path: str) -> str:
        """Write ``best.json`` atomically next to the epoch folders."""
        self.best.popular = self.popular
        os.makedirs(save_path, exist_ok=True)
        path = os.path.join(save_path, BEST_FILE)
        write_atomically(path, lambda f: json.dump(asdict(self.best), f, indent=2))
        return path
