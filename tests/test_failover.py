"""FailoverBackend unit tests: Triton endpoints behind breakers, failover, replay, fallback.

No Triton server and no processes: every endpoint is a :class:`FakeEndpoint` (duck-typed like
:class:`~workers.backends.triton.TritonBackend`) that records the audio each of its sequences
received and can be told to fail; the embedded fallback is a :class:`FakeFallback`; time is an
injected :class:`Clock` (nothing sleeps).

Covered:

* routing of ``begin``: first endpoint, the next one when a breaker is open, the fallback, and
  ``BackendUnavailable`` (with ``retry_after_s`` from the breakers) when nothing is usable;
* failover with replay (``EndpointError`` on a feed and at ``end``): the new target gets the
  whole utterance once, in order (in pieces of at most 1 s); one final; counters and the breaker;
* ``SequenceLost``: replay on the same endpoint, not counted against it;
* parking with no usable target, placing again (on a feed or at ``end``) once the breaker lets
  calls through, and ``BackendUnavailable`` at ``end`` when still down;
* the replay cap (``max_pending_bytes``): no audio kept, a failure says
  ``limits.max_pending_audio_s``;
* model errors: that key only, not counted against the endpoint;
* ``feed_many`` batching: one request batch per target;
* ``maintain()``: probes at start, a failed probe trips the breaker, half-open probes, the
  ``health_interval_s`` limit, reconnects, the one-time sweep of stale regions;
* a busy fallback during a failover (``BackendUnavailable``) and during ``begin``
  (``BackendBusy`` propagates);
* ``cancel`` (``forget`` on a down endpoint) and ``close``;
* :meth:`CircuitBreaker.trip` in each state.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

import pytest

from workers.backends.base import (
    Backend,
    BackendBusy,
    BackendError,
    BackendUnavailable,
    Transcript,
)
from workers.backends.failover import FailoverBackend
from workers.backends.triton import EndpointError, SequenceLost, TritonBackend
from workers.breaker import BreakerConfig, BreakerState, CircuitBreaker

pytestmark = pytest.mark.timeout(30)

CLOSED = BreakerState.CLOSED
OPEN = BreakerState.OPEN
HALF_OPEN = BreakerState.HALF_OPEN
STATE_CODE = {CLOSED: 1, HALF_OPEN: 2, OPEN: 3}
OPEN_S = 5.0
T0 = 1000.0


# --- fakes --------------------------------------------------------------------------------------


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, dt: float) -> None:
        self.now += dt


def final_text(who: str, audio: bytes) -> str:
    """The text a fake recognizer answers for ``audio``: who decoded how many bytes of what."""
    return f"{who}:{len(audio)}:{hashlib.sha1(audio).hexdigest()[:12]}"


def chunk(i: int, n: int = 64) -> bytes:
    """A distinct chunk of ``n`` bytes (even: s16le)."""
    return bytes([i % 256]) * n


class FakeEndpoint:
    """Duck-typed TritonBackend: keeps the chunks of every sequence, fails on request.

    ``calls`` logs every method call as ``(name, keys)``. Failures: ``fail_feed``/``fail_end``
    queue exceptions for the next feed requests (one per key, from ``feed`` or ``feed_many``)
    or ``end`` calls; ``fail_probe`` for ``probe``; ``down`` makes every request (feed, end,
    probe, sweep) raise :class:`EndpointError`. Like TritonBackend, a failed feed leaves the
    sequence open (until ``forget``/``cancel``) and ``end`` closes it even when it fails.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.open: dict[int, list[bytes]] = {}  # key -> chunks received by its sequence
        self.finals: list[tuple[int, bytes]] = []  # (key, whole audio) per successful end
        self.dropped: list[tuple[int, bytes, str]] = []  # (key, audio, "forget" | "cancel")
        self.calls: list[tuple[str, tuple[int, ...]]] = []
        self.feed_errors: deque[BackendError] = deque()
        self.end_errors: deque[BackendError] = deque()
        self.probe_errors: deque[BackendError] = deque()
        self.down = False
        self.closed = False
        self.stale_regions: list[str] = []

    # failure injection
    def fail_feed(self, exc: BackendError, n: int = 1) -> None:
        self.feed_errors.extend([exc] * n)

    def fail_end(self, exc: BackendError, n: int = 1) -> None:
        self.end_errors.extend([exc] * n)

    def fail_probe(self, exc: BackendError, n: int = 1) -> None:
        self.probe_errors.extend([exc] * n)

    def _down(self, what: str) -> EndpointError:
        return EndpointError(f"triton {self.url}: {what}: unreachable")

    # queries for the tests
    def count(self, name: str) -> int:
        return sum(1 for n, _ in self.calls if n == name)

    def keys_of(self, name: str) -> list[tuple[int, ...]]:
        return [keys for n, keys in self.calls if n == name]

    def chunks(self, key: int) -> list[bytes]:
        return list(self.open[key])

    # the TritonBackend interface FailoverBackend uses
    def begin(self, key: int) -> None:
        self.calls.append(("begin", (key,)))
        if self.closed:
            raise BackendError("backend is closed")
        if key in self.open:
            raise BackendError(f"stream {key} already has an open utterance")
        self.open[key] = []

    def _feed_one(self, key: int, pcm: bytes) -> Exception | None:
        if key not in self.open:
            return BackendError(f"stream {key} has no open utterance")
        if self.down:
            return self._down("feed")
        if self.feed_errors:
            return self.feed_errors.popleft()
        self.open[key].append(pcm)
        return None

    def feed(self, key: int, pcm: bytes) -> None:
        self.calls.append(("feed", (key,)))
        error = self._feed_one(key, pcm)
        if error is not None:
            raise error

    def feed_many(self, items: Sequence[tuple[int, bytes]]) -> dict[int, Exception]:
        self.calls.append(("feed_many", tuple(k for k, _ in items)))
        errors: dict[int, Exception] = {}
        for key, pcm in items:
            error = self._feed_one(key, pcm)
            if error is not None:
                errors[key] = error
        return errors

    def partial(self, key: int) -> str:
        return f"{self.url}:partial:{sum(len(c) for c in self.open[key])}"

    def end(self, key: int) -> Transcript:
        self.calls.append(("end", (key,)))
        if key not in self.open:
            raise BackendError(f"stream {key} has no open utterance")
        audio = b"".join(self.open.pop(key))
        if self.down:
            raise self._down("end")
        if self.end_errors:
            raise self.end_errors.popleft()
        self.finals.append((key, audio))
        return Transcript(final_text(self.url, audio), None, None)

    def cancel(self, key: int) -> None:
        self.calls.append(("cancel", (key,)))
        chunks = self.open.pop(key, None)
        if chunks is not None:
            self.dropped.append((key, b"".join(chunks), "cancel"))

    def forget(self, key: int) -> None:
        self.calls.append(("forget", (key,)))
        chunks = self.open.pop(key, None)
        if chunks is not None:
            self.dropped.append((key, b"".join(chunks), "forget"))

    def active(self) -> int:
        return len(self.open)

    def stats(self) -> dict[str, int]:
        return {"active": len(self.open), "ended": len(self.finals)}

    def close(self) -> None:
        self.calls.append(("close", ()))
        self.closed = True
        self.open.clear()

    def probe(self) -> None:
        self.calls.append(("probe", ()))
        if self.down:
            raise self._down("probe")
        if self.probe_errors:
            raise self.probe_errors.popleft()

    def reconnect(self) -> None:
        self.calls.append(("reconnect", ()))

    def sweep_regions(self, is_stale: Callable[[str], bool]) -> list[str]:
        self.calls.append(("sweep", ()))
        if self.down:
            raise self._down("sweep")
        return [name for name in self.stale_regions if is_stale(name)]


class FakeFallback(Backend):
    """The embedded fallback: keeps the chunks per key; ``busy`` makes ``begin`` raise
    :class:`BackendBusy`."""

    name = "fake-fallback"

    def __init__(self) -> None:
        self.open: dict[int, list[bytes]] = {}
        self.finals: list[tuple[int, bytes]] = []
        self.cancelled: list[int] = []
        self.begun: list[int] = []
        self.busy = False
        self.closed = False

    def begin(self, key: int) -> None:
        if self.busy:
            raise BackendBusy("every decoder is busy")
        if key in self.open:
            raise BackendError(f"stream {key} already has an open utterance")
        self.begun.append(key)
        self.open[key] = []

    def feed(self, key: int, pcm: bytes) -> None:
        if key not in self.open:
            raise BackendError(f"stream {key} has no open utterance")
        self.open[key].append(pcm)

    def partial(self, key: int) -> str:
        return ""

    def end(self, key: int) -> Transcript:
        if key not in self.open:
            raise BackendError(f"stream {key} has no open utterance")
        audio = b"".join(self.open.pop(key))
        self.finals.append((key, audio))
        return Transcript(final_text("fallback", audio), None, None)

    def cancel(self, key: int) -> None:
        if self.open.pop(key, None) is not None:
            self.cancelled.append(key)

    def active(self) -> int:
        return len(self.open)

    def stats(self) -> dict[str, int]:
        return {"active": len(self.open)}

    def close(self) -> None:
        self.closed = True
        self.open.clear()


@dataclass
class Rig:
    backend: FailoverBackend
    endpoints: list[FakeEndpoint]
    fallback: FakeFallback | None
    clock: Clock

    @property
    def breakers(self) -> list[CircuitBreaker]:
        return self.backend.breakers()

    def stat(self, name: str) -> int:
        return self.backend.stats()[name]


def make(
    n: int = 2,
    *,
    fallback: bool = False,
    consecutive_failures: int = 1,
    open_s: float = OPEN_S,
    max_pending_bytes: int = 1 << 20,
    health_interval_s: float = 1.0,
    is_stale_region: Callable[[str], bool] | None = None,
) -> Rig:
    clock = Clock()
    endpoints = [FakeEndpoint(f"ep{i}:8001") for i in range(n)]
    fb = FakeFallback() if fallback else None
    backend = FailoverBackend(
        cast("list[TritonBackend]", endpoints),
        BreakerConfig(consecutive_failures=consecutive_failures, open_s=open_s, max_open_s=60.0),
        fallback=fb,
        max_pending_bytes=max_pending_bytes,
        health_interval_s=health_interval_s,
        is_stale_region=is_stale_region,
        clock=clock,
    )
    return Rig(backend, endpoints, fb, clock)


# --- 1. routing ---------------------------------------------------------------------------------


def test_begin_goes_to_first_endpoint() -> None:
    rig = make()
    a, b = rig.endpoints
    rig.backend.begin(1)
    rig.backend.feed(1, chunk(1))
    assert a.keys_of("begin") == [(1,)]
    assert a.chunks(1) == [chunk(1)]
    assert b.calls == []
    assert rig.backend.active() == 1
    assert rig.backend.end(1).text == final_text(a.url, chunk(1))
    assert rig.backend.active() == 0
    assert rig.stat("failovers") == 0
    assert rig.stat("replays") == 0


def test_begin_skips_endpoint_whose_breaker_is_open() -> None:
    rig = make()
    a, b = rig.endpoints
    rig.breakers[0].trip("test")
    rig.backend.begin(1)
    rig.backend.feed(1, chunk(1))
    assert a.calls == []
    assert b.keys_of("begin") == [(1,)]
    assert rig.backend.end(1).text == final_text(b.url, chunk(1))
    assert rig.stat("endpoint0") == STATE_CODE[OPEN]
    assert rig.stat("endpoint1") == STATE_CODE[CLOSED]


def test_begin_goes_to_fallback_when_every_breaker_is_open() -> None:
    rig = make(fallback=True)
    for breaker in rig.breakers:
        breaker.trip("test")
    rig.backend.begin(1)
    rig.backend.feed(1, chunk(1))
    assert rig.fallback is not None
    assert rig.fallback.begun == [1]
    assert all(ep.calls == [] for ep in rig.endpoints)
    assert rig.stat("fallback_utterances") == 1
    assert rig.stat("unavailable") == 0
    assert rig.backend.end(1).text == final_text("fallback", chunk(1))


def test_begin_unavailable_without_fallback_retry_after_from_breakers() -> None:
    rig = make()
    rig.breakers[0].trip("test")  # open until T0 + 5
    rig.clock.advance(2.0)
    rig.breakers[1].trip("test")  # open until T0 + 7
    rig.clock.advance(1.0)  # T0 + 3: endpoint 0 may let a call through in 2 s
    with pytest.raises(BackendUnavailable) as info:
        rig.backend.begin(1)
    assert info.value.retry_after_s == pytest.approx(2.0)
    assert info.value.retry_after_s == pytest.approx(rig.backend.retry_after_s())
    assert rig.stat("unavailable") == 1
    assert rig.backend.active() == 0
    assert all(ep.calls == [] for ep in rig.endpoints)
    # The key was not registered: once a breaker half-opens, begin works for the same key.
    rig.clock.advance(2.0)
    rig.backend.begin(1)
    assert rig.endpoints[0].keys_of("begin") == [(1,)]


# --- 2. failover with replay --------------------------------------------------------------------


def test_endpoint_error_on_feed_fails_over_with_one_replay() -> None:
    rig = make()
    a, b = rig.endpoints
    rig.backend.begin(7)
    for i in range(1, 4):
        rig.backend.feed(7, chunk(i))
    assert a.chunks(7) == [chunk(1), chunk(2), chunk(3)]
    a.fail_feed(EndpointError("triton a: deadline exceeded"))
    rig.backend.feed(7, chunk(4))  # no error: the utterance moved

    first_four = chunk(1) + chunk(2) + chunk(3) + chunk(4)
    assert b.keys_of("begin") == [(7,)]
    assert b.chunks(7) == [first_four]  # one replay, whole, in order
    assert a.keys_of("forget") == [(7,)]
    assert 7 not in a.open
    snap = rig.breakers[0].snapshot()
    assert snap.state is OPEN
    assert snap.consecutive_failures == 1
    assert rig.breakers[1].state is CLOSED
    assert rig.stat("failovers") == 1
    assert rig.stat("replays") == 1
    assert rig.stat("replayed_bytes") == len(first_four)
    assert rig.stat("breaker_opened") == 1

    rig.backend.feed(7, chunk(5))
    rig.backend.feed(7, chunk(6))
    assert b.chunks(7) == [first_four, chunk(5), chunk(6)]
    assert a.count("feed_many") + a.count("feed") == 4  # nothing more went to A
    whole = first_four + chunk(5) + chunk(6)
    assert rig.backend.end(7) == Transcript(final_text(b.url, whole), None, None)
    assert b.finals == [(7, whole)]
    assert a.finals == []
    assert a.count("end") == 0
    assert rig.backend.active() == 0
    assert rig.stat("replays") == 1


def test_failover_to_fallback_replays_whole_utterance() -> None:
    rig = make(n=1, fallback=True)
    (a,) = rig.endpoints
    fallback = rig.fallback
    assert fallback is not None
    rig.backend.begin(3)
    rig.backend.feed(3, chunk(1))
    a.fail_feed(EndpointError("triton a: unavailable"))
    rig.backend.feed(3, chunk(2))
    rig.backend.feed(3, chunk(3))
    assert fallback.open[3] == [chunk(1) + chunk(2), chunk(3)]
    assert rig.stat("fallback_utterances") == 1
    assert rig.stat("failovers") == 1
    whole = chunk(1) + chunk(2) + chunk(3)
    assert rig.backend.end(3).text == final_text("fallback", whole)
    assert fallback.finals == [(3, whole)]


def test_replay_that_fails_on_next_endpoint_goes_on_to_the_one_after() -> None:
    rig = make(n=3)
    a, b, c = rig.endpoints
    rig.backend.begin(1)
    rig.backend.feed(1, chunk(1))
    a.fail_feed(EndpointError("a down"))
    b.down = True
    rig.backend.feed(1, chunk(2))
    both = chunk(1) + chunk(2)
    assert c.chunks(1) == [both]
    assert b.keys_of("forget") == [(1,)]
    assert rig.breakers[0].state is OPEN
    assert rig.breakers[1].state is OPEN
    assert rig.stat("failovers") == 1
    assert rig.stat("replays") == 1
    assert rig.stat("replayed_bytes") == len(both)
    assert rig.backend.end(1).text == final_text(c.url, both)


# --- 3. SequenceLost ----------------------------------------------------------------------------


def test_sequence_lost_replays_on_same_endpoint_without_breaker_failure() -> None:
    rig = make()
    a, b = rig.endpoints
    rig.backend.begin(5)
    rig.backend.feed(5, chunk(1))
    rig.backend.feed(5, chunk(2))
    a.fail_feed(SequenceLost("triton a: sequence 5 needs START"))
    rig.backend.feed(5, chunk(3))
    whole3 = chunk(1) + chunk(2) + chunk(3)
    assert a.keys_of("begin") == [(5,), (5,)]  # a new sequence on A itself
    assert a.keys_of("forget") == [(5,)]
    assert a.dropped == [(5, chunk(1) + chunk(2), "forget")]
    assert a.chunks(5) == [whole3]
    assert b.calls == []
    snap = rig.breakers[0].snapshot()
    assert snap.state is CLOSED
    assert snap.consecutive_failures == 0
    assert rig.stat("failovers") == 1
    assert rig.stat("replays") == 1
    assert rig.stat("replayed_bytes") == len(whole3)
    rig.backend.feed(5, chunk(4))
    assert rig.backend.end(5).text == final_text(a.url, whole3 + chunk(4))


def test_sequence_lost_at_end_replays_on_same_endpoint() -> None:
    rig = make()
    a, b = rig.endpoints
    rig.backend.begin(5)
    rig.backend.feed(5, chunk(1))
    rig.backend.feed(5, chunk(2))
    a.fail_end(SequenceLost("triton a: sequence 5 needs START"))
    whole = chunk(1) + chunk(2)
    assert rig.backend.end(5).text == final_text(a.url, whole)
    assert a.finals == [(5, whole)]
    assert a.count("end") == 2
    assert b.calls == []
    assert rig.breakers[0].snapshot().consecutive_failures == 0
    assert rig.breakers[0].state is CLOSED


# --- 4. failure at end --------------------------------------------------------------------------


def test_endpoint_error_at_end_replays_on_next_endpoint() -> None:
    rig = make()
    a, b = rig.endpoints
    rig.backend.begin(2)
    for i in range(1, 4):
        rig.backend.feed(2, chunk(i))
    a.fail_end(EndpointError("triton a: deadline exceeded"))
    whole = chunk(1) + chunk(2) + chunk(3)
    assert rig.backend.end(2) == Transcript(final_text(b.url, whole), None, None)
    assert b.keys_of("begin") == [(2,)]
    assert b.finals == [(2, whole)]
    assert b.count("feed") == 1  # the replay, as one chunk
    assert a.finals == []
    assert a.count("end") == 1
    assert rig.breakers[0].state is OPEN
    assert rig.stat("failovers") == 1
    assert rig.stat("replays") == 1
    assert rig.stat("replayed_bytes") == len(whole)
    assert rig.backend.active() == 0


def test_end_on_endpoint_whose_breaker_opened_moves_without_calling_it() -> None:
    rig = make()
    a, b = rig.endpoints
    rig.backend.begin(2)
    rig.backend.feed(2, chunk(1))
    rig.breakers[0].trip("another stream's failure")
    assert rig.backend.end(2).text == final_text(b.url, chunk(1))
    assert a.count("end") == 0
    assert a.keys_of("forget") == [(2,)]


def test_end_failing_everywhere_leaves_nothing_open() -> None:
    # The default breaker config: every replay between the failed ENDs is a success, so the
    # breakers never open and end() bounces A, B, A, B, ... until it gives up.
    rig = make(consecutive_failures=5)
    a, b = rig.endpoints
    rig.backend.begin(1)
    rig.backend.feed(1, chunk(1))
    for ep in rig.endpoints:
        ep.fail_end(EndpointError(f"triton {ep.url}: deadline exceeded"), n=3)
    with pytest.raises(BackendError, match="every recognizer failed at the end"):
        rig.backend.end(1)
    assert rig.backend.active() == 0
    rig.backend.cancel(1)  # what the worker does after a failed end (a no-op here)
    assert 1 not in a.open
    assert 1 not in b.open
    assert rig.stat("triton.active") == 0
    rig.backend.begin(1)  # the stream's next utterance
    assert rig.backend.active() == 1


# --- 5. parking ---------------------------------------------------------------------------------


def park_one(rig: Rig, key: int = 9) -> FakeEndpoint:
    """Open ``key`` on the only endpoint, feed two chunks, the second of which fails it."""
    (a,) = rig.endpoints
    rig.backend.begin(key)
    rig.backend.feed(key, chunk(1))
    a.fail_feed(EndpointError("triton a: connection refused"))
    rig.backend.feed(key, chunk(2))  # kept; nothing usable: parked, no error
    assert rig.stat("parked") == 1
    assert rig.breakers[0].state is OPEN
    assert key not in a.open
    return a


def test_parked_utterance_keeps_audio_without_calls_and_replays_on_next_feed() -> None:
    rig = make(n=1)
    a = park_one(rig)
    before = list(a.calls)
    rig.backend.feed(9, chunk(3))
    rig.backend.feed(9, chunk(4))
    assert a.calls == before  # the breaker is open: no call at all
    assert rig.stat("parked") == 1
    assert rig.backend.active() == 1

    rig.clock.advance(OPEN_S)  # half-open: the next feed places it again
    rig.backend.feed(9, chunk(5))
    whole = b"".join(chunk(i) for i in range(1, 6))
    assert a.chunks(9) == [whole]  # every chunk once, in order, in one replay
    assert rig.stat("parked") == 0
    assert rig.breakers[0].state is CLOSED  # the replay was a good half-open call
    assert rig.stat("failovers") == 1
    assert rig.stat("replays") == 1
    assert rig.stat("replayed_bytes") == len(whole)
    rig.backend.feed(9, chunk(6))
    assert rig.backend.end(9).text == final_text(a.url, whole + chunk(6))
    assert rig.stat("parked") == 0
    assert rig.stat("unavailable") == 0


def test_parked_utterance_placed_again_at_end() -> None:
    rig = make(n=1)
    a = park_one(rig)
    rig.backend.feed(9, chunk(3))
    rig.clock.advance(OPEN_S + 0.5)
    whole = chunk(1) + chunk(2) + chunk(3)
    assert rig.backend.end(9).text == final_text(a.url, whole)
    assert a.finals == [(9, whole)]
    assert a.count("feed") == 1  # the replay
    assert rig.stat("replays") == 1
    assert rig.stat("parked") == 0
    assert rig.backend.active() == 0


def test_parked_utterance_replay_fails_again_stays_parked() -> None:
    rig = make(n=1)
    a = park_one(rig)
    rig.clock.advance(OPEN_S)
    a.down = True
    rig.backend.feed(9, chunk(3))  # the half-open replay fails: parked again, no error
    assert rig.stat("parked") == 1
    snap = rig.breakers[0].snapshot()
    assert snap.state is OPEN
    assert snap.open_period_s == 2 * OPEN_S  # a failed half-open call doubles the period
    a.down = False
    rig.clock.advance(2 * OPEN_S)
    whole = chunk(1) + chunk(2) + chunk(3)
    assert rig.backend.end(9).text == final_text(a.url, whole)
    assert a.finals == [(9, whole)]


def test_parked_utterance_still_down_at_end_is_unavailable() -> None:
    rig = make(n=1)
    a = park_one(rig)
    rig.clock.advance(1.0)
    calls = len(a.calls)
    with pytest.raises(BackendUnavailable) as info:
        rig.backend.end(9)
    assert info.value.retry_after_s == pytest.approx(OPEN_S - 1.0)
    assert len(a.calls) == calls
    assert rig.stat("unavailable") == 1
    assert rig.stat("parked") == 0
    assert rig.backend.active() == 0


# --- 6. replay cap ------------------------------------------------------------------------------


def test_replay_cap_exceeded_then_failure_fails_key_naming_the_limit() -> None:
    rig = make(max_pending_bytes=200)
    a, b = rig.endpoints
    rig.backend.begin(4)
    rig.backend.begin(5)
    rig.backend.feed_many([(4, chunk(1)), (5, chunk(1))])  # 64 bytes each
    rig.backend.feed_many([(4, chunk(2)), (5, chunk(2))])  # 128
    rig.backend.feed(4, chunk(3))  # 192: still kept
    assert rig.stat("replay_cap_hits") == 0
    rig.backend.feed(4, chunk(4))  # 256 > 200: key 4 keeps no audio now
    assert rig.stat("replay_cap_hits") == 1
    rig.backend.feed(4, chunk(5))
    assert rig.stat("replay_cap_hits") == 1  # once per utterance
    assert a.chunks(4) == [chunk(i) for i in range(1, 6)]  # the endpoint still gets it all

    a.fail_feed(EndpointError("triton a: unavailable"), n=2)
    errors = rig.backend.feed_many([(4, chunk(6)), (5, chunk(3))])  # key 5: 192, kept
    assert set(errors) == {4}
    error = errors[4]
    assert isinstance(error, BackendError)
    assert not isinstance(error, BackendUnavailable)
    assert "limits.max_pending_audio_s" in str(error)
    assert b.keys_of("begin") == [(5,)]  # key 5 (under the cap) moved, key 4 did not
    assert b.chunks(5) == [chunk(1) + chunk(2) + chunk(3)]
    assert rig.stat("replays") == 1


def test_replay_cap_exceeded_then_failure_at_end() -> None:
    rig = make(max_pending_bytes=100)
    a, b = rig.endpoints
    rig.backend.begin(4)
    rig.backend.feed(4, chunk(1))
    rig.backend.feed(4, chunk(2))
    a.fail_end(EndpointError("triton a: unavailable"))
    with pytest.raises(BackendError, match=r"limits\.max_pending_audio_s"):
        rig.backend.end(4)
    assert b.calls == []
    assert rig.backend.active() == 0


# --- 7. model errors ----------------------------------------------------------------------------


def test_model_error_on_feed_fails_that_key_only_not_the_endpoint() -> None:
    rig = make()
    a, b = rig.endpoints
    rig.backend.begin(1)
    rig.backend.begin(2)
    model_error = BackendError("asr_streaming: malformed TEXT")
    a.fail_feed(model_error)
    errors = rig.backend.feed_many([(1, chunk(1)), (2, chunk(1))])
    assert errors == {1: model_error}
    assert a.chunks(2) == [chunk(1)]
    snap = rig.breakers[0].snapshot()
    assert snap.state is CLOSED
    assert snap.consecutive_failures == 0
    assert snap.window_failures == 0
    assert rig.stat("failovers") == 0
    assert b.calls == []
    a.fail_feed(model_error)
    with pytest.raises(BackendError) as info:
        rig.backend.feed(1, chunk(2))  # feed raises the key's error
    assert info.value is model_error
    assert rig.breakers[0].state is CLOSED


def test_model_error_at_end_raises_and_does_not_count() -> None:
    rig = make()
    a, b = rig.endpoints
    rig.backend.begin(1)
    rig.backend.feed(1, chunk(1))
    model_error = BackendError("asr_streaming: the END answer is not final")
    a.fail_end(model_error)
    with pytest.raises(BackendError) as info:
        rig.backend.end(1)
    assert info.value is model_error
    assert rig.backend.active() == 0
    assert b.calls == []
    snap = rig.breakers[0].snapshot()
    assert snap.state is CLOSED
    assert snap.consecutive_failures == 0
    assert rig.stat("failovers") == 0
    assert rig.stat("replays") == 0


# --- 8. feed_many batching ----------------------------------------------------------------------


def test_feed_many_sends_one_batch_per_endpoint() -> None:
    rig = make()
    a, b = rig.endpoints
    for key in (1, 2, 3):
        rig.backend.begin(key)
    assert rig.backend.feed_many([(1, chunk(1)), (2, chunk(2)), (3, chunk(3))]) == {}
    assert a.keys_of("feed_many") == [(1, 2, 3)]
    assert a.count("feed") == 0
    assert [a.chunks(k) for k in (1, 2, 3)] == [[chunk(1)], [chunk(2)], [chunk(3)]]
    assert b.calls == []


def test_feed_many_keys_on_different_targets_one_batch_each() -> None:
    rig = make(fallback=True)
    a, b = rig.endpoints
    fallback = rig.fallback
    assert fallback is not None
    rig.backend.begin(1)  # A
    rig.backend.begin(2)  # A
    rig.breakers[0].trip("test")
    rig.backend.begin(3)  # B
    rig.backend.begin(4)  # B
    rig.breakers[1].trip("test")
    rig.backend.begin(5)  # fallback
    rig.clock.advance(OPEN_S)  # both half-open: one call each may go through
    items = [(k, chunk(k)) for k in (1, 3, 5, 2, 4)]
    assert rig.backend.feed_many(items) == {}
    assert a.keys_of("feed_many") == [(1, 2)]
    assert b.keys_of("feed_many") == [(3, 4)]
    assert a.count("feed") == b.count("feed") == 0
    assert fallback.open[5] == [chunk(5)]
    assert rig.breakers[0].state is CLOSED
    assert rig.breakers[1].state is CLOSED
    assert rig.stat("failovers") == 0


def test_feed_many_on_refused_endpoint_moves_keys_without_io() -> None:
    rig = make()
    a, b = rig.endpoints
    rig.backend.begin(1)
    rig.backend.begin(2)
    rig.backend.feed_many([(1, chunk(1)), (2, chunk(1))])
    rig.breakers[0].trip("test")
    before = a.count("feed_many")
    assert rig.backend.feed_many([(1, chunk(2)), (2, chunk(3))]) == {}
    assert a.count("feed_many") == before
    assert b.chunks(1) == [chunk(1) + chunk(2)]
    assert b.chunks(2) == [chunk(1) + chunk(3)]
    assert rig.stat("failovers") == 2
    assert rig.stat("replays") == 2


def test_feed_many_unknown_key_is_an_error_for_that_key() -> None:
    rig = make()
    rig.backend.begin(1)
    errors = rig.backend.feed_many([(1, chunk(1)), (99, chunk(1))])
    assert set(errors) == {99}
    assert isinstance(errors[99], BackendError)
    assert rig.endpoints[0].chunks(1) == [chunk(1)]


# --- 9. maintain() ------------------------------------------------------------------------------


def test_maintain_probes_every_endpoint_once_at_start_and_sweeps_once() -> None:
    stale_asked: list[str] = []

    def is_stale(name: str) -> bool:
        stale_asked.append(name)
        return name.startswith("dead")

    rig = make(is_stale_region=is_stale)
    for ep in rig.endpoints:
        ep.stale_regions = ["dead-1", "alive-2"]
    rig.backend.maintain()
    for ep in rig.endpoints:
        assert ep.count("probe") == 1
        assert ep.count("sweep") == 1
        assert ep.count("reconnect") == 0
    assert stale_asked == ["dead-1", "alive-2"] * 2
    assert rig.stat("endpoints_up") == 2
    assert rig.stat("probes") == 2
    assert rig.stat("probe_failures") == 0
    rig.clock.advance(10.0)
    rig.backend.maintain()  # up and closed: no more probes
    for ep in rig.endpoints:
        assert ep.count("probe") == 1
        assert ep.count("sweep") == 1


def test_maintain_failed_probe_trips_then_half_open_probe_closes() -> None:
    rig = make(n=1, consecutive_failures=5, health_interval_s=1.0, is_stale_region=lambda n: True)
    (a,) = rig.endpoints
    a.fail_probe(EndpointError("triton a: the model is not ready"))
    rig.backend.maintain()
    assert a.count("probe") == 1
    assert rig.breakers[0].state is OPEN  # one failure, but a failed probe trips at once
    assert rig.breakers[0].retry_after_s() == pytest.approx(OPEN_S)
    assert rig.stat("endpoint0") == STATE_CODE[OPEN]
    assert rig.stat("endpoints_up") == 0
    assert rig.stat("probe_failures") == 1
    assert rig.stat("breaker_opened") == 1
    assert a.count("sweep") == 0
    # New utterances do not go to it (no fallback: unavailable).
    with pytest.raises(BackendUnavailable):
        rig.backend.begin(1)

    for _ in range(4):  # open: no probe, however often maintain runs
        rig.clock.advance(1.0)
        rig.backend.maintain()
    assert a.count("probe") == 1
    rig.clock.advance(1.0)  # T0 + 5: half-open
    assert rig.stat("endpoint0") == STATE_CODE[HALF_OPEN]
    rig.backend.maintain()
    assert a.count("probe") == 2
    assert a.count("reconnect") == 1  # a fresh connection before probing again
    assert rig.stat("endpoint0") == STATE_CODE[CLOSED]
    assert rig.stat("endpoints_up") == 1
    assert a.count("sweep") == 1
    rig.clock.advance(5.0)
    rig.backend.maintain()
    assert a.count("probe") == 2
    assert a.count("sweep") == 1


def test_maintain_failed_half_open_probe_doubles_open_period() -> None:
    rig = make(n=1)
    (a,) = rig.endpoints
    a.down = True
    rig.backend.maintain()
    assert rig.breakers[0].state is OPEN
    rig.clock.advance(OPEN_S)
    rig.backend.maintain()
    assert a.count("probe") == 2
    assert rig.breakers[0].state is OPEN
    assert rig.breakers[0].retry_after_s() == pytest.approx(2 * OPEN_S)
    assert rig.stat("probe_failures") == 2


def test_maintain_probes_at_most_every_health_interval() -> None:
    rig = make(n=1, open_s=0.5, health_interval_s=2.0)
    (a,) = rig.endpoints
    a.fail_probe(EndpointError("triton a: unavailable"))
    rig.backend.maintain()  # T0: fails, open until T0 + 0.5
    assert a.count("probe") == 1
    rig.clock.advance(1.0)  # half-open, but the last probe was 1 s ago
    assert rig.breakers[0].state is HALF_OPEN
    rig.backend.maintain()
    assert a.count("probe") == 1
    rig.clock.advance(0.99)
    rig.backend.maintain()
    assert a.count("probe") == 1
    rig.clock.advance(0.01)  # T0 + 2
    rig.backend.maintain()
    assert a.count("probe") == 2
    assert rig.breakers[0].state is CLOSED


def test_maintain_probes_endpoint_that_failed_while_breaker_stayed_closed() -> None:
    rig = make(n=1, consecutive_failures=3, is_stale_region=lambda n: False)
    (a,) = rig.endpoints
    rig.backend.maintain()
    assert a.count("probe") == 1
    assert a.count("sweep") == 1
    rig.backend.begin(1)
    rig.backend.feed(1, chunk(1))
    a.fail_feed(EndpointError("triton a: deadline exceeded"))
    rig.backend.feed(1, chunk(2))  # counted, breaker still closed; parked (no other target)
    assert rig.breakers[0].state is CLOSED
    assert rig.stat("endpoints_up") == 0
    rig.clock.advance(1.0)
    rig.backend.maintain()
    assert a.count("probe") == 2
    assert a.count("reconnect") == 1
    assert a.count("sweep") == 1  # only after the first good probe
    assert rig.stat("endpoints_up") == 1


def test_failed_region_sweep_does_not_stop_the_probe() -> None:
    rig = make(n=1, is_stale_region=lambda n: True)
    (a,) = rig.endpoints

    def failing_sweep(is_stale: Callable[[str], bool]) -> list[str]:
        a.calls.append(("sweep", ()))
        raise EndpointError("triton a: sweep timed out")

    a.sweep_regions = failing_sweep  # type: ignore[method-assign]
    rig.backend.maintain()
    assert a.count("sweep") == 1
    assert rig.breakers[0].state is CLOSED
    assert rig.stat("endpoints_up") == 1


# --- 10. busy fallback --------------------------------------------------------------------------


def test_busy_fallback_during_failover_makes_key_unavailable() -> None:
    rig = make(n=1, fallback=True)
    (a,) = rig.endpoints
    fallback = rig.fallback
    assert fallback is not None
    rig.backend.begin(1)
    rig.backend.feed(1, chunk(1))
    fallback.busy = True
    a.fail_feed(EndpointError("triton a: unavailable"))
    errors = rig.backend.feed_many([(1, chunk(2))])
    assert set(errors) == {1}
    error = errors[1]
    assert isinstance(error, BackendUnavailable)
    assert error.retry_after_s > 0
    assert fallback.open == {}
    assert rig.stat("fallback_utterances") == 0


def test_busy_fallback_during_begin_propagates_busy() -> None:
    rig = make(n=1, fallback=True)
    fallback = rig.fallback
    assert fallback is not None
    rig.breakers[0].trip("test")
    fallback.busy = True
    with pytest.raises(BackendBusy):
        rig.backend.begin(1)
    assert rig.backend.active() == 0
    assert rig.stat("unavailable") == 0
    fallback.busy = False
    rig.backend.begin(1)  # the worker retries later: the key is free
    assert fallback.begun == [1]


# --- 11. cancel and close -----------------------------------------------------------------------


def test_cancel_on_healthy_endpoint_cancels() -> None:
    rig = make()
    a, _ = rig.endpoints
    rig.backend.begin(1)
    rig.backend.feed(1, chunk(1))
    rig.backend.cancel(1)
    assert a.keys_of("cancel") == [(1,)]
    assert a.count("forget") == 0
    assert rig.backend.active() == 0
    rig.backend.cancel(1)  # unknown key: nothing
    assert a.keys_of("cancel") == [(1,)]


def test_cancel_on_down_endpoint_forgets() -> None:
    rig = make()
    a, _ = rig.endpoints
    rig.backend.begin(1)
    rig.backend.feed(1, chunk(1))
    rig.breakers[0].trip("test")
    rig.backend.cancel(1)
    assert a.keys_of("forget") == [(1,)]
    assert a.count("cancel") == 0
    assert rig.backend.active() == 0


def test_cancel_after_failure_with_breaker_still_closed_forgets() -> None:
    rig = make(consecutive_failures=3)
    a, b = rig.endpoints
    rig.backend.begin(1)
    rig.backend.begin(2)
    a.fail_feed(EndpointError("triton a: deadline exceeded"))
    rig.backend.feed_many([(1, chunk(1)), (2, chunk(1))])  # key 1 moved to B, key 2 stays
    assert rig.breakers[0].state is CLOSED
    assert b.chunks(1) == [chunk(1)]
    rig.backend.cancel(2)
    assert a.keys_of("forget") == [(1,), (2,)]
    assert a.count("cancel") == 0
    rig.backend.cancel(1)
    assert b.keys_of("cancel") == [(1,)]


def test_close_closes_every_endpoint_and_fallback() -> None:
    rig = make(fallback=True)
    a, b = rig.endpoints
    fallback = rig.fallback
    assert fallback is not None
    rig.backend.begin(1)  # A
    rig.backend.feed(1, chunk(1))
    rig.backend.close()
    assert a.keys_of("cancel") == [(1,)]
    assert a.count("close") == 1
    assert b.count("close") == 1
    assert fallback.closed
    assert rig.backend.active() == 0


def test_no_endpoint_is_an_error() -> None:
    with pytest.raises(BackendError):
        FailoverBackend([], BreakerConfig())


# --- 12. CircuitBreaker.trip --------------------------------------------------------------------


class TripHarness:
    def __init__(self) -> None:
        self.clock = Clock()
        self.changes: list[tuple[str, BreakerState, BreakerState, str]] = []
        self.breaker = CircuitBreaker(
            "ep",
            BreakerConfig(consecutive_failures=5, open_s=2.0, max_open_s=5.0),
            clock=self.clock,
            on_change=lambda *change: self.changes.append(change),
        )


def test_trip_closed_opens_for_open_s() -> None:
    h = TripHarness()
    h.breaker.trip("probe failed: refused")
    snap = h.breaker.snapshot()
    assert snap.state is OPEN
    assert snap.open_until == pytest.approx(T0 + 2.0)
    assert snap.retry_after_s == pytest.approx(2.0)
    assert snap.last_failure_reason == "probe failed: refused"
    assert h.changes == [("ep", CLOSED, OPEN, "probe failed: refused")]
    assert not h.breaker.allow()


def test_trip_half_open_reopens_with_doubled_period_capped() -> None:
    h = TripHarness()
    h.breaker.trip("first")
    h.clock.advance(2.0)
    assert h.breaker.state is HALF_OPEN
    h.breaker.trip("second")
    snap = h.breaker.snapshot()
    assert snap.state is OPEN
    assert snap.open_period_s == pytest.approx(4.0)
    assert snap.retry_after_s == pytest.approx(4.0)
    h.clock.advance(4.0)
    assert h.breaker.state is HALF_OPEN
    assert h.breaker.allow()  # a probe in flight: trip counts as its failure
    h.breaker.trip("third")
    snap = h.breaker.snapshot()
    assert snap.open_period_s == pytest.approx(5.0)  # max_open_s
    assert snap.probes_in_flight == 0
    assert [(old, new, why) for _, old, new, why in h.changes] == [
        (CLOSED, OPEN, "first"),
        (OPEN, HALF_OPEN, "open period of 2s elapsed"),
        (HALF_OPEN, OPEN, "second"),
        (OPEN, HALF_OPEN, "open period of 4s elapsed"),
        (HALF_OPEN, OPEN, "third"),
    ]


def test_trip_open_changes_nothing() -> None:
    h = TripHarness()
    h.breaker.trip("first")
    h.clock.advance(1.0)
    h.breaker.trip("again")
    snap = h.breaker.snapshot()
    assert snap.state is OPEN
    assert snap.open_until == pytest.approx(T0 + 2.0)
    assert snap.open_period_s == pytest.approx(2.0)
    assert len(h.changes) == 1
    h.clock.advance(1.0)
    assert h.breaker.state is HALF_OPEN


def test_trip_then_success_closes_and_resets_period() -> None:
    h = TripHarness()
    h.breaker.trip("down")
    h.clock.advance(2.0)
    assert h.breaker.allow()
    h.breaker.record_success()
    assert h.breaker.state is CLOSED
    h.breaker.trip("down again")
    assert h.breaker.snapshot().open_period_s == pytest.approx(2.0)
