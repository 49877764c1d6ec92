"""The online recall service core: raw item ids in, raw item ids out.

Loads an exported folder (inference model, item map, manifest) and the serving collection,
validates requests, runs the user tower with ``paddle.inference`` and hands the K interest
vectors to the same recall core as offline evaluation. The Paddle Serving Ops and the REST
API both call ``RecallService``; neither knows about Paddle or Milvus details.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import RequestError
from .export import Manifest
from .milvus_index import MAX_TOP_K, ItemIndex, is_local_uri
from .recall import UserRecall, recall_top_k

logger = logging.getLogger(__name__)


@dataclass
class RecallAnswer:
    items: list[list[int]]
    scores: list[list[float]]
    notes: list[str] = field(default_factory=list)


class UserTowerPredictor:
    """``paddle.inference`` predictor for the exported user tower; one clone per thread."""

    def __init__(self, export_dir: str, manifest: Manifest, use_gpu: bool = False):
        import paddle.inference as pi

        cfg = pi.Config(os.path.join(export_dir, manifest.model_file),
                        os.path.join(export_dir, manifest.params_file))
        if use_gpu:
            cfg.enable_use_gpu(256, 0)
        else:
            cfg.disable_gpu()
            cfg.set_cpu_math_library_num_threads(1)
        cfg.disable_glog_info()
        self._main = pi.create_predictor(cfg)
        self._lock = threading.Lock()
        self._local = threading.local()

    def _predictor(self):
        pred = getattr(self._local, "pred", None)
        if pred is None:
            with self._lock:
                pred = self._main.clone()
            self._local.pred = pred
        return pred

    def __call__(self, hist: np.ndarray, seq_len: np.ndarray) -> np.ndarray:
        pred = self._predictor()
        names = pred.get_input_names()
        feeds = {"hist_item": hist.astype(np.int64), "seq_len": seq_len.astype(np.int64)}
        for name in names:
            handle = pred.get_input_handle(name)
            handle.reshape(feeds[name].shape)
            handle.copy_from_cpu(feeds[name])
        pred.run()
        return pred.get_output_handle(pred.get_output_names()[0]).copy_to_cpu()


class RecallService:
    """Validate histories, compute interests, search Milvus, merge: one call per request."""

    def __init__(self, export_dir: str, milvus_uri: str | None = None, collection: str | None = None,
                 token: str = "", max_users: int = 256, max_top_k: int = 1000,
                 default_top_k: int = 50, use_gpu: bool = False,
                 index_kwargs: dict[str, Any] | None = None):
        self.export_dir = os.path.abspath(export_dir)
        self.manifest = Manifest.load(self.export_dir)
        self.max_users, self.default_top_k = max_users, default_top_k
        self.max_top_k = min(max_top_k, MAX_TOP_K)
        self.maxlen = self.manifest.maxlen
        self.raw_ids = self._read_item_map()
        self.dense_of = {int(r): d for d, r in enumerate(self.raw_ids) if d > 0}
        self.predictor = UserTowerPredictor(self.export_dir, self.manifest, use_gpu)
        self.uri = milvus_uri or self.manifest.milvus_uri
        self.collection = collection or self.manifest.collection
        self._token = token
        self._index_kwargs = dict(index_kwargs or {})
        self._index: ItemIndex | None = None
        self._index_lock = threading.Lock()

    def _read_item_map(self) -> np.ndarray:
        raw = np.zeros(self.manifest.item_count, dtype=np.int64)
        with open(os.path.join(self.export_dir, "item_map.tsv"), encoding="utf-8") as f:
            next(f)
            for line in f:
                d, r = line.split("\t")
                raw[int(d)] = int(r)
        return raw

    @property
    def index(self) -> ItemIndex:
        """The Milvus index, (re)connected lazily so a Milvus outage heals by itself."""
        with self._index_lock:
            if self._index is None:
                self._index = ItemIndex(self.uri, self.collection, self.manifest.embedding_dim,
                                        token=self._token, **self._index_kwargs)
            return self._index

    def reset_index(self) -> None:
        with self._index_lock:
            if self._index is not None:
                self._index.close()
            self._index = None

    def encode(self, histories: Sequence[Sequence[Any]]) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """Raw-id histories -> padded dense ids and lengths; bad input raises RequestError."""
        if not isinstance(histories, (list, tuple)) or not histories:
            raise RequestError("hist_item must be a non-empty list of histories (lists of item ids)")
        if len(histories) > self.max_users:
            raise RequestError(f"{len(histories)} histories in one request; the limit is {self.max_users}")
        hist = np.zeros((len(histories), self.maxlen), dtype=np.int64)
        seq_len = np.zeros(len(histories), dtype=np.int64)
        notes = []
        for row, items in enumerate(histories):
            if not isinstance(items, (list, tuple)):
                raise RequestError(f"hist_item[{row}] must be a list of item ids, got {type(items).__name__}")
            if not items:
                raise RequestError(f"hist_item[{row}] is empty: a user needs at least one clicked item")
            dense = []
            unknown = []
            for col, raw in enumerate(items):
                if isinstance(raw, bool) or not isinstance(raw, (int, np.integer)):
                    raise RequestError(f"hist_item[{row}][{col}] = {raw!r} is not an integer item id")
                if raw < 0:
                    raise RequestError(f"hist_item[{row}][{col}] = {raw} is negative")
                d = self.dense_of.get(int(raw))
                if d is None:
                    unknown.append(int(raw))
                else:
                    dense.append(d)
            if unknown:
                notes.append(f"hist_item[{row}]: unknown item ids ignored: {unknown[:20]}")
            if not dense:
                raise RequestError(f"hist_item[{row}]: none of its item ids is known to the model "
                                   f"(unknown: {unknown[:20]})")
            dense = dense[-self.maxlen:]
            hist[row, :len(dense)] = dense
            seq_len[row] = len(dense)
        return hist, seq_len, notes

    def check_top_k(self, top_k: Any) -> int:
        if top_k is None:
            return self.default_top_k
        if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)):
            raise RequestError(f"top_k = {top_k!r} must be an integer")
        if not 1 <= top_k <= self.max_top_k:
            raise RequestError(f"top_k = {top_k} out of range 1..{self.max_top_k}")
        return int(top_k)

    def interests(self, histories: Sequence[Sequence[Any]]) -> tuple[np.ndarray, list[str]]:
        hist, seq_len, notes = self.encode(histories)
        return self.predictor(hist, seq_len), notes

    def search(self, interests: np.ndarray, histories: Sequence[Sequence[Any]], top_k: int,
               exclude_history: bool = False, filter: str | None = None) -> list[UserRecall]:
        """The Milvus half: K vectors per user -> merged raw-id lists."""
        if filter is not None and not isinstance(filter, str):
            raise RequestError("filter must be a Milvus boolean expression string")
        for attempt in range(4):
            results = recall_top_k(self.index, interests, top_k,
                                   histories=[set(h) for h in histories], exclude_history=exclude_history,
                                   filter=filter or None)
            # A search racing an alias switch on a Milvus server can come back empty for a moment
            # (milvus-io/milvus#25662, #52351): without a filter, an empty answer from a server is
            # that (or an empty collection), so ask again a few times.
            if filter or all(r.ids for r in results) or is_local_uri(self.uri) or attempt == 3:
                return results
            time.sleep(0.05 * 2 ** attempt)
        return results

    def recall(self, histories: Sequence[Sequence[Any]], top_k: Any = None,
               exclude_history: bool = False, filter: str | None = None) -> RecallAnswer:
        top_k = self.check_top_k(top_k)
        vecs, notes = self.interests(histories)
        results = self.search(vecs, histories, top_k, exclude_history, filter)
        short = [i for i, r in enumerate(results) if len(r.ids) < top_k]
        if short and filter:
            notes.append(f"filter left fewer than top_k={top_k} items for rows {short[:20]}")
        return RecallAnswer([r.ids for r in results], [r.scores for r in results], notes)

    def close(self) -> None:
        self.reset_index()
