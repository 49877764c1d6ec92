"""The shared training loop for a PaddleRec-style model directory."""

from __future__ import annotations

import logging
import os
import queue
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import paddle
from tqdm import tqdm

from .checkpoint import load_checkpoint, save_checkpoint
from .device import set_device
from .model_dir import create_reader, load_dygraph_model
from .validation import Validator

logger = logging.getLogger(__name__)


@dataclass
class EpochSummary:
    epoch: int
    mean_loss: float
    samples: int
    seconds: float
    samples_per_s: float
    checkpoint: str
    valid: float | None = None


@dataclass
class TrainSummary:
    epochs: list[EpochSummary] = field(default_factory=list)
    valid_metric: str | None = None
    best_epoch: int | None = None
    valid_popular: float | None = None  # most-popular's validation score, the floor
    stopped_early: bool = False
    history_len: int | None = None  # recall.history_len auto: the latest clicks chosen (None: all)

    @property
    def samples_per_s(self) -> float:
        secs = sum(e.seconds for e in self.epochs)
        return sum(e.samples for e in self.epochs) / secs if secs else 0.0


def prefetch(batches: Iterable, depth: int = 4) -> Iterator:
    """Build the next batches in a background thread while Paddle runs the current step."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def produce() -> None:
        try:
            for batch in batches:
                if stop.is_set():
                    return
                q.put(batch)
            q.put(done)
        except BaseException as exc:  # re-raised in the consumer
            q.put(exc)

    thread = threading.Thread(target=produce, name="batch-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.05)


def seed_everything(seed: int) -> None:
    paddle.seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def _resume_epoch(init_path: str) -> int:
    """A checkpoint folder named by its epoch resumes at the next epoch; others start at 0."""
    name = os.path.basename(os.path.normpath(init_path))
    return int(name) + 1 if name.isdigit() else 0


def init_distributed(config: dict[str, Any]) -> tuple[int, int]:
    """With ``runner.use_fleet`` under ``paddle.distributed.launch``: join the group.

    Returns (rank, world size); readers shard by ``runner.rank``/``runner.world_size``.
    """
    rank, world = 0, 1
    if config.get("runner.use_fleet", False):
        import paddle.distributed as dist

        if int(os.environ.get("PADDLE_TRAINERS_NUM", "1")) > 1:
            dist.init_parallel_env()
            rank, world = dist.get_rank(), dist.get_world_size()
        else:
            logger.warning("runner.use_fleet is True but this is a single process; start it with "
                           "python -m paddle.distributed.launch --nproc_per_node N ...")
    config["runner.rank"], config["runner.world_size"] = rank, world
    return rank, world


def check_replicas_in_sync(model, world: int) -> float:
    """Data parallel must keep every rank's parameters identical; returns the largest gap."""
    if world <= 1:
        return 0.0
    import paddle.distributed as dist

    sums = paddle.to_tensor([float(paddle.sum(paddle.abs(p))) for p in model.parameters()],
                            dtype="float64")
    gathered: list = []
    dist.all_gather(gathered, sums)
    gap = max(float(paddle.max(paddle.abs(g - gathered[0]))) for g in gathered)
    scale = max(1.0, float(paddle.max(paddle.abs(gathered[0]))))
    if gap / scale > 1e-5:
        raise RuntimeError(f"data-parallel replicas diverged (parameter sums differ by {gap:.3g})")
    return gap


def train(config: dict[str, Any],
          on_epoch: Callable[[int, float], None] | None = None) -> TrainSummary:
    """Train for ``runner.epochs``; save ``{model_save_path}/{epoch}/rec.pdparams`` each epoch.
    ``on_epoch(epoch, valid score)`` runs after each validation (``tune`` prunes trials there).

    Data parallel (``runner.use_fleet``): each rank trains on its shard with
    ``train_batch_size / world`` samples a step, gradients are averaged, rank 0 saves.
    """
    seed = int(config.get("runner.seed", 12345))
    seed_everything(seed)
    device = set_device(config)
    rank, world = init_distributed(config)
    dm = load_dygraph_model(config)
    model = dm.create_model(config)
    optimizer = dm.create_optimizer(model, config)
    metrics_list, _ = dm.create_metrics()
    reader = create_reader(config, "train")
    save_path = config.get("runner.model_save_path") or "output_model"
    epochs = int(config.get("runner.epochs", 1))
    batch_size = max(1, int(config.get("runner.train_batch_size", 128)) // world)
    print_interval = max(1, int(config.get("runner.print_interval", 100) or 100))

    start_epoch = 0
    init_path = config.get("runner.model_init_path")
    if init_path:
        load_checkpoint(model, init_path, optimizer)
        start_epoch = _resume_epoch(init_path)
        logger.info("resumed from %s; starting at epoch %d", init_path, start_epoch)

    validator = Validator(config) if Validator.enabled(config) and rank == 0 else None
    if validator is not None:
        validator.resume(save_path, start_epoch)
    step_model = paddle.DataParallel(model) if world > 1 else model
    summary = TrainSummary(valid_metric=validator.metric if validator else None,
                           valid_popular=validator.popular if validator else None)
    logger.info("training on %s (rank %d of %d): epochs %d..%d, batch %d, %d training users",
                device, rank, world, start_epoch, epochs - 1, batch_size,
                getattr(reader, "num_users", -1))
    for epoch in range(start_epoch, epochs):
        # Per-epoch seeding makes a resumed run identical to an uninterrupted one.
        paddle.seed(seed + 1000 * (epoch + 1))
        if hasattr(reader, "set_epoch"):
            reader.set_epoch(epoch)
        if hasattr(reader, "iter_batches"):
            batches = prefetch(reader.iter_batches(batch_size))
            total = getattr(reader, "batches_per_epoch", None)
        else:
            batches = paddle.io.DataLoader(reader, batch_size=batch_size, drop_last=True)
            total = None
        model.train()
        t0 = time.perf_counter()
        losses, samples = [], 0
        bar = tqdm(batches, total=total, desc=f"epoch {epoch}", unit=" batch",
                   disable=True if rank else None, mininterval=1.0)
        for batch_id, batch in enumerate(bar):
            loss, metrics_list, _ = dm.train_forward(step_model, metrics_list, batch, config)
            model.clear_gradients()
            loss.backward()
            optimizer.step()
            samples += len(batch[0])
            if batch_id % print_interval == 0 or total is not None and batch_id == total - 1:
                value = float(loss)
                if not np.isfinite(value):
                    raise FloatingPointError(f"epoch {epoch} batch {batch_id}: loss is {value}")
                losses.append(value)
                rate = samples / max(time.perf_counter() - t0, 1e-9)
                bar.set_postfix(loss=f"{value:.4f}", samples_s=f"{rate:.0f}")
        seconds = time.perf_counter() - t0
        samples *= world
        check_replicas_in_sync(model, world)
        ckpt = os.path.join(save_path, str(epoch))
        if rank == 0:  # checkpoints are written once
            ckpt = save_checkpoint(model, optimizer, save_path, epoch,
                                   {"mean_loss": float(np.mean(losses)) if losses else None,
                                    "world_size": world})
        es = EpochSummary(epoch, float(np.mean(losses)) if losses else float("nan"), samples,
                          seconds, samples / seconds if seconds else 0.0, ckpt)
        summary.epochs.append(es)
        logger.info("epoch %d done: loss %.4f, %d samples in %.1f s (%.0f samples/s), saved %s",
                    epoch, es.mean_loss, samples, seconds, es.samples_per_s, ckpt)
        stop = False
        if validator is not None:
            es.valid = validator.score(dm, model)
            stop = validator.update(epoch, es.valid)
            if on_epoch is not None:
                validator.save(save_path)  # a trial stopped here still records its best epoch
                on_epoch(epoch, es.valid)
            validator.save(save_path)
            summary.best_epoch = validator.best.epoch
        if _agree_to_stop(stop, world):
            summary.stopped_early = True
            break
    if validator is not None:
        summary.history_len = validator.choose_history_len(dm, model, save_path)
    return summary


def _agree_to_stop(stop: bool, world: int) -> bool:
    """Rank 0 validates; every rank must leave the loop at the same epoch."""
    if world <= 1:
        return stop
    import paddle.distributed as dist

    flag = paddle.to_tensor([1 if stop else 0], dtype="int32")
    dist.broadcast(flag, src=0)
    return bool(int(flag.numpy()[0]))
