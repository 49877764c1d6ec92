"""A reproducible click log with planted multi-interest structure, at catalogue sizes no shared
data set has (``~1M items, 5-10M clicks``), for the million-item benchmark.

Items fall into equal clusters (topics). A user holds 1-4 topics, drawn by topic popularity,
and clicks items of one of them at a time in short sessions (so the last clicks, held out for
evaluation, come from the same topics as the history); within a topic items are drawn by a mild
power law, and a few clicks are noise over the whole catalogue. The skews are mild on purpose:
every item must keep >= 5 clicks through prepare-data's 5-core filter for the catalogue to stay
near its nominal size.

    python -m benchmarks.synthetic_clicks OUT.csv [--items 1000000] [--users 250000]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import asdict, dataclass

import numpy as np
from tqdm import tqdm

logger = logging.getLogger("benchmarks.synthetic_clicks")


@dataclass
class ClickLogStats:
    path: str
    users: int
    items: int
    topics: int
    clicks: int
    items_under_5_clicks: int
    seconds: float


def simulate(items: int = 1_000_000, users: int = 250_000, topics: int = 20_000,
             mean_clicks: float = 40.0, noise: float = 0.05, seed: int = 0
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(user, item, timestamp) arrays, sorted by user then time."""
    rng = np.random.default_rng(seed)
    per_topic = items // topics
    items = per_topic * topics
    members = rng.permutation(items).reshape(topics, per_topic)  # topic t holds members[t]
    topic_p = (np.arange(topics) + 50.0) ** -0.3
    topic_p /= topic_p.sum()
    rank_cdf = np.cumsum((np.arange(per_topic) + 10.0) ** -0.3)
    rank_cdf /= rank_cdf[-1]

    n_interests = rng.integers(1, 5, size=users)  # 1..4 topics per user
    held = np.empty((users, 4), dtype=np.int64)  # 4 distinct topics by popularity (Gumbel top-k)
    log_p = np.log(topic_p)
    for s in range(0, users, 4096):
        keys = log_p - np.log(-np.log(rng.random((min(4096, users - s), topics))))
        held[s:s + 4096] = np.argpartition(-keys, 4, axis=1)[:, :4]
    lengths = 5 + rng.geometric(1.0 / (mean_clicks - 4.0), size=users)
    lengths = np.minimum(lengths, 400)
    total = int(lengths.sum())
    user = np.repeat(np.arange(users), lengths)
    pos = np.arange(total) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    # sessions of ~6 clicks on one topic: the topic index changes at session starts only
    session = pos // 6
    session_key = user.astype(np.int64) * 1024 + session
    starts = np.flatnonzero(np.r_[True, session_key[1:] != session_key[:-1]])
    per_session = rng.integers(0, 1 << 30, size=len(starts)) % n_interests[user[starts]]
    topic_idx = np.repeat(per_session, np.diff(np.r_[starts, total]))
    topic = held[user, topic_idx]
    rank = np.searchsorted(rank_cdf, rng.random(total))
    item = members[topic, rank]
    is_noise = rng.random(total) < noise
    item[is_noise] = rng.integers(0, items, size=int(is_noise.sum()))
    ts = 1_600_000_000 + pos * 60 + user % 3600
    return user, item, ts


def write_csv(path: str, user: np.ndarray, item: np.ndarray, ts: np.ndarray,
              chunk: int = 500_000) -> None:
    """``user,item,timestamp`` lines with a header, written to a temporary name, then renamed."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("user,item,timestamp\n")
        for s in tqdm(range(0, len(user), chunk), desc="write", unit=" chunk", disable=None):
            # raw item ids 1..n: serving reserves 0 for padding
            rows = np.stack([user[s:s + chunk], item[s:s + chunk] + 1, ts[s:s + chunk]], axis=1)
            f.write(("%d,%d,%d\n" * len(rows)) % tuple(rows.ravel().tolist()))
    os.replace(tmp, path)


def generate(path: str, items: int = 1_000_000, users: int = 250_000, topics: int = 20_000,
             mean_clicks: float = 40.0, seed: int = 0) -> ClickLogStats:
    t0 = time.perf_counter()
    user, item, ts = simulate(items, users, topics, mean_clicks, seed=seed)
    counts = np.bincount(item, minlength=items)
    write_csv(path, user, item, ts)
    stats = ClickLogStats(path, users, int((counts > 0).sum()), topics, len(user),
                          int((counts < 5).sum()), time.perf_counter() - t0)
    logger.info("%s", asdict(stats))
    return stats


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out")
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--users", type=int, default=250_000)
    p.add_argument("--topics", type=int, default=20_000)
    p.add_argument("--mean-clicks", type=float, default=40.0)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    print(json.dumps(asdict(generate(a.out, a.items, a.users, a.topics, a.mean_clicks, a.seed))))


if __name__ == "__main__":
    main()
