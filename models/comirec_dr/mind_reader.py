"""Training samples for MIND from ``uid,item_id,time`` lines.

A sample is a user's target at a position k >= 4 of their time-ordered clicks, with the
<= maxlen items before it (left-aligned, zero-padded) and its true length. Users come from
successive seeded permutations and targets from one generator seeded once, so every epoch
covers the training users and sees new targets. ``iter_batches`` builds whole batches with
numpy (the fast path our runner uses); ``__iter__`` yields single samples for PaddleRec's
own DataLoader.
"""

import logging

import numpy as np
from multi_interest import make_sampler
from paddle.io import IterableDataset

logger = logging.getLogger(__name__)
MIN_HISTORY = 4


def read_click_files(file_list, item_count=None):
    """Parse ``uid,item_id,time`` files into three int64 arrays (file order kept)."""
    users, items, times = [], [], []
    for path in file_list:
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                parts = line.split(",")
                if len(parts) != 3:
                    raise ValueError(
                        f"{path}:{line_no}: expected 'uid,item_id,time', got {line[:80]!r}"
                    )
                try:
                    u, i, t = int(parts[0]), int(parts[1]), int(parts[2])
                except ValueError:
                    raise ValueError(
                        f"{path}:{line_no}: ids and time must be integers, got {line[:80]!r}"
                    ) from None
                if i <= 0 or (item_count is not None and i >= item_count):
                    raise ValueError(
                        f"{path}:{line_no}: item id {i} outside 1..{(item_count or 0) - 1} "
                        "(hyper_parameters.item_count must be the largest item id + 1)"
                    )
                users.append(u)
                items.append(i)
                times.append(t)
    return (np.asarray(users, dtype=np.int64), np.asarray(items, dtype=np.int64),
            np.asarray(times, dtype=np.int64))


class RecDataset(IterableDataset):
    def __init__(self, file_list, config):
        super().__init__()
        self.file_list = list(file_list)
        self.maxlen = config.get("hyper_parameters.maxlen", 20)
        self.batch_size = config.get("runner.train_batch_size", 128)
        self.batches_per_epoch = config.get("runner.batches_per_epoch", 1000)
        self.neg_samples = config.get("hyper_parameters.neg_samples", 1280)
        self.sampler = make_sampler(config, config.get("hyper_parameters.item_count", 2) - 1)
        self.seed = config.get("runner.seed", 12345)
        # Data parallel: rank r of w reads files r, r+w, ... (or every w-th user if few files).
        self.rank = config.get("runner.rank", 0)
        self.world = config.get("runner.world_size", 1)
        self.rng = np.random.default_rng([self.seed, self.rank])
        files = self.file_list
        if self.world > 1 and len(files) >= self.world:
            files = files[self.rank::self.world]
        users, items, times = read_click_files(
            files, config.get("hyper_parameters.item_count", None)
        )
        if self.world > 1 and len(self.file_list) < self.world:
            mine = users % self.world == self.rank
            users, items, times = users[mine], items[mine], times[mine]
        order = np.lexsort((times, users))  # by user, then time; stable on ties
        users, items = users[order], items[order]
        starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]]) if len(users) \
            else np.array([], np.int64)
        lengths = np.diff(np.r_[starts, len(users)])
        keep = lengths > MIN_HISTORY
        self.items = items
        self.user_ids = users[starts][keep]
        self.starts = starts[keep]
        self.lengths = lengths[keep]
        if len(self.starts) == 0:
            raise ValueError(
                f"no training user has more than {MIN_HISTORY} clicks in {self.file_list}"
            )
        self._perm = np.empty(0, dtype=np.int64)
        self._pos = 0
        logger.info("train reader: %d users, %d clicks, %d users skipped (<= %d clicks)",
                    len(self.starts), len(items), int((~keep).sum()), MIN_HISTORY)

    def set_epoch(self, epoch):
        """Restart the stream at a point fixed by (seed, epoch): resumed runs match."""
        self.rng = np.random.default_rng([self.seed, epoch, self.rank])
        self._perm = np.empty(0, dtype=np.int64)
        self._pos = 0

    @property
    def num_users(self):
        return len(self.starts)

    def _next_users(self, n):
        out = []
        while n > 0:
            if self._pos >= len(self._perm):
                self._perm = self.rng.permutation(len(self.starts))
                self._pos = 0
            take = self._perm[self._pos:self._pos + n]
            self._pos += len(take)
            n -= len(take)
            out.append(take)
        return np.concatenate(out)

    def sample_batch(self, n):
        """``n`` samples: hist [n, maxlen], target [n, 1], seq_len [n, 1] (int64)."""
        u = self._next_users(n)
        start, length = self.starts[u], self.lengths[u]
        k = self.rng.integers(MIN_HISTORY, length)  # target position, per user
        target = self.items[start + k]
        seq_len = np.minimum(k, self.maxlen)
        cols = np.arange(self.maxlen)
        idx = (start + k - seq_len)[:, None] + cols[None, :]
        valid = cols[None, :] < seq_len[:, None]
        hist = np.where(valid, self.items[np.where(valid, idx, 0)], 0)
        return hist.astype(np.int64), target[:, None], seq_len[:, None].astype(np.int64)

    def iter_batches(self, batch_size=None, with_negatives=True):
        """Whole batches; by default with shared negatives and their logit bias drawn here,
        vectorised, from the same seeded stream (so the graph has fewer ops to run)."""
        batch_size = batch_size or self.batch_size
        for _ in range(self.batches_per_epoch):
            hist, target, seq_len = self.sample_batch(batch_size)
            if not with_negatives:
                yield hist, target, seq_len
                continue
            negs = self.sampler.sample_numpy(self.rng, self.neg_samples)
            yield hist, target, seq_len, negs, self.sampler.logit_bias_numpy(target, negs)

    def __len__(self):
        return self.batches_per_epoch * self.batch_size

    def __iter__(self):
        for hist, target, seq_len in self.iter_batches(with_negatives=False):
            for i in range(len(hist)):
                yield [hist[i], target[i], seq_len[i]]
