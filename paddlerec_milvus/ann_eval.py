"""What an approximate index costs end to end (``infer.py --ann-builds N``): the test users'
Recall/HitRate@N through the configured Milvus index, over several builds, beside exact search
of the very same interest vectors, with each engine's search cost per user.

Neighbour overlap on synthetic queries is no guide: trained item vectors are not random, and a
user's merged top-N forgives misses in one interest that another interest finds (amazon-book-1m,
HNSW: each interest keeps 92-97% of its exact top-50 while the merged Recall@50 loses < 1%).
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .checkpoint import checkpoint_dir, history_len_for, load_checkpoint
from .errors import ConfigError
from .evaluate import check_evaluation_target, epochs_to_evaluate, model_for_evaluation
from .milvus_index import ItemIndex
from .model_dir import create_reader
from .recall import ExactIndex, merge_interest_hits
from .scoring import cutoffs_for, interests_of, score_users
from .towers import indexed_items, user_tower

logger = logging.getLogger(__name__)


@dataclass
class EngineRun:
    """One engine's pass over every test user."""

    label: str
    metrics: dict[str, float]
    build_s: float  # fill + flush + index build + load (0 for numpy)
    search_s: float  # the searches alone, one client thread, batches of infer_batch_size users
    search_ms_per_user: float  # median over its timed passes
    interest_overlap: float  # mean share of an interest's exact top-k that this engine returned
    # a build's timed passes, and FLAT's passes taken in turn with them (same minutes, same load)
    pass_ms_per_user: list[float] = field(default_factory=list)
    flat_pass_ms_per_user: list[float] = field(default_factory=list)

    @property
    def speedup_vs_flat(self) -> float | None:
        """Median FLAT pass / median pass of this build, both from the same alternating turns."""
        if not self.flat_pass_ms_per_user or not self.pass_ms_per_user:
            return None
        return statistics.median(self.flat_pass_ms_per_user) / max(statistics.median(self.pass_ms_per_user),
                                                                    1e-9)


@dataclass
class AnnReport:
    epoch: int
    users: int
    top_n: int
    uri: str
    index_type: str
    index_params: dict[str, Any]
    search_params: dict[str, Any]
    exact: EngineRun
    flat: EngineRun | None
    builds: list[EngineRun] = field(default_factory=list)

    def rel_losses(self, metric: str | None = None) -> list[float]:
        """1 - ANN/exact of ``metric`` (Recall@top_n) for each build."""
        metric = metric or f"Recall@{self.top_n}"
        ref = self.exact.metrics[metric]
        return [1.0 - b.metrics[metric] / ref if ref else 0.0 for b in self.builds]

    def summary(self) -> dict[str, float]:
        n = self.top_n
        losses = self.rel_losses()
        ann_ms = statistics.mean(b.search_ms_per_user for b in self.builds)
        out = {
            f"exact_recall{n}": self.exact.metrics[f"Recall@{n}"],
            f"ann_recall{n}_mean": statistics.mean(b.metrics[f"Recall@{n}"] for b in self.builds),
            f"ann_recall{n}_rel_loss": statistics.mean(losses),
            f"ann_recall{n}_rel_loss_min": min(losses),
            f"ann_recall{n}_rel_loss_max": max(losses),
            f"ann_hitrate{n}_rel_loss": statistics.mean(self.rel_losses(f"HitRate@{n}")),
            "ann_interest_overlap": statistics.mean(b.interest_overlap for b in self.builds),
            "ann_search_ms_per_user": ann_ms,
            "ann_build_s": statistics.mean(b.build_s for b in self.builds),
        }
        if self.flat is not None:  # then every build was timed in turns with FLAT
            paired = [b.speedup_vs_flat for b in self.builds]
            out["flat_search_ms_per_user"] = statistics.median(
                ms for b in self.builds for ms in b.flat_pass_ms_per_user)
            # each build against FLAT in the same turns: a shared machine's drift between a FLAT
            # pass and a build's pass minutes later moved the old single-pass ratio by +-30%
            out["ann_speedup_vs_flat"] = statistics.mean(paired)
            out["ann_speedup_vs_flat_min"] = min(paired)
            out["ann_speedup_vs_flat_max"] = max(paired)
        return out

    def format(self) -> str:
        n = self.top_n
        head = (f"epoch {self.epoch}, {self.users} test users, {self.index_type} "
                f"{self.index_params} search {self.search_params} at {self.uri}")
        rows = [f"{'engine':<16} {'Recall@' + str(n):>10} {'HitRate@' + str(n):>11} {'vs exact':>9} "
                f"{'overlap':>8} {'ms/user':>8} {'build s':>8}"]
        ref = self.exact.metrics[f"Recall@{n}"]
        for run in [self.exact, *([self.flat] if self.flat else []), *self.builds]:
            r = run.metrics[f"Recall@{n}"]
            rows.append(f"{run.label:<16} {r:>10.5f} {run.metrics[f'HitRate@{n}']:>11.5f} "
                        f"{(r / ref - 1) * 100 if ref else 0.0:>+8.2f}% {run.interest_overlap:>8.3f} "
                        f"{run.search_ms_per_user:>8.3f} {run.build_s:>8.1f}")
        s = self.summary()
        tail = (f"mean Recall@{n} loss {s[f'ann_recall{n}_rel_loss'] * 100:.2f}% over {len(self.builds)} "
                f"builds (min {s[f'ann_recall{n}_rel_loss_min'] * 100:.2f}%, max "
                f"{s[f'ann_recall{n}_rel_loss_max'] * 100:.2f}%)")
        if "ann_speedup_vs_flat" in s:
            tail += f"; search {s['ann_speedup_vs_flat']:.2f}x cheaper per user than FLAT"
            if "ann_speedup_vs_flat_min" in s:
                lo, hi = s["ann_speedup_vs_flat_min"], s["ann_speedup_vs_flat_max"]
                tail += f" (builds {lo:.2f}x..{hi:.2f}x, each timed in alternating turns with FLAT)"
        return "\n".join([head, *rows, tail])


def _search_all(index, interests: np.ndarray, limit: int, batch_users: int
                ) -> tuple[np.ndarray, np.ndarray, float]:
    """Every user's K interests searched in batches of ``batch_users`` users, one thread: the
    per-interest (ids, scores) [U * K, limit] and the seconds spent in the searches alone."""
    users, k, dim = interests.shape
    queries = interests.reshape(users * k, dim)
    ids = np.full((users * k, limit), -1, dtype=np.int64)
    scores = np.full((users * k, limit), -np.inf, dtype=np.float32)
    spent = 0.0
    for s in range(0, len(queries), batch_users * k):
        t0 = time.perf_counter()
        got_ids, got_scores = index.search_vectors(queries[s:s + batch_users * k], limit)
        spent += time.perf_counter() - t0
        ids[s:s + len(got_ids)], scores[s:s + len(got_ids)] = got_ids, got_scores
    return ids, scores, spent


def _recall_all(index, interests: np.ndarray, limit: int, top_k: int, batch_users: int
                ) -> tuple[list[list[int]], np.ndarray, float]:
    """``_search_all``, then each user's interests merged as the serving core merges them: (each
    user's merged top_k ids, the raw per-interest ids [U * K, limit], the search seconds)."""
    users = interests.shape[0]
    ids, scores, spent = _search_all(index, interests, limit, batch_users)
    per_ids, per_scores = ids.reshape(users, -1), scores.reshape(users, -1)
    recalled = [merge_interest_hits(per_ids[u], per_scores[u], top_k).ids for u in range(users)]
    return recalled, ids, spent


def _overlap(ids: np.ndarray, exact_ids: np.ndarray) -> float:
    """Mean over queries of |engine's ids ∩ exact ids| / |exact ids|."""
    shares = []
    for a, b in zip(ids, exact_ids):
        b = b[b > 0]
        if len(b):
            shares.append(len(np.intersect1d(a[a > 0], b, assume_unique=True)) / len(b))
    return float(np.mean(shares)) if shares else 1.0


def evaluate_ann(config: dict[str, Any], builds: int = 3, top_n: int = 50, best: bool = False,
                 flat: bool = True, timing_rounds: int = 3) -> AnnReport:
    """Score one checkpoint through the configured Milvus index ``builds`` times (each a fresh
    collection, built and loaded), through numpy exact search, and (``flat``, when the profile's
    index is not FLAT) through a FLAT collection on the same Milvus for the cost baseline. Every
    engine searches the same interest vectors. Each build's search cost is timed in
    ``timing_rounds`` turns alternating with FLAT's (ABBA), so its ratio to FLAT compares passes
    of the same minutes. Writes ``ann_top{N}_{index}.json`` beside the checkpoint."""
    if builds < 1:
        raise ConfigError(f"--ann-builds {builds}: build the index at least once")
    if timing_rounds < 1:
        raise ConfigError(f"timing_rounds {timing_rounds}: time each build at least once")
    load_path, epoch, _ = epochs_to_evaluate(config, best)
    dm, model = model_for_evaluation(config)
    folder = checkpoint_dir(load_path, epoch)
    load_checkpoint(model, folder)
    reader = create_reader(config, "test")
    batch_users = int(config.get("runner.infer_batch_size", 256) or 256)
    ids, vecs = indexed_items(dm, model)
    batches, truths = interests_of(user_tower(dm, model), reader, batch_users,
                                   history_len=history_len_for(config, load_path, epoch))
    interests = np.concatenate(batches).astype(np.float32)
    dim = interests.shape[2]
    limit = max(top_n, 20)
    cutoffs = cutoffs_for(top_n)

    def run(label: str, index, exact_ids: np.ndarray | None) -> tuple[EngineRun, np.ndarray]:
        t0 = time.perf_counter()
        index.refill(ids, vecs, progress=False)
        build_s = time.perf_counter() - t0 if not isinstance(index, ExactIndex) else 0.0
        recalled, raw, spent = _recall_all(index, interests, limit, limit, batch_users)
        metrics = score_users(recalled, truths, cutoffs)
        overlap = 1.0 if exact_ids is None else _overlap(raw, exact_ids)
        res = EngineRun(label, metrics, build_s, spent, spent / len(truths) * 1e3, overlap,
                        [spent / len(truths) * 1e3])
        logger.info("%s: Recall@%d %.5f, %.3f ms/user search, %.1f s build, interest overlap %.3f",
                    label, top_n, metrics[f"Recall@{top_n}"], res.search_ms_per_user, build_s, overlap)
        return res, raw

    exact, exact_ids = run("exact (numpy)", ExactIndex(dim), None)
    ann = ItemIndex.from_config(config, dim)
    report = AnnReport(epoch, len(truths), top_n, ann.uri, ann.index_type, ann.index_params,
                       ann.search_params, exact, None)

    def ms_per_user(index) -> float:
        return _search_all(index, interests, limit, batch_users)[2] / len(truths) * 1e3

    ref = None
    try:
        check_evaluation_target(config, ann)
        if flat and ann.index_type != "FLAT":
            ref = ItemIndex.from_config(config, dim, collection=f"{ann.collection}_flat",
                                        index_type="FLAT", index_params={}, search_params={})
            check_evaluation_target(config, ref)
            report.flat, _ = run("FLAT (Milvus)", ref, exact_ids)
        for b in range(builds):
            build = run(f"{ann.index_type} build {b + 1}", ann, exact_ids)[0]
            if ref is not None:
                build.pass_ms_per_user = []
                for r in range(timing_rounds):  # ABBA turns: FLAT, build, build, FLAT, ...
                    turns = [(ref, build.flat_pass_ms_per_user), (ann, build.pass_ms_per_user)]
                    for index, passes in (turns if r % 2 == 0 else turns[::-1]):
                        passes.append(ms_per_user(index))
                build.search_ms_per_user = statistics.median(build.pass_ms_per_user)
                logger.info("%s: %.3f ms/user against FLAT's %.3f in the same turns (%.2fx)", build.label,
                            build.search_ms_per_user, statistics.median(build.flat_pass_ms_per_user),
                            build.speedup_vs_flat)
            report.builds.append(build)
        if ref is not None:
            ref.drop()
    finally:
        ann.close()
        if ref is not None:
            ref.close()
    out = os.path.join(folder, f"ann_top{top_n}_{report.index_type.lower()}.json")
    with open(out, "w", encoding="utf-8") as f:
        json.dump({**asdict(report), "summary": report.summary()}, f, indent=2)
    logger.info("saved %s", out)
    return report
