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
from .checkpoint import BEST_FILE, checkpoint_dir, load_checkpoint
from .config import history_bonus_setting, history_len_setting
from .errors import ConfigError
from .model_dir import create_reader, data_files
from .recall import ExactIndex
from .scoring import choose_history_bonus, score_checkpoint, score_popularity

logger = logging.getLogger(__name__)
# ``recall.history_len: auto`` tries these (below maxlen) against the whole history, on the chosen
# epoch; a shorter one must beat it by HISTORY_LEN_MARGIN (relative) to be kept, so validation
# noise alone does not shorten it.
HISTORY_LEN_STEPS = (5, 8, 10, 12, 15, 20, 30, 50)
HISTORY_LEN_MARGIN = 0.01
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
    # recall.history_len: auto -> the latest clicks the tower reads, chosen for the best epoch
    # after training (0 = all maxlen), and the validation score of each length tried
    history_len: dict[int, int] = field(default_factory=dict)
    history_len_tried: dict[int, float] = field(default_factory=dict)
    history_len_bonus: dict[int, float] = field(default_factory=dict)  # bonus re-chosen with it


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

    def score(self, dm, model, history_len: int | None = None) -> float:
        """The epoch's validation score (at the history bonus it chooses, with ``auto``), the
        tower reading each user's latest ``history_len`` clicks (None: all maxlen)."""
        dim = int(self.config.get("hyper_parameters.embedding_dim", 64))
        setting = history_bonus_setting(self.config)
        self.chosen_bonus = None
        if setting == "auto":
            choice = choose_history_bonus(self.config, dm, model, self.reader, ExactIndex(dim),
                                          self.top_n, self.metric, history_len=history_len)
            self.chosen_bonus = choice.bonus
            logger.info("history bonus: %s by spreads of the top-%d scores -> %s", "  ".join(
                f"{step:g}: {v:.5f}" for step, v in choice.tried.items()), self.top_n,
                f"{choice.bonus:.4g}" if choice.bonus else "off")
            return choice.value
        metrics, _ = score_checkpoint(self.config, dm, model, self.reader, ExactIndex(dim),
                                      self.top_n, progress=False, history_bonus=float(setting),
                                      history_len=history_len)
        return metrics[self.metric]

    def choose_history_len(self, dm, model, save_path: str) -> int | None:
        """With ``recall.history_len: auto``, after training: load the best epoch and score it
        with each user's latest n clicks for n in ``HISTORY_LEN_STEPS`` below maxlen; keep the
        best n if it beats the whole history by the margin (the bonus re-chosen with it), and
        save ``best.json``. Tastes drift: on some logs the latest clicks say more than the whole
        history, whose older clicks blur the interests."""
        epoch = self.best.epoch
        if history_len_setting(self.config) != "auto" or epoch < 0:
            return None
        maxlen = int(self.config.get("hyper_parameters.maxlen", 20) or 20)
        load_checkpoint(model, checkpoint_dir(save_path, epoch))
        full = self.best.value
        tried, chosen, chosen_value, chosen_bonus = {maxlen: full}, None, full, None
        for n in (s for s in HISTORY_LEN_STEPS if s < maxlen):
            value = self.score(dm, model, history_len=n)
            tried[n] = value
            if value > full * (1 + HISTORY_LEN_MARGIN) and value > chosen_value:
                chosen, chosen_value, chosen_bonus = n, value, self.chosen_bonus
        self.best.history_len = {epoch: chosen or 0}
        self.best.history_len_tried = dict(sorted(tried.items()))
        self.best.history_len_bonus = {epoch: float(chosen_bonus)} if chosen and chosen_bonus is not None \
            else {}
        logger.info("history length (epoch %d): %s -> %s", epoch, "  ".join(
            f"{n}: {v:.5f}" for n, v in sorted(tried.items())),
            f"latest {chosen} clicks ({self.metric} {chosen_value:.5f})" if chosen else f"all {maxlen}")
        self.save(save_path)
        return chosen

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
