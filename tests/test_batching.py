"""Micro-batching: the batcher's queue, deadlines and refusals (real threads), and the recall
service's batched answers against the answers each request gets alone (real model, real Milvus
Lite). Timing targets live in benchmarks/serving_load.py, not here."""

from __future__ import annotations

import os
import shutil
import threading
import time

import numpy as np
import pytest

from paddlerec_milvus.batching import MicroBatcher
from paddlerec_milvus.errors import DeadlineExceeded, Overloaded, RequestError
from paddlerec_milvus.serving_contract import ServingLimits


class Recorder:
    """A run_batch that records its batches and can be held (a slow stage, for real)."""

    def __init__(self, fail: object = None):
        self.batches: list[list[object]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.fail = fail

    def __call__(self, jobs):
        self.entered.set()
        self.gate.wait(10)
        self.batches.append(list(jobs))
        return [ValueError(f"bad {j}") if j == self.fail else j * 10 for j in jobs]


def hold_first_batch(batcher: MicroBatcher, rec: Recorder):
    """Submit one job and keep the worker busy with it until ``rec.gate`` is set."""
    rec.gate.clear()
    rec.entered.clear()
    first = batcher.submit(0, 1, time.monotonic() + 10)
    assert rec.entered.wait(5)
    return first


def test_requests_queued_behind_a_batch_run_together_and_get_their_own_results():
    rec = Recorder(fail=3)
    b = MicroBatcher("t", rec, max_users=64, window_s=0.0)
    try:
        first = hold_first_batch(b, rec)
        futures = {j: b.submit(j, 1, time.monotonic() + 10) for j in range(1, 6)}
        rec.gate.set()
        assert first.result(5) == 0
        for j, f in futures.items():
            if j == 3:
                with pytest.raises(ValueError, match="bad 3"):
                    f.result(5)
            else:
                assert f.result(5) == j * 10  # batch-mates of a failing job are answered
        assert rec.batches == [[0], [1, 2, 3, 4, 5]]
        stats = b.stats()
        assert stats["batches"] == 2 and stats["jobs"] == 6
        # jobs 1..5 waited while batch [0] was held: their mean wait is real, and under the
        # time the test took; a batch's mean wall time covers the held one
        assert 0 < stats["mean_queue_ms"] < 5000 and stats["mean_batch_ms"] > 0
    finally:
        b.close()


def test_a_batch_holds_at_most_max_users():
    rec = Recorder()
    b = MicroBatcher("t", rec, max_users=4, window_s=0.0)
    try:
        hold_first_batch(b, rec)
        futures = [b.submit(j, 2, time.monotonic() + 10) for j in range(1, 6)]  # 2 users each
        rec.gate.set()
        for f in futures:
            f.result(5)
        assert [len(x) for x in rec.batches] == [1, 2, 2, 1]
    finally:
        b.close()


def test_a_lone_request_does_not_wait_for_the_window():
    rec = Recorder()
    b = MicroBatcher("t", rec, max_users=64, window_s=2.0)
    try:
        for j in range(3):  # one at a time, as a single client sends them
            t0 = time.monotonic()
            assert b.submit(j, 1, time.monotonic() + 10).result(5) == j * 10
            assert time.monotonic() - t0 < 1.0, "a lone request waited for the 2 s window"
    finally:
        b.close()


def test_once_requests_overlap_the_window_gathers_late_arrivals():
    rec = Recorder()
    b = MicroBatcher("t", rec, max_users=64, window_s=0.5)
    try:
        hold_first_batch(b, rec)
        second = [b.submit(j, 1, time.monotonic() + 10) for j in (1, 2)]
        rec.gate.set()
        for f in second:
            f.result(5)
        # the worker has now seen overlap: a request arriving 0.1 s after the next one joins it
        f3 = b.submit(3, 1, time.monotonic() + 10)
        time.sleep(0.1)
        f4 = b.submit(4, 1, time.monotonic() + 10)
        assert (f3.result(5), f4.result(5)) == (30, 40)
        assert rec.batches[-1] == [3, 4]
    finally:
        b.close()


def test_a_full_queue_refuses_at_once_and_recovers():
    rec = Recorder()
    b = MicroBatcher("t", rec, max_users=64, window_s=0.0, max_queue_users=3)
    try:
        hold_first_batch(b, rec)
        queued = [b.submit(j, 1, time.monotonic() + 10) for j in (1, 2, 3)]
        t0 = time.monotonic()
        with pytest.raises(Overloaded, match="3 users already queued .*limit 3"):
            b.submit(4, 1, time.monotonic() + 10)
        assert time.monotonic() - t0 < 0.5
        assert b.stats()["refused"] == 1
        rec.gate.set()
        assert [f.result(5) for f in queued] == [10, 20, 30]
        assert b.submit(5, 1, time.monotonic() + 10).result(5) == 50  # serving again
        assert all(4 not in batch for batch in rec.batches)  # the refused job never ran
    finally:
        b.close()


def test_a_request_whose_deadline_passes_in_the_queue_is_not_run():
    rec = Recorder()
    b = MicroBatcher("t", rec, max_users=64, window_s=0.0)
    try:
        hold_first_batch(b, rec)
        late = b.submit(7, 1, time.monotonic() + 0.05)
        ok = b.submit(8, 1, time.monotonic() + 10)
        time.sleep(0.15)
        rec.gate.set()
        with pytest.raises(DeadlineExceeded, match="deadline passed .* it was not run"):
            late.result(5)
        assert ok.result(5) == 80
        assert all(7 not in batch for batch in rec.batches)
        assert b.stats()["expired"] == 1
    finally:
        b.close()


def test_a_request_that_would_start_after_its_deadline_is_refused_up_front():
    rec = Recorder()
    b = MicroBatcher("t", rec, max_users=1, window_s=0.0, max_queue_users=1000)
    try:
        rec.gate.clear()
        rec.entered.clear()
        threading.Timer(0.2, rec.gate.set).start()
        b.submit(0, 1, time.monotonic() + 10).result(5)  # teaches the batcher: ~0.2 s per user
        hold_first_batch(b, rec)
        for j in range(1, 4):
            b.submit(j, 1, time.monotonic() + 10)
        with pytest.raises(Overloaded, match="after its deadline"):
            b.submit(9, 1, time.monotonic() + 0.1)
        rec.gate.set()
    finally:
        b.close()


def test_a_cancelled_request_is_not_run_and_close_answers_the_queue():
    rec = Recorder()
    b = MicroBatcher("t", rec, max_users=64, window_s=0.0)
    hold_first_batch(b, rec)
    gone = b.submit(1, 1, time.monotonic() + 10)
    assert gone.cancel()  # the client went away (asyncio cancels the awaited future)
    waiting = b.submit(2, 1, time.monotonic() + 10)
    rec.gate.set()
    assert waiting.result(5) == 20
    assert all(1 not in batch for batch in rec.batches)
    rec.gate.clear()
    rec.entered.clear()
    b.submit(3, 1, time.monotonic() + 10)
    assert rec.entered.wait(5)
    stranded = b.submit(4, 1, time.monotonic() + 10)
    threading.Timer(0.2, rec.gate.set).start()
    b.close()
    with pytest.raises(Overloaded, match="stopping"):
        stranded.result(5)
    with pytest.raises(Overloaded, match="stopping"):
        b.submit(5, 1, time.monotonic() + 10)


def test_call_runs_a_lone_job_in_the_callers_thread_and_queues_behind_a_running_one():
    rec = Recorder()
    threads: list[str] = []

    def run(jobs):
        threads.append(threading.current_thread().name)
        return rec(jobs)

    b = MicroBatcher("t", run, max_users=64, window_s=0.0)
    try:
        assert b.call(1, 1, time.monotonic() + 10) == 10
        assert threads == [threading.current_thread().name]  # inline: no hand-off
        assert b.stats()["inline"] == 1
        hold_first_batch(b, rec)  # the worker is busy: callers now queue and share a batch
        out: dict[int, int] = {}
        callers = [threading.Thread(target=lambda j=j: out.update({j: b.call(j, 1, time.monotonic() + 10)}))
                   for j in (2, 3, 4)]
        for t in callers:
            t.start()
        time.sleep(0.2)
        rec.gate.set()
        for t in callers:
            t.join(5)
        assert out == {2: 20, 3: 30, 4: 40}
        assert rec.batches[-1] == [2, 3, 4]
        with pytest.raises(DeadlineExceeded, match="not run"):
            b.call(5, 1, time.monotonic() - 0.01)
        assert all(5 not in batch for batch in rec.batches)
        rec.fail = 6
        with pytest.raises(ValueError, match="bad 6"):
            b.call(6, 1, time.monotonic() + 10)
    finally:
        b.close()


def test_call_many_runs_a_held_batch_here_in_chunks_and_queues_behind_a_running_one():
    rec = Recorder(fail=5)
    threads: list[str] = []

    def run(jobs):
        threads.append(threading.current_thread().name)
        return rec(jobs)

    b = MicroBatcher("t", run, max_users=4, window_s=0.0)
    try:
        now = time.monotonic()
        deadlines = [now + 10, now - 0.01, now + 10, now + 10, now + 10]
        out = b.call_many([1, 2, 3, 4, 5], [2, 2, 1, 1, 1], deadlines)
        assert out[0] == 10 and out[2] == 30 and out[3] == 40
        assert isinstance(out[1], DeadlineExceeded)  # past its deadline: not run
        assert isinstance(out[4], ValueError) and "bad 5" in str(out[4])  # fails alone
        assert rec.batches == [[1, 3, 4], [5]]  # at most 4 users per run, in order
        assert set(threads) == {threading.current_thread().name}  # idle stage: run here
        stats = b.stats()
        assert stats["expired"] == 1 and stats["inline"] == 2 and stats["jobs"] == 4
        assert b.idle()
        hold_first_batch(b, rec)  # busy: the held batch joins the queue and waits for its turn
        got: list[object] = []
        caller = threading.Thread(target=lambda: got.extend(
            b.call_many([7, 8], [1, 1], [time.monotonic() + 10] * 2)))
        caller.start()
        time.sleep(0.2)
        assert not got
        rec.gate.set()
        caller.join(5)
        assert got == [70, 80]
        assert rec.batches[-1] == [7, 8]
    finally:
        b.close()


def test_limits_validate_the_batching_knobs():
    assert ServingLimits(batch_max_users=0).batch_max_users == 0  # 0 = unbatched
    with pytest.raises(Exception, match="queue_max_users"):
        ServingLimits(queue_max_users=0)
    with pytest.raises(Exception, match="BATCH_WINDOW_MS"):
        ServingLimits.from_env({"PADDLEREC_MILVUS_BATCH_WINDOW_MS": "soon"})
    assert ServingLimits.from_env({"PADDLEREC_MILVUS_BATCH_MAX_USERS": "0"}).batch_max_users == 0


# -- the recall service: batched == alone ---------------------------------------------------
@pytest.fixture(scope="module")
def lite_service(exported_demo, tmp_path_factory):
    """The exported demo model over a private copy of its Lite file (Lite opens a file in one
    process only; the export's own file belongs to other tests' servers)."""
    from paddlerec_milvus.service import RecallService

    db = str(tmp_path_factory.mktemp("batching") / "items.db")
    shutil.copy(exported_demo["milvus_uri"], db)
    svc = RecallService(exported_demo["export_dir"], milvus_uri=db,
                        limits=ServingLimits(batch_max_users=64, batch_window_ms=5.0))
    yield svc
    svc.close()


def request_mix(svc) -> list[dict]:
    """Different top_k, filters, exclude_history, multi-row, unknown ids, and one bad request."""
    raw = [int(r) for r in svc.raw_ids[1:]]
    rng = np.random.default_rng(3)
    h = [rng.choice(raw, size=int(rng.integers(3, 25)), replace=False).tolist() for _ in range(12)]
    mid = sorted(raw)[len(raw) // 2]
    return [
        {"histories": [h[0]], "top_k": 50},
        {"histories": [h[1]], "top_k": 10},
        {"histories": [h[2], h[3], h[4]], "top_k": 20},
        {"histories": [h[5]], "top_k": 30, "exclude_history": True},
        {"histories": [h[6]], "top_k": 25, "filter": f"item_id > {mid}"},
        {"histories": [h[7]], "top_k": 25, "filter": f"item_id <= {mid}"},
        {"histories": [h[8], h[9]], "top_k": 15, "filter": f"item_id > {mid}", "exclude_history": True},
        {"histories": [h[10] + [987654321987]], "top_k": 40},  # an unknown id: ignored, noted
        {"histories": [[987654321987, -5]], "top_k": 10},  # bad: fails alone
        {"histories": [h[11]], "top_k": 100},
    ]


def alone(svc, req: dict):
    """The unbatched path: the request's job through both stages by itself."""
    job = svc.prepare(req["histories"], req["top_k"], req.get("exclude_history", False), req.get("filter"))
    svc.run_tower([job])
    out = svc.run_search([job])[0]
    if isinstance(out, BaseException):
        raise out
    return out


def alone_answers(svc, mix: list[dict]) -> dict[int, object]:
    """Each request's answer alone, or the RequestError it gets."""
    want: dict[int, object] = {}
    for i, req in enumerate(mix):
        try:
            want[i] = alone(svc, req)
        except RequestError as exc:
            want[i] = exc
    return want


def assert_same(got, want, where: str) -> None:
    assert got.items == want.items, where
    for g, w in zip(got.scores, want.scores):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6, err_msg=where)
    assert got.notes == want.notes, where
    assert got.model_version == want.model_version, where


@pytest.mark.slow
def test_one_batch_of_a_mixed_request_set_equals_each_request_alone(lite_service):
    svc = lite_service
    mix = request_mix(svc)
    want = alone_answers(svc, mix)
    assert isinstance(want[8], RequestError) and "hist_item[0]" in str(want[8])
    assert any("unknown item ids ignored" in n for n in want[7].notes)
    assert all(h not in want[3].items[0] for h in mix[3]["histories"][0])
    jobs = [svc.prepare(r["histories"], r["top_k"], r.get("exclude_history", False), r.get("filter"))
            for i, r in enumerate(mix) if i != 8]
    towered = svc.run_tower(jobs)  # every job in one tower call and, per filter, one search
    assert all(j is not None and j.interests is not None for j in towered)
    answers = svc.run_search(jobs)
    for i, got in zip([i for i in range(len(mix)) if i != 8], answers):
        assert_same(got, want[i], f"request {i}")


@pytest.mark.slow
def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(lite_service):
    svc = lite_service
    mix = request_mix(svc)
    want = alone_answers(svc, mix)
    before = svc.batch_stats().get("recall", {}).get("jobs", 0)
    got: dict[tuple[int, int], object] = {}
    start = threading.Barrier(len(mix) * 3)

    def client(i: int, rep: int) -> None:
        req = mix[i]
        start.wait()
        try:
            got[i, rep] = svc.recall(req["histories"], req["top_k"], req.get("exclude_history", False),
                                     req.get("filter"))
        except Exception as exc:  # noqa: BLE001 - compared below
            got[i, rep] = exc

    threads = [threading.Thread(target=client, args=(i, rep)) for rep in range(3) for i in range(len(mix))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for (i, rep), answer in got.items():
        if isinstance(want[i], RequestError):
            assert isinstance(answer, RequestError), (i, answer)
        else:
            assert not isinstance(answer, Exception), (i, answer)
            assert_same(answer, want[i], f"request {i} copy {rep}")
    stats = svc.batch_stats()["recall"]
    assert stats["jobs"] - before == 27  # the bad request never reached a stage
    assert stats["mean_batch_jobs"] > 1.5, stats  # requests really shared searches


@pytest.mark.slow
def test_a_deadline_that_passed_in_a_queue_drops_the_request(lite_service):
    svc = lite_service
    req = request_mix(svc)[0]
    job = svc.prepare(req["histories"], 10, timeout_ms=1)
    time.sleep(0.02)
    expired = svc.batch_stats().get("user tower", {}).get("expired", 0)
    with pytest.raises(DeadlineExceeded, match="not run"):
        svc.tower(job)
    assert svc.batch_stats()["user tower"]["expired"] == expired + 1  # counted, not run
    assert job.interests is None  # the tower never ran for it
    with pytest.raises(RequestError, match="timeout_ms"):
        svc.prepare(req["histories"], 10, timeout_ms=0)
    assert svc.recall(req["histories"], 10, timeout_ms=5000).items  # the service goes on


@pytest.mark.slow
def test_a_callers_own_deadline_only_shortens_the_request_deadline(lite_service):
    svc = lite_service
    req = request_mix(svc)[0]
    now = time.monotonic()
    job = svc.prepare(req["histories"], 10, timeout_ms=5000, arrival=now, deadline=now + 0.25)
    assert job.deadline == pytest.approx(now + 0.25)  # the gRPC deadline is the nearer one
    job = svc.prepare(req["histories"], 10, timeout_ms=100, arrival=now, deadline=now + 60)
    assert job.deadline == pytest.approx(now + 0.1)  # a later one does not extend timeout_ms
    job = svc.prepare(req["histories"], 10, deadline=time.monotonic() - 0.01)
    with pytest.raises(DeadlineExceeded, match="not run"):
        svc.tower(job)
    assert job.interests is None


@pytest.mark.slow
def test_a_stalled_milvus_answers_by_the_request_deadline(lite_service):
    """SIGSTOP the Milvus Lite process: a request with a 300 ms deadline is answered (503-kind
    error) well before the 10 s Milvus timeout; after SIGCONT the service answers again."""
    import signal

    from benchmarks.common import descendants
    from paddlerec_milvus.errors import MilvusIndexError

    svc = lite_service
    req = request_mix(svc)[0]
    want = alone(svc, req)
    lite = []
    for pid in descendants(os.getpid()):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"milvus_lite" in f.read():
                    lite.append(pid)
        except OSError:
            continue
    assert lite, "no Milvus Lite child"
    for pid in lite:
        os.kill(pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        with pytest.raises((MilvusIndexError, DeadlineExceeded)):
            svc.recall(req["histories"], req["top_k"], timeout_ms=300)
        assert time.monotonic() - t0 < 3.0
    finally:
        for pid in lite:
            os.kill(pid, signal.SIGCONT)
    t0 = time.monotonic()
    while True:
        try:
            assert_same(svc.recall(req["histories"], req["top_k"]), want, "after SIGCONT")
            break
        except MilvusIndexError:
            assert time.monotonic() - t0 < 30
            time.sleep(0.2)
