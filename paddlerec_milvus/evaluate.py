"""Offline evaluation (``infer.py``): checkpoint -> item vectors in Milvus -> each test
user's K interests -> Milvus search + merge -> Recall/NDCG/HitRate@N, printed and saved."""

from __future__ import annotations

import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import paddle
from tqdm import tqdm

from .checkpoint import checkpoint_dir, load_checkpoint
from .errors import ConfigError, MilvusIndexError
from .metrics import hitrate_at_n, ndcg_at_n, paddlerec_ndcg_at_n, recall_at_n
from .milvus_index import ItemIndex
from .model_dir import create_reader, data_files, load_dygraph_model
from .recall import ExactIndex, recall_top_k
from .runner import set_device
from .validation import best_epoch

logger = logging.getLogger(__name__)


@dataclass
class EvalResult:
    epoch: int
    top_n: int
    users: int
    seconds: float
    engine: str
    metrics: dict[str, float] = field(default_factory=dict)

    def format_line(self) -> str:
        parts = [f"{k} {v:.5f}" for k, v in self.metrics.items()]
        return (f"epoch {self.epoch}: " + "  ".join(parts)
                + f"  | users {self.users} | {self.seconds:.1f} s ({self.engine})")


def item_vectors(model) -> tuple[np.ndarray, np.ndarray]:
    """Dense ids 1..n and their embeddings (row 0 is padding and never indexed)."""
    table = model.item_emb.weight.numpy()
    return np.arange(1, table.shape[0], dtype=np.int64), table[1:]


def user_interests(dm, model, hist: np.ndarray, seq_len: np.ndarray, config) -> np.ndarray:
    with paddle.no_grad():
        interests, _ = dm.infer_forward(model, [], (hist, seq_len), config)
    return interests.numpy()


def score_users(recalled: list[list[int]], truths: list[list[int]], cutoffs: list[int],
                paddlerec_metrics: bool = False) -> dict[str, float]:
    """Average each metric over users, at each cutoff."""
    out: dict[str, float] = {}
    for n in cutoffs:
        fns = [("Recall", recall_at_n), ("NDCG", ndcg_at_n), ("HitRate", hitrate_at_n)]
        if paddlerec_metrics:
            fns.append(("PaddleRecNDCG", paddlerec_ndcg_at_n))
        for name, fn in fns:
            out[f"{name}@{n}"] = float(np.mean([fn(r, t, n) for r, t in zip(recalled, truths)])) \
                if truths else 0.0
    return out


def evaluate_checkpoint(config: dict[str, Any], dm, model, reader, index, top_n: int,
                        paddlerec_metrics: bool = False, progress: bool = True,
                        workers: int | None = None) -> tuple[dict[str, float], int]:
    """Recall every test user through ``index`` and score them; returns (metrics, users)."""
    t0 = time.perf_counter()
    ids, vecs = item_vectors(model)
    # Every vector changes between checkpoints: a fresh collection is faster to fill and to
    # search than one whose rows were all replaced, and holds nothing but this checkpoint's items.
    try:
        index.reset()
    except MilvusIndexError as exc:  # e.g. milvus.collection names an alias, which Milvus won't drop
        logger.warning("could not recreate %s (%s); overwriting its rows instead",
                       getattr(index, "collection", "the index"), exc)
    index.upsert(ids, vecs)
    index.prepare_bulk_search(len(reader) * int(config.get("hyper_parameters.capsual.max_k", 4)),
                              len(ids))
    t1 = time.perf_counter()
    model.eval()
    k = max(top_n, 20)
    truths: list[list[int]] = []
    batch_size = int(config.get("runner.infer_batch_size", 256) or 256)
    # Milvus: searches (and their merges) of earlier batches run in two worker threads while this
    # thread computes the next batch's interests, so Milvus's work overlaps with Paddle and Python.
    # Exact numpy search is CPU-bound here: one worker is faster (3.4 s against 3.9 s for the
    # amazon-book-1m validation users) and holds less memory.
    if workers is None:
        workers = 1 if isinstance(index, ExactIndex) else 2
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="recall") as pool:
        pending = []
        for _users, hist, seq_len, evals in tqdm(reader.iter_batches(batch_size),
                                                 total=-(-len(reader) // batch_size),
                                                 desc="recall", unit=" batch",
                                                 disable=None if progress else True):
            interests = user_interests(dm, model, hist, seq_len, config)
            pending.append(pool.submit(recall_top_k, index, interests, k))
            truths.extend(evals)
        recalled = [r.ids for f in pending for r in f.result()]
    t2 = time.perf_counter()
    cutoffs = sorted({top_n, 20} if top_n >= 20 else {top_n})[::-1]
    scores = score_users(recalled, truths, cutoffs, paddlerec_metrics)
    logger.log(logging.INFO if progress else logging.DEBUG,
               "%d items indexed in %.2f s; %d users recalled in %.2f s; scored in %.2f s",
               len(ids), t1 - t0, len(truths), t2 - t1, time.perf_counter() - t2)
    return scores, len(truths)


def most_popular(config: dict[str, Any], n: int) -> list[int]:
    """The baseline every model must beat: the n most clicked training items."""
    from collections import Counter

    counts: Counter[int] = Counter()
    for path in data_files(config, "runner.train_data_dir"):
        with open(path, encoding="utf-8") as f:
            counts.update(int(line.split(",")[1]) for line in f if line.strip())
    return [item for item, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n]]


def evaluate_popularity(config: dict[str, Any], top_n: int = 50) -> dict[str, float]:
    """Most-popular recall scored on the test users like a model."""
    reader = create_reader(config, "test")
    ranked = most_popular(config, max(top_n, 20))
    truths = [e for *_, evals in reader.iter_batches() for e in evals]
    cutoffs = sorted({top_n, 20} if top_n >= 20 else {top_n})[::-1]
    return score_users([ranked] * len(truths), truths, cutoffs)


def evaluate_epochs(config: dict[str, Any], top_n: int = 50, paddlerec_metrics: bool = False,
                    exact: bool = False, best: bool = False) -> list[EvalResult]:
    """Evaluate epochs ``infer_start_epoch`` .. ``infer_end_epoch - 1`` (``best``: only the epoch
    chosen on validation, from ``best.json``); write JSON per epoch."""
    load_path = config.get("runner.infer_load_path") or config.get("runner.model_save_path")
    if best:
        start = best_epoch(load_path)
        if start is None:
            raise ConfigError(f"--best: no {load_path}/best.json; train with runner.valid_data_dir set")
        end = start + 1
    else:
        start = int(config.get("runner.infer_start_epoch", 0))
        end = int(config.get("runner.infer_end_epoch", start + 1))
    set_device(config)
    paddle.seed(int(config.get("runner.seed", 12345)))
    dm = load_dygraph_model(config)
    model = dm.create_model(config)
    reader = create_reader(config, "test")
    dim = int(config.get("hyper_parameters.embedding_dim", 64))
    index = ExactIndex(dim) if exact else ItemIndex.from_config(config, dim)
    engine = "exact numpy" if exact else f"Milvus {index.uri} {index.index_type}"
    results = []
    try:
        for epoch in range(start, end):
            folder = checkpoint_dir(load_path, epoch)
            load_checkpoint(model, folder)
            t0 = time.perf_counter()
            metrics, users = evaluate_checkpoint(config, dm, model, reader, index, top_n,
                                                 paddlerec_metrics)
            res = EvalResult(epoch, top_n, users, time.perf_counter() - t0, engine, metrics)
            out = os.path.join(folder, f"metrics_top{top_n}{'_exact' if exact else ''}.json")
            with open(out, "w", encoding="utf-8") as f:
                json.dump(asdict(res), f, indent=2)
            logger.info("%s (saved %s)", res.format_line(), out)
            results.append(res)
    finally:
        index.close()
    return results
