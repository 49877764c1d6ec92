"""Raw click logs -> PaddleRec's MIND data format, with the ComiRec protocol.

Input: ``user,item,timestamp`` lines (CSV, optionally gzipped, header optional, ids may be
any strings). Output folder::

    train/part-0.txt   uid,item_id,time            (training users, every click)
    valid/part-0.txt   user_id:U target_item:0 hist_item:.. eval_item:..
    test/part-0.txt    same, for test users
    item_map.tsv       item_id <tab> raw_id <tab> clicks   (dense ids 1..n, most clicked first)
    user_map.tsv       user_id <tab> raw_id
    meta.json          counts, split, seed, item_count for the config

Dense item ids are ranked by popularity so the log-uniform negative sampler matches the data.
The folder is written to a temporary sibling and renamed into place: a failure leaves nothing.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import shutil
import tempfile
from array import array
from dataclasses import asdict, dataclass

import numpy as np
from tqdm import tqdm

from .errors import DataError

logger = logging.getLogger(__name__)


@dataclass
class PrepareStats:
    lines_read: int
    bad_lines_skipped: int
    users: int
    items: int
    interactions: int
    train_users: int
    valid_users: int
    test_users: int
    train_interactions: int
    item_count: int  # largest dense item id + 1, for hyper_parameters.item_count
    seed: int
    min_user_clicks: int
    min_item_clicks: int
    split: list
    history_fraction: float


def _open_text(path: str):
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def read_clicks(path: str, sep: str = ",", skip_bad_lines: bool = False):
    """Stream a click log into compact arrays: user codes, item codes, timestamps."""
    if not os.path.isfile(path):
        raise DataError(f"input file not found: {path}")
    user_codes: dict[str, int] = {}
    item_codes: dict[str, int] = {}
    users, items, times = array("i"), array("i"), array("q")
    bad = 0
    line_no = 0
    try:
        with _open_text(path) as f:
            for line_no, line in enumerate(tqdm(f, desc="read", unit=" lines", mininterval=1.0,
                                                disable=None), 1):
                line = line.strip()
                if not line:
                    continue
                parts = [p.strip() for p in line.split(sep)]
                problem = None
                if len(parts) != 3:
                    problem = f"expected 3 fields user{sep}item{sep}timestamp, got {len(parts)}"
                elif not parts[0] or not parts[1]:
                    problem = "empty user or item id"
                else:
                    try:
                        ts = int(parts[2])
                    except ValueError:
                        if line_no == 1:  # a header line
                            continue
                        problem = f"timestamp {parts[2]!r} is not an integer"
                if problem:
                    if skip_bad_lines:
                        bad += 1
                        continue
                    raise DataError(f"{path}:{line_no}: {problem}: {line[:120]!r}"
                                    " (use --skip-bad-lines to skip such lines)")
                users.append(user_codes.setdefault(parts[0], len(user_codes)))
                items.append(item_codes.setdefault(parts[1], len(item_codes)))
                times.append(ts)
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}:{line_no + 1}: cannot read: {exc}") from None
    raw_users = np.array(list(user_codes), dtype=object)
    raw_items = np.array(list(item_codes), dtype=object)
    return (np.frombuffer(users, dtype=np.int32), np.frombuffer(items, dtype=np.int32),
            np.frombuffer(times, dtype=np.int64), raw_users, raw_items, line_no, bad)


def k_core(users: np.ndarray, items: np.ndarray, min_user: int, min_item: int) -> np.ndarray:
    """Mask of interactions kept after repeatedly dropping rare users and items."""
    keep = np.ones(len(users), dtype=bool)
    while True:
        u_counts = np.bincount(users[keep], minlength=users.max(initial=0) + 1)
        i_counts = np.bincount(items[keep], minlength=items.max(initial=0) + 1)
        new_keep = keep & (u_counts[users] >= min_user) & (i_counts[items] >= min_item)
        if new_keep.sum() == keep.sum():
            return new_keep
        keep = new_keep


def _slot_line(uid: int, hist: np.ndarray, evals: np.ndarray) -> str:
    return " ".join(
        [f"user_id:{uid}", "target_item:0"]
        + [f"hist_item:{i}" for i in hist]
        + [f"eval_item:{i}" for i in evals]
    ) + "\n"


def prepare_data(
    input_path: str,
    output_dir: str,
    seed: int = 2021,
    min_user_clicks: int = 5,
    min_item_clicks: int = 5,
    split: tuple[float, float, float] = (0.8, 0.1, 0.1),
    history_fraction: float = 0.8,
    sep: str = ",",
    skip_bad_lines: bool = False,
    overwrite: bool = False,
) -> PrepareStats:
    """Run the whole preparation and return its summary (also written to meta.json)."""
    if abs(sum(split) - 1.0) > 1e-6 or any(s < 0 for s in split):
        raise DataError(f"split {split} must be three non-negative fractions summing to 1")
    output_dir = os.path.abspath(output_dir)
    if os.path.exists(output_dir) and not overwrite:
        raise DataError(f"output folder exists: {output_dir} (pass --overwrite to replace it)")

    users, items, times, raw_users, raw_items, lines, bad = read_clicks(
        input_path, sep, skip_bad_lines)
    if len(users) == 0:
        raise DataError(f"{input_path}: no interactions read")
    keep = k_core(users, items, min_user_clicks, min_item_clicks)
    users, items, times = users[keep], items[keep], times[keep]
    if len(users) == 0:
        raise DataError(
            f"{input_path}: no interactions left after dropping users with < {min_user_clicks} "
            f"and items with < {min_item_clicks} clicks")

    # Dense item ids 1..n by popularity (ties: first seen first); 0 stays padding.
    item_counts = np.bincount(items, minlength=len(raw_items))
    present = np.flatnonzero(item_counts)
    ranked = present[np.lexsort((present, -item_counts[present]))]
    dense_item = np.zeros(len(raw_items), dtype=np.int64)
    dense_item[ranked] = np.arange(1, len(ranked) + 1)
    # Dense user ids 0..m-1 in order of first appearance.
    present_users = np.unique(users)
    dense_user = np.full(len(raw_users), -1, dtype=np.int64)
    dense_user[present_users] = np.arange(len(present_users))
    u, it, ts = dense_user[users], dense_item[items], times
    order = np.lexsort((ts, u))  # by user, then time; stable, so ties keep file order
    u, it, ts = u[order], it[order], ts[order]
    starts = np.flatnonzero(np.r_[True, u[1:] != u[:-1]])
    ends = np.r_[starts[1:], len(u)]

    n_users = len(present_users)
    perm = np.random.default_rng(seed).permutation(n_users)
    n_train = int(round(n_users * split[0]))
    n_valid = int(round(n_users * split[1]))
    role = np.zeros(n_users, dtype=np.int8)  # 0 train, 1 valid, 2 test
    role[perm[n_train:n_train + n_valid]] = 1
    role[perm[n_train + n_valid:]] = 2

    parent = os.path.dirname(output_dir) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(output_dir)}.tmp-", dir=parent)
    os.chmod(tmp, 0o755)
    try:
        for sub in ("train", "valid", "test"):
            os.makedirs(os.path.join(tmp, sub))
        files = [open(os.path.join(tmp, s, "part-0.txt"), "w", encoding="utf-8")
                 for s in ("train", "valid", "test")]
        train_clicks = 0
        try:
            for uid in tqdm(range(n_users), desc="write", unit=" users", mininterval=1.0,
                            disable=None):
                s, e = starts[uid], ends[uid]
                r = role[uid]
                if r == 0:
                    files[0].writelines(f"{uid},{i},{t}\n" for i, t in zip(it[s:e], ts[s:e]))
                    train_clicks += e - s
                else:
                    k = max(1, int((e - s) * history_fraction))
                    if k >= e - s:
                        k = e - s - 1
                    files[r].write(_slot_line(uid, it[s:s + k], it[s + k:e]))
        finally:
            for f in files:
                f.close()
        with open(os.path.join(tmp, "item_map.tsv"), "w", encoding="utf-8") as f:
            f.write("item_id\traw_id\tclicks\n")
            f.writelines(f"{d}\t{raw_items[c]}\t{item_counts[c]}\n"
                         for d, c in enumerate(ranked, 1))
        with open(os.path.join(tmp, "user_map.tsv"), "w", encoding="utf-8") as f:
            f.write("user_id\traw_id\n")
            f.writelines(f"{d}\t{raw_users[c]}\n" for d, c in enumerate(present_users))
        stats = PrepareStats(
            lines_read=lines, bad_lines_skipped=bad, users=n_users, items=len(ranked),
            interactions=len(u), train_users=int((role == 0).sum()),
            valid_users=int((role == 1).sum()), test_users=int((role == 2).sum()),
            train_interactions=int(train_clicks), item_count=len(ranked) + 1, seed=seed,
            min_user_clicks=min_user_clicks, min_item_clicks=min_item_clicks,
            split=list(split), history_fraction=history_fraction,
        )
        meta = dict(asdict(stats), input=os.path.basename(input_path), format="paddlerec-mind")
        with open(os.path.join(tmp, "meta.json"), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2, sort_keys=True)
            f.write("\n")
        if os.path.exists(output_dir):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(output_dir)}.old-", dir=parent)
            os.rename(output_dir, os.path.join(old, "data"))
            os.rename(tmp, output_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("prepared %s: %d users (%d/%d/%d), %d items, %d clicks; item_count=%d",
                output_dir, stats.users, stats.train_users, stats.valid_users,
                stats.test_users, stats.items, stats.interactions, stats.item_count)
    return stats
