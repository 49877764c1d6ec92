"""Micro-batching for online recall: concurrent requests share one user-tower call and one Milvus
search, because the CPU goes per call, not per user (one request of 16 users costs ~2x one of
1 user, 16 requests of 1 user cost 16x).

A ``MicroBatcher`` owns one worker thread and a bounded queue. The worker takes every request
queued while its previous batch ran (and, once it has seen concurrency, those arriving within a
short window), runs them as one batch and hands each caller its own result through a
``concurrent.futures.Future``: a thread may wait on it, an asyncio handler awaits it without
parking a thread. A lone request never waits for the window, so batching costs it nothing.

Admission is where overload is decided: a request that would exceed the queue's bound in users,
or whose estimated wait passes its deadline, is refused at once (``Overloaded``) instead of
queueing and making every later request slower; a queued request whose deadline has passed when
its turn comes is answered ``DeadlineExceeded`` and never run.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FuturesTimeout
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from .errors import DeadlineExceeded, Overloaded

logger = logging.getLogger(__name__)
J = TypeVar("J")
R = TypeVar("R")


@dataclass
class _Entry:
    job: Any
    users: int
    deadline: float  # time.monotonic()
    future: Future
    queued_at: float


class MicroBatcher(Generic[J, R]):
    """``submit(job, users, deadline) -> Future``; ``run_batch(jobs)`` returns one result or
    exception per job, in order (an exception fails only its own job)."""

    def __init__(self, name: str, run_batch: Callable[[list[J]], Sequence[R | BaseException]],
                 max_users: int = 64, window_s: float = 0.001, max_queue_users: int = 256):
        self.name = name
        self.max_users = max(1, max_users)
        self.window_s = max(0.0, window_s)
        self.max_queue_users = max(1, max_queue_users)
        self._run_batch = run_batch
        self._queue: collections.deque[_Entry] = collections.deque()
        self._cond = threading.Condition()
        self._queued_users = 0
        self._running = 0  # batches running now (the worker's, and callers' own inline runs)
        self._closed = False
        self._seen_concurrency = False  # the last batch held more than one request
        self._cost_per_user = 0.0  # EWMA of batch wall time / users, for the wait estimate
        self.batches = self.jobs = self.refused = self.expired = self.inline = self.queued_jobs = 0
        self.busy_s = self.cpu_s = 0.0  # wall and this thread's CPU time in run_batch
        self.waited_s = 0.0  # queued requests' time from submit to their batch's start
        self._thread = threading.Thread(target=self._loop, daemon=True, name=f"batcher-{name}")
        self._thread.start()

    # -- callers ---------------------------------------------------------------------------
    def submit(self, job: J, users: int, deadline: float) -> Future:
        """Queue ``job`` (``users`` history rows) to run before ``deadline`` (monotonic), or raise
        ``Overloaded`` now if it cannot."""
        future: Future = Future()
        now = time.monotonic()
        with self._cond:
            if self._closed:
                raise Overloaded(f"{self.name}: the service is stopping")
            busy = bool(self._queue)
            if busy and self._queued_users + users > self.max_queue_users:
                self.refused += 1
                raise Overloaded(f"{self._queued_users} users already queued for the {self.name} "
                                 f"stage (limit {self.max_queue_users}); retry shortly")
            wait = (self._queued_users + users) * self._cost_per_user
            if busy and now + wait > deadline:
                self.refused += 1
                raise Overloaded(f"the {self.name} stage would start this request in ~{wait * 1e3:.0f} ms, "
                                 f"after its deadline ({max(0.0, deadline - now) * 1e3:.0f} ms left)")
            self._queue.append(_Entry(job, users, deadline, future, now))
            self._queued_users += users
            self._cond.notify()
        return future

    def idle(self) -> bool:
        """Nothing queued or running: a request now would run alone."""
        with self._cond:
            return not self._queue and not self._running and not self._closed

    def call(self, job: J, users: int, deadline: float) -> R:
        """For a caller that has a thread of its own (a pipeline Op): when nothing is queued or
        running, run the job here at once (no hand-off to the worker, so a lone request costs what
        it costs unbatched); else queue it with the others and wait for its batch."""
        if deadline <= time.monotonic():
            with self._cond:
                self.expired += 1
            raise DeadlineExceeded(f"the request's deadline passed before the {self.name} stage; "
                                   "it was not run")
        with self._cond:
            alone = not self._queue and not self._running and not self._closed
            if alone:
                self._running += 1
        if not alone:
            future = self.submit(job, users, deadline)
            try:
                return future.result(timeout=max(0.0, deadline - time.monotonic()) + 30.0)
            except FuturesTimeout:
                raise DeadlineExceeded(f"the request's deadline passed while it waited for the "
                                       f"{self.name} stage") from None
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            result = self._run_batch([job])[0]
        finally:
            self._account(time.perf_counter() - t0, time.thread_time() - c0, users, 1, inline=True)
        if isinstance(result, BaseException):
            raise result
        return result

    def call_many(self, jobs: Sequence[J], users: Sequence[int], deadlines: Sequence[float]
                  ) -> list[R | BaseException]:
        """For a caller that already holds a batch (a pipeline Op fed by Paddle Serving's op
        batching): one result or exception per job, in order. A job past its deadline is answered
        ``DeadlineExceeded`` and not run; when the stage is idle the rest run here, in batches of
        at most ``max_users``, else they queue with the others (admission as ``submit``)."""
        out: list[Any] = [None] * len(jobs)
        now = time.monotonic()
        live = []
        for i, deadline in enumerate(deadlines):
            if deadline <= now:
                out[i] = DeadlineExceeded(f"the request's deadline passed before the {self.name} stage; "
                                          "it was not run")
            else:
                live.append(i)
        with self._cond:
            self.expired += len(jobs) - len(live)
            alone = not self._queue and not self._running and not self._closed
            if alone and live:
                self._running += 1
        if not live:
            return out
        if not alone:
            futures: list[tuple[int, Future]] = []
            for i in live:
                try:
                    futures.append((i, self.submit(jobs[i], users[i], deadlines[i])))
                except Overloaded as exc:
                    out[i] = exc
            for i, future in futures:
                try:
                    out[i] = future.result(timeout=max(0.0, deadlines[i] - time.monotonic()) + 30.0)
                except FuturesTimeout:
                    out[i] = DeadlineExceeded(f"the request's deadline passed while it waited for the "
                                              f"{self.name} stage")
                except BaseException as exc:  # noqa: BLE001 - the job's own failure
                    out[i] = exc
            return out
        chunks, chunk, size = [], [], 0
        for i in live:
            if chunk and size + users[i] > self.max_users:
                chunks.append(chunk)
                chunk, size = [], 0
            chunk.append(i)
            size += users[i]
        chunks.append(chunk)
        for n, chunk in enumerate(chunks):
            t0, c0 = time.perf_counter(), time.thread_time()
            try:
                results = list(self._run_batch([jobs[i] for i in chunk]))
                if len(results) != len(chunk):
                    raise RuntimeError(f"{self.name}: run_batch returned {len(results)} results "
                                       f"for {len(chunk)} jobs")
            except BaseException as exc:  # noqa: BLE001 - every job of the chunk gets it
                results = [exc] * len(chunk)
            self._account(time.perf_counter() - t0, time.thread_time() - c0,
                          sum(users[i] for i in chunk), len(chunk), inline=True,
                          still_running=n + 1 < len(chunks))
            for i, r in zip(chunk, results):
                out[i] = r
        return out

    def _account(self, took: float, cpu: float, users: int, jobs: int, inline: bool = False,
                 still_running: bool = False) -> None:
        per_user = took / max(1, users)
        with self._cond:
            if not still_running:
                self._running -= 1
            self.busy_s += took
            self.cpu_s += cpu
            self._cost_per_user = per_user if not self.batches else \
                0.8 * self._cost_per_user + 0.2 * per_user
            self.batches += 1
            self.jobs += jobs
            self.inline += inline

    def stats(self) -> dict[str, Any]:
        with self._cond:
            return {"queued_users": self._queued_users, "batches": self.batches, "jobs": self.jobs,
                    "mean_batch_jobs": round(self.jobs / self.batches, 2) if self.batches else None,
                    "refused": self.refused, "expired": self.expired, "inline": self.inline,
                    "busy_s": round(self.busy_s, 3), "cpu_s": round(self.cpu_s, 3),
                    "mean_batch_ms": round(self.busy_s / self.batches * 1e3, 3) if self.batches else None,
                    "mean_queue_ms": round(self.waited_s / self.queued_jobs * 1e3, 3)
                    if self.queued_jobs else None,
                    "max_users": self.max_users, "max_queue_users": self.max_queue_users,
                    "window_ms": self.window_s * 1e3}

    def close(self) -> None:
        """Stop the worker; queued requests are answered ``Overloaded`` (stopping)."""
        with self._cond:
            self._closed = True
            left = list(self._queue)
            self._queue.clear()
            self._queued_users = 0
            self._cond.notify_all()
        for e in left:
            if e.future.set_running_or_notify_cancel():
                e.future.set_exception(Overloaded(f"{self.name}: the service is stopping"))
        self._thread.join(timeout=5)

    # -- the worker ------------------------------------------------------------------------
    def _take(self, batch: list[_Entry], users: int) -> int:
        """Move queued entries into ``batch`` up to max_users (the first one always fits).
        Caller holds the lock."""
        while self._queue and (not batch or users + self._queue[0].users <= self.max_users):
            e = self._queue.popleft()
            self._queued_users -= e.users
            batch.append(e)
            users += e.users
        return users

    def _collect(self) -> list[_Entry] | None:
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            batch: list[_Entry] = []
            users = self._take(batch, 0)
            if self.window_s and self._seen_concurrency:
                end = batch[0].queued_at + self.window_s
                while users < self.max_users and not self._closed:
                    left = end - time.monotonic()
                    if left <= 0 or (self._queue and users + self._queue[0].users > self.max_users):
                        break
                    if not self._queue:
                        self._cond.wait(left)
                    users = self._take(batch, users)
            self._running += 1
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._collect()
            if batch is None:
                return
            now = time.monotonic()
            live = []
            for e in batch:
                if not e.future.set_running_or_notify_cancel():
                    continue  # the caller went away (cancelled): nothing to run for it
                if e.deadline <= now:
                    self.expired += 1
                    e.future.set_exception(DeadlineExceeded(
                        f"the request's deadline passed after {(now - e.queued_at) * 1e3:.0f} ms in the "
                        f"{self.name} queue (the service is overloaded); it was not run"))
                    continue
                live.append(e)
            if not live:
                with self._cond:
                    self._running -= 1
                continue
            self._seen_concurrency = len(live) > 1
            started = time.monotonic()
            with self._cond:
                self.waited_s += sum(started - e.queued_at for e in live)
                self.queued_jobs += len(live)
            t0, c0 = time.perf_counter(), time.thread_time()
            try:
                results = list(self._run_batch([e.job for e in live]))
                if len(results) != len(live):
                    raise RuntimeError(f"{self.name}: run_batch returned {len(results)} results "
                                       f"for {len(live)} jobs")
            except BaseException as exc:  # noqa: BLE001 - every caller gets the batch's failure
                results = [exc] * len(live)
            self._account(time.perf_counter() - t0, time.thread_time() - c0,
                          sum(e.users for e in live), len(live))
            for e, r in zip(live, results):
                if isinstance(r, BaseException):
                    e.future.set_exception(r)
                else:
                    e.future.set_result(r)
