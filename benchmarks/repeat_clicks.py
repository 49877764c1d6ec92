"""How much recall a user's own history holds: the share of eval items that are repeat clicks, and
Recall@50 when history items get a score bonus (the analysis behind ``recall.history_bonus``).

    python -m benchmarks.repeat_clicks yoochoose_clicks_100k RUN_DIR [--betas 0 1 2 4 inf]

RUN_DIR is a trainer run on the data set with validation (``RUN_DIR/ckpt/best.json``), e.g. one of
benchmarks.quality's tuned runs. Exact scores over every item; an item's score is its best inner
product over the user's interests, plus beta x the mean per-user standard deviation of those scores
when it is in the history (``inf``: history first). Prints validation and test Recall@50 per beta:
pick beta on validation.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

from paddlerec_milvus.checkpoint import checkpoint_dir, load_checkpoint
from paddlerec_milvus.config import load_config
from paddlerec_milvus.evaluate import model_for_evaluation
from paddlerec_milvus.metrics import recall_at_n
from paddlerec_milvus.model_dir import create_reader
from paddlerec_milvus.towers import indexed_items, user_interests, user_tower

from .quality import CONFIG, _overrides, prepared, tuned_recipe


def repeat_share(rows: list[tuple[np.ndarray, list[int], list[int]]]) -> float:
    """Mean over users of the share of their eval items found in their history."""
    return float(np.mean([sum(x in set(h) for x in e) / len(e) for _s, h, e in rows if e]))


def recall_with_bonus(rows, ids: np.ndarray, bonus: float, n: int = 50) -> float:
    """Recall@n (the evaluator's ``recall_at_n``) with history items' scores raised by ``bonus``."""
    pos = {int(i): j for j, i in enumerate(ids)}
    spread = float(np.mean([s.std() for s, _h, _e in rows]))
    recalls = []
    for scores, hist, evals in rows:
        s = scores.copy()
        if bonus and hist:
            s[[pos[x] for x in set(hist) if x in pos]] += 1e9 if np.isinf(bonus) else bonus * spread
        top = np.argpartition(-s, n)[:n]
        recalls.append(recall_at_n(ids[top[np.argsort(-s[top])]].tolist(), evals, n))
    return float(np.mean(recalls))


def user_rows(config: list[str], data: str, run_dir: str, epoch: int, splits: tuple[str, ...]):
    """The item ids and, per split, every user's (scores over all items, history, eval items)."""
    cfg = load_config(CONFIG, config)
    dm, model = model_for_evaluation(cfg)
    load_checkpoint(model, checkpoint_dir(os.path.join(run_dir, "ckpt"), epoch))
    ids, vecs = indexed_items(dm, model)
    tower = user_tower(dm, model)
    out = {}
    for split in splits:
        reader = create_reader(load_config(CONFIG, config + [f"runner.test_data_dir={data}/{split}"]), "test")
        rows = out[split] = []
        for _users, hist, seq_len, evals in reader.iter_batches(256):
            scores = np.einsum("bkd,nd->bkn", user_interests(tower, hist, seq_len), vecs).max(axis=1)
            for b, ev in enumerate(evals):
                if not len(ev):
                    continue
                n = int(np.ravel(seq_len[b])[0])
                rows.append((scores[b], [int(x) for x in hist[b][:n] if int(x) > 0], [int(x) for x in ev]))
    return ids, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dataset")
    p.add_argument("run_dir")
    p.add_argument("--betas", nargs="+", type=float, default=[0, 1, 2, 4, float("inf")])
    a = p.parse_args()
    data = prepared(a.dataset)
    over = _overrides(data, a.run_dir, validate=True) + tuned_recipe(a.dataset)
    with open(os.path.join(a.run_dir, "ckpt", "best.json")) as f:
        epoch = int(json.load(f)["epoch"])
    ids, by_split = user_rows(over, data, a.run_dir, epoch, ("valid", "test"))
    for split, rows in by_split.items():
        print(f"{a.dataset} {split}: {len(rows)} users, repeat share of eval items {repeat_share(rows):.3f}")
        for beta in a.betas:
            print(f"  beta {beta:g}: Recall@50 {recall_with_bonus(rows, ids, beta):.4f}", flush=True)


if __name__ == "__main__":
    main()
