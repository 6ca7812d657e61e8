"""The batching lane on its own (no HTTP): who shares a batch, budgets,
admission, cancellation, the idle fast path."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from tallow.serve.batching import Lane, LaneTimeout, Overloaded
from tallow.serve.config import LaneConfig


class Recorder:
    def __init__(self, delay: float = 0.0, gate: threading.Event | None = None):
        self.batches: list[list] = []
        self.delay = delay
        self.gate = gate

    def __call__(self, jobs):
        if self.gate is not None:
            self.gate.wait(10)
        time.sleep(self.delay)
        self.batches.append([j.payload for j in jobs])
        return [("done", j.payload) if j.payload != "bad" else ValueError("bad input") for j in jobs]


def run(coro):
    return asyncio.run(coro)


def test_concurrent_jobs_share_a_batch_and_get_their_own_results():
    rec = Recorder(delay=0.05)

    async def main():
        lane = Lane("t", rec, LaneConfig(max_batch_size=8, max_wait_ms=20))
        out = await asyncio.gather(*[lane.submit(i) for i in range(8)])
        await lane.close()
        return out

    assert run(main()) == [("done", i) for i in range(8)]
    assert rec.batches == [list(range(8))]


def test_batch_size_token_budget_and_keys_split_batches():
    gate = threading.Event()
    rec = Recorder(gate=gate)

    async def main():
        lane = Lane("t", rec, LaneConfig(max_batch_size=4, max_wait_ms=1, max_batch_tokens=100))
        blocker = asyncio.ensure_future(lane.submit("first"))
        await asyncio.sleep(0.05)  # "first" runs alone and holds the only worker
        jobs = [lane.submit(f"a{i}", tokens=10, key="a") for i in range(6)]
        jobs += [lane.submit(f"b{i}", tokens=60, key="b") for i in range(3)]
        futs = [asyncio.ensure_future(j) for j in jobs]
        await asyncio.sleep(0.05)
        gate.set()
        await asyncio.gather(blocker, *futs)
        await lane.close()

    run(main())
    assert rec.batches[0] == ["first"]
    rest = rec.batches[1:]
    assert ["a0", "a1", "a2", "a3"] in rest and ["a4", "a5"] in rest  # max_batch_size 4
    assert ["b0"] in rest and ["b1"] in rest and ["b2"] in rest  # 60 + 60 tokens > 100
    assert all(len({p[0] for p in batch}) == 1 for batch in rest)  # keys never mix


def test_one_bad_job_fails_alone():
    rec = Recorder()

    async def main():
        lane = Lane("t", rec, LaneConfig(max_batch_size=4, max_wait_ms=20))
        res = await asyncio.gather(lane.submit("ok"), lane.submit("bad"), return_exceptions=True)
        await lane.close()
        return res

    ok, bad = run(main())
    assert ok == ("done", "ok") and isinstance(bad, ValueError)


def test_full_queue_is_refused_at_once_and_depth_returns_to_zero():
    gate = threading.Event()
    rec = Recorder(gate=gate)

    async def main():
        lane = Lane("t", rec, LaneConfig(max_batch_size=1, max_wait_ms=0, max_queue=3))
        futs = [asyncio.ensure_future(lane.submit(i)) for i in range(3)]
        await asyncio.sleep(0.02)
        with pytest.raises(Overloaded) as e:
            lane.enqueue("one too many")
        assert e.value.retry_after_s >= 1
        gate.set()
        await asyncio.gather(*futs)
        depth = lane.depth
        await lane.close()
        return depth

    assert run(main()) == 0


def test_timed_out_job_that_has_not_started_is_dropped():
    gate = threading.Event()
    rec = Recorder(gate=gate)

    async def main():
        lane = Lane("t", rec, LaneConfig(max_batch_size=1, max_wait_ms=0))
        running = asyncio.ensure_future(lane.submit("running"))
        await asyncio.sleep(0.02)
        with pytest.raises(LaneTimeout):
            await lane.submit("queued", timeout=0.05)
        assert lane.depth == 1  # only the running job is left
        gate.set()
        await running
        await lane.close()

    run(main())
    assert rec.batches == [["running"]]  # the timed-out job never ran


def test_lone_request_on_an_idle_lane_does_not_wait():
    """The lane waits for company until max_wait after the first job's arrival,
    unless it is idle and the previous request came more than max_wait ago.
    Decided by the lane's own clock: a job that waited for company starts at
    least max_wait after it arrived (its deadline), one that did not starts at
    once; max_wait is long enough that no scheduling hiccup spans it."""
    max_wait_s = 1.0
    started: dict = {}

    def record(jobs):
        for j in jobs:
            started[j.payload] = time.monotonic() - j.enqueued
        return [("done", j.payload) for j in jobs]

    async def main():
        lane = Lane("t", record, LaneConfig(max_batch_size=8, max_wait_ms=max_wait_s * 1000))
        await lane.submit("first ever")       # no previous request at all
        await asyncio.sleep(max_wait_s * 1.1)  # quiet for longer than max_wait
        await lane.submit("alone")
        await lane.submit("soon after")       # the previous came within max_wait: waits for company
        await lane.close()

    run(main())
    assert started["first ever"] < max_wait_s and started["alone"] < max_wait_s
    assert started["soon after"] >= max_wait_s  # the other branch, to show the clock tells them apart


def test_close_lets_queued_jobs_finish_and_refuses_new_ones():
    rec = Recorder(delay=0.02)

    async def main():
        lane = Lane("t", rec, LaneConfig(max_batch_size=1, max_wait_ms=0))
        futs = [asyncio.ensure_future(lane.submit(i)) for i in range(4)]
        await asyncio.sleep(0)
        await lane.close()
        from tallow.serve.batching import LaneClosed

        with pytest.raises(LaneClosed):
            lane.enqueue("late")
        return await asyncio.gather(*futs)

    assert run(main()) == [("done", i) for i in range(4)]


def test_a_lane_serves_a_second_event_loop():
    """An app object served twice (or a test client with a loop per request):
    the lane restarts its dispatcher on the new loop instead of hanging."""
    rec = Recorder()
    lane = Lane("t", rec, LaneConfig(max_batch_size=4, max_wait_ms=1))

    async def one(x):
        return await lane.submit(x, timeout=5)

    assert run(one("first loop")) == ("done", "first loop")
    assert run(one("second loop")) == ("done", "second loop")


def test_close_past_its_deadline_fails_the_queued_jobs_instead_of_leaving_them_hanging():
    gate = threading.Event()  # the running job holds the only worker until close() has returned
    rec = Recorder(gate=gate)

    async def main():
        lane = Lane("t", rec, LaneConfig(max_batch_size=1, max_wait_ms=0))
        futs = [asyncio.ensure_future(lane.submit(i)) for i in range(3)]
        await asyncio.sleep(0.05)
        await lane.close(timeout=0.1)
        gate.set()
        res = await asyncio.wait_for(asyncio.gather(*futs, return_exceptions=True), 30)
        return res, lane.depth

    res, depth = run(main())
    assert all(isinstance(r, BaseException) for r in res[1:]) and depth == 0
