"""Evaluation users from slot lines:
``user_id:U target_item:0 hist_item:I1 ... eval_item:J1 ...`` (PaddleRec's MIND format).

All eval items are kept. The history keeps its last maxlen items. ``iter_batches`` gives
(user ids, hist, seq_len, eval item lists) and counts every user; ``__iter__`` yields
PaddleRec-style samples (eval items padded with 0 to the longest list in the files).
"""

import logging

import numpy as np
from paddle.io import IterableDataset

logger = logging.getLogger(__name__)


def parse_slot_line(line, path="<input>", line_no=0):
    """One slot line -> (user_id, hist list, eval list)."""
    user, hist, evals = None, [], []
    for token in line.split():
        slot, sep, value = token.partition(":")
        if not sep:
            raise ValueError(f"{path}:{line_no}: token {token!r} is not 'slot:value'")
        if slot not in ("user_id", "target_item", "hist_item", "eval_item"):
            continue
        try:
            v = int(value)
        except ValueError:
            raise ValueError(f"{path}:{line_no}: {slot} value {value!r} is not an integer") from None
        if slot == "user_id":
            user = v
        elif slot in ("hist_item", "eval_item"):
            if v < 0:
                raise ValueError(f"{path}:{line_no}: negative {slot} {v}")
            (hist if slot == "hist_item" else evals).append(v)
    return user, hist, evals


class RecDataset(IterableDataset):
    def __init__(self, file_list, config):
        super().__init__()
        self.file_list = list(file_list)
        self.maxlen = config.get("hyper_parameters.maxlen", 20)
        self.batch_size = config.get("runner.infer_batch_size", 128)
        item_count = config.get("hyper_parameters.item_count", None)
        self.users, self.hists, self.evals = [], [], []
        skipped = 0
        for path in self.file_list:
            with open(path, encoding="utf-8") as f:
                for line_no, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    user, hist, evals = parse_slot_line(line, path, line_no)
                    if not hist:
                        raise ValueError(f"{path}:{line_no}: empty history (no hist_item)")
                    if item_count is not None:
                        bad = [i for i in hist + evals if i >= item_count]
                        if bad:
                            raise ValueError(
                                f"{path}:{line_no}: item id {bad[0]} >= hyper_parameters.item_count "
                                f"({item_count})"
                            )
                    evals = [i for i in evals if i != 0]
                    if not evals:
                        skipped += 1
                        continue
                    self.users.append(user if user is not None else len(self.users))
                    self.hists.append(hist[-self.maxlen:])
                    self.evals.append(evals)
        if skipped:
            logger.warning("infer reader: %d users without eval_item skipped", skipped)
        self.max_eval = max((len(e) for e in self.evals), default=1)

    def __len__(self):
        return len(self.users)

    def keep_first(self, n):
        """Keep the first n users (a cheaper validation every epoch)."""
        self.users, self.hists, self.evals = self.users[:n], self.hists[:n], self.evals[:n]
        self.max_eval = max((len(e) for e in self.evals), default=1)

    def _pad(self, rows):
        hist = np.zeros((len(rows), self.maxlen), dtype=np.int64)
        seq_len = np.zeros((len(rows),), dtype=np.int64)
        for r, h in enumerate(rows):
            hist[r, :len(h)] = h
            seq_len[r] = len(h)
        return hist, seq_len

    def iter_batches(self, batch_size=None):
        batch_size = batch_size or self.batch_size
        for s in range(0, len(self.users), batch_size):
            hist, seq_len = self._pad(self.hists[s:s + batch_size])
            yield self.users[s:s + batch_size], hist, seq_len, self.evals[s:s + batch_size]

    def __iter__(self):
        for users, hist, seq_len, evals in self.iter_batches():
            for i in range(len(users)):
                padded = np.zeros((1, self.max_eval), dtype=np.int64)
                padded[0, :len(evals[i])] = evals[i]
                yield [hist[i], seq_len[i:i + 1], padded]
