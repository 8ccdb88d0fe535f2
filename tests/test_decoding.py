"""workers.decoding: per-stream job queues on decoding threads (no daemon, no recognizer)."""

from __future__ import annotations

import select
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from workers.decoding import CANCEL, END, FEED, Finished, Job, Jobs

pytestmark = pytest.mark.timeout(20)
WAIT = 10.0


class Gate:
    """Jobs that block until released, recording when they start and end."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.log: list[tuple[str, str, str]] = []  # (event, target, kind)
        self.release: dict[str, threading.Event] = {}
        self.started = threading.Condition(self.lock)

    def run(self, job: Job[str]) -> str:
        with self.lock:
            self.log.append(("start", job.target, job.kind))
            self.started.notify_all()
            event = self.release.setdefault(job.target, threading.Event())
        assert event.wait(WAIT)
        with self.lock:
            self.log.append(("end", job.target, job.kind))
        if job.kind == CANCEL:
            raise RuntimeError(f"cannot cancel {job.target}")
        return f"{job.target}:{job.kind}:{b''.join(job.chunks).decode()}"

    def wait_started(self, target: str, count: int = 1) -> None:
        with self.lock:
            ok = self.started.wait_for(
                lambda: sum(1 for e, t, _ in self.log if e == "start" and t == target) >= count,
                WAIT,
            )
        assert ok, self.log

    def open(self, target: str) -> None:
        with self.lock:
            self.release.setdefault(target, threading.Event()).set()


@pytest.fixture
def gate() -> Gate:
    return Gate()


@pytest.fixture
def jobs(gate: Gate) -> Iterator[Jobs[str]]:
    j: Jobs[str] = Jobs(gate.run, 2)
    yield j
    for target in list(gate.release):
        gate.open(target)
    assert j.close()


def collect_until(jobs: Jobs[str], count: int) -> list[Finished[str]]:
    """Finished jobs, waiting on the eventfd as the infer worker does."""
    got: list[Finished[str]] = []
    poller = select.poll()
    poller.register(jobs.fileno(), select.POLLIN)
    deadline = time.monotonic() + WAIT
    while len(got) < count:
        assert time.monotonic() < deadline, got
        poller.poll(100)
        got += jobs.collect()
    return got


def test_streams_run_at_once_and_each_stream_in_order(gate: Gate, jobs: Jobs[str]) -> None:
    jobs.submit(1, Job(FEED, "a", [b"1"], 1))
    jobs.submit(1, Job(END, "a"))
    jobs.submit(2, Job(FEED, "b", [b"x"], 1))
    # Both streams' first jobs run at once on the two threads; stream 1's END waits for its
    # feed although no thread is free for it anyway.
    gate.wait_started("a")
    gate.wait_started("b")
    gate.open("b")
    done = collect_until(jobs, 1)
    assert [f.result for f in done] == ["b:feed:x"] and done[0].error is None
    # A thread is free now, but stream 1's END still waits for its running feed.
    assert ("start", "a", END) not in gate.log
    gate.open("a")
    done = collect_until(jobs, 2)
    assert [f.result for f in done] == ["a:feed:1", "a:end:"]
    assert gate.log.index(("end", "a", FEED)) < gate.log.index(("start", "a", END))


def test_audio_for_a_busy_stream_joins_its_queued_feed(gate: Gate, jobs: Jobs[str]) -> None:
    jobs.submit(1, Job(FEED, "a", [b"1"], 1))
    gate.wait_started("a")
    for seq in (2, 3, 4):
        jobs.submit(1, Job(FEED, "a", [str(seq).encode()], seq))
    jobs.submit(1, Job(END, "a"))
    jobs.submit(1, Job(FEED, "b", [b"5"], 5))  # the stream's next utterance: not joined
    gate.open("a")
    gate.open("b")
    done = collect_until(jobs, 4)
    assert [(f.job.kind, f.result, f.job.seq) for f in done] == [
        (FEED, "a:feed:1", 1),
        (FEED, "a:feed:234", 4),  # one call for the three chunks that came meanwhile
        (END, "a:end:", -1),
        (FEED, "b:feed:5", 5),
    ]


def test_discard_drops_queued_jobs_of_one_target(gate: Gate, jobs: Jobs[str]) -> None:
    jobs.submit(1, Job(FEED, "a", [b"1"], 1))
    gate.wait_started("a")
    jobs.submit(1, Job(END, "a"))
    jobs.submit(1, Job(FEED, "b", [b"2"], 2))
    assert jobs.discard(1, "a") == 1  # the END; the running feed is not touched
    assert jobs.discard(1, "zzz") == 0
    jobs.submit(1, Job(CANCEL, "a"))
    gate.open("a")
    gate.open("b")
    done = collect_until(jobs, 3)
    assert [(f.job.target, f.job.kind) for f in done] == [("a", FEED), ("b", FEED), ("a", CANCEL)]
    # An exception in a job is its result, not the thread's end.
    assert isinstance(done[2].error, RuntimeError) and done[2].result is None
    jobs.submit(3, Job(FEED, "c", [b"ok"], 1))
    gate.open("c")
    assert collect_until(jobs, 1)[0].result == "c:feed:ok"


def test_discard_of_every_queued_job_frees_the_stream(gate: Gate) -> None:
    blocker: Jobs[str] = Jobs(gate.run, 1)
    try:
        blocker.submit(1, Job(FEED, "a", [b"1"], 1))
        gate.wait_started("a")
        blocker.submit(2, Job(FEED, "b", [b"2"], 1))  # queued: the only thread is busy
        assert blocker.discard(2, "b") == 1
        gate.open("a")
        gate.open("b")
        assert [f.job.target for f in collect_until(blocker, 1)] == ["a"]
        # The emptied stream is not served (that would fail the thread); later jobs run.
        blocker.submit(2, Job(FEED, "c", [b"3"], 2))
        gate.open("c")
        assert [f.result for f in collect_until(blocker, 1)] == ["c:feed:3"]
    finally:
        blocker.close()


def test_oldest_start_is_the_longest_running_job(gate: Gate) -> None:
    now = [100.0]
    clock: Callable[[], float] = lambda: now[0]  # noqa: E731
    j: Jobs[str] = Jobs(gate.run, 2, clock=clock)
    try:
        assert j.oldest_start() is None
        j.submit(1, Job(FEED, "a", [b""], 1))
        gate.wait_started("a")
        now[0] = 105.0
        j.submit(2, Job(FEED, "b", [b""], 1))
        gate.wait_started("b")
        assert j.oldest_start() == 100.0  # a worker's heartbeat is no newer than this
        gate.open("a")
        collect_until(j, 1)
        assert j.oldest_start() == 105.0
        gate.open("b")
        collect_until(j, 1)
        assert j.oldest_start() is None
    finally:
        assert j.close()


def test_close_does_not_wait_forever_for_a_stuck_call(gate: Gate) -> None:
    j: Jobs[str] = Jobs(gate.run, 1)
    j.submit(1, Job(FEED, "stuck", [b""], 1))
    gate.wait_started("stuck")
    j.submit(2, Job(FEED, "never", [b""], 1))
    t0 = time.monotonic()
    assert not j.close(timeout=0.2)  # the stuck call is still running
    assert time.monotonic() - t0 < WAIT / 2
    gate.open("stuck")
    assert ("start", "never", FEED) not in gate.log  # queued jobs are dropped at close
