"""CircuitBreaker: trips, open/half-open/closed transitions, backoff, probes, counters, config."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from workers.breaker import (
    BreakerConfig,
    BreakerSnapshot,
    BreakerState,
    CircuitBreaker,
)

CLOSED = BreakerState.CLOSED
OPEN = BreakerState.OPEN
HALF_OPEN = BreakerState.HALF_OPEN


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, dt: float) -> None:
        self.now += dt


Change = tuple[str, BreakerState, BreakerState, str]


class Harness:
    def __init__(self, **config: Any) -> None:
        self.clock = FakeClock()
        self.changes: list[Change] = []
        self.config = msgspec.convert(config, BreakerConfig)
        self.breaker = CircuitBreaker(
            "triton-a", self.config, clock=self.clock, on_change=self._on_change
        )

    def _on_change(self, name: str, old: BreakerState, new: BreakerState, reason: str) -> None:
        self.changes.append((name, old, new, reason))

    def transitions(self) -> list[tuple[BreakerState, BreakerState]]:
        return [(old, new) for _, old, new, _ in self.changes]

    def succeed(self, n: int = 1) -> None:
        for _ in range(n):
            assert self.breaker.allow()
            self.breaker.record_success()

    def fail(self, n: int = 1, reason: str = "boom") -> None:
        for _ in range(n):
            assert self.breaker.allow()
            self.breaker.record_failure(reason)

    def trip(self) -> None:
        self.fail(self.config.consecutive_failures)
        assert self.breaker.state is OPEN


def make(**config: Any) -> Harness:
    return Harness(**config)


# -- closed --------------------------------------------------------------------------------


def test_closed_stays_closed_under_successes() -> None:
    h = make()
    for _ in range(1000):
        h.succeed()
        h.clock.advance(0.001)
    assert h.breaker.state is CLOSED
    assert h.breaker.retry_after_s() == 0.0
    assert h.changes == []
    assert h.breaker.counters()["successes"] == 1000


def test_consecutive_failures_trip_exactly_at_n() -> None:
    h = make(consecutive_failures=3, min_calls=1000)
    h.fail(2)
    assert h.breaker.state is CLOSED
    h.fail(1, reason="deadline exceeded")
    assert h.breaker.state is OPEN
    assert h.changes == [("triton-a", CLOSED, OPEN, "3 consecutive failures: deadline exceeded")]
    assert h.breaker.snapshot().consecutive_failures == 3


def test_success_resets_consecutive_count() -> None:
    h = make(consecutive_failures=3, min_calls=1000)
    for _ in range(10):
        h.fail(2)
        h.succeed()
    assert h.breaker.state is CLOSED
    assert h.breaker.snapshot().consecutive_failures == 0
    h.fail(2)
    assert h.breaker.snapshot().consecutive_failures == 2
    h.fail(1)
    assert h.breaker.state is OPEN


def test_failure_rate_trip_needs_min_calls() -> None:
    # Alternate failure/success: the rate is 0.5 but never 3 failures in a row.
    h = make(consecutive_failures=3, failure_rate=0.5, window_s=10.0, min_calls=10)
    for _ in range(4):
        h.fail()
        h.succeed()
    h.fail()  # 9 results, 5 failures: rate 0.56 but below min_calls
    assert h.breaker.state is CLOSED
    h.succeed()  # 10 results, rate 0.5, but a success never trips
    assert h.breaker.state is CLOSED
    h.fail(reason="unavailable")  # 11 results, 6 failures: trips
    assert h.breaker.state is OPEN
    assert h.changes == [
        ("triton-a", CLOSED, OPEN, "failure rate 6/11 in 10s >= 0.5: unavailable"),
    ]


def test_failure_rate_below_threshold_stays_closed() -> None:
    h = make(consecutive_failures=100, failure_rate=0.5, min_calls=10)
    for _ in range(50):
        h.fail()
        h.succeed(2)
    assert h.breaker.state is CLOSED
    snap = h.breaker.snapshot()
    assert snap.window_calls == 150
    assert snap.window_failures == 50
    assert snap.failure_rate == pytest.approx(1 / 3)


def test_failure_rate_exact_threshold_trips() -> None:
    # 3/10 >= 0.3 must hold despite 0.3 * 10 == 3.0000000000000004 in floating point.
    h = make(consecutive_failures=100, failure_rate=0.3, min_calls=10)
    h.succeed(7)
    h.fail(2)
    assert h.breaker.state is CLOSED
    h.fail(1)
    assert h.breaker.state is OPEN


def test_old_calls_fall_out_of_window() -> None:
    h = make(consecutive_failures=100, failure_rate=0.5, window_s=10.0, min_calls=10)
    h.fail(9)  # 9 failures at t0
    h.clock.advance(10.0)  # exactly window_s later: they are out of the window
    h.fail(1)
    assert h.breaker.state is CLOSED
    snap = h.breaker.snapshot()
    assert (snap.window_calls, snap.window_failures) == (1, 1)
    h.clock.advance(5.0)
    h.succeed(4)
    h.fail(4)  # 9 in window (5 failures): min_calls not reached
    assert h.breaker.state is CLOSED
    h.clock.advance(5.0)  # the first failure (t0+10) falls out; 8 left
    h.fail(1)
    snap = h.breaker.snapshot()
    assert (snap.window_calls, snap.window_failures) == (9, 5)
    assert h.breaker.state is CLOSED
    h.fail(1)  # 10 results, 6 failures
    assert h.breaker.state is OPEN


def test_window_is_pruned_lazily_and_bounded() -> None:
    h = make(window_s=1.0, min_calls=1000)
    for _ in range(10_000):
        h.succeed()
        h.clock.advance(0.01)
    # Only the last second's results remain (100 of them, give or take float rounding).
    assert 99 <= h.breaker.snapshot().window_calls <= 101
    h.clock.advance(1.0)
    assert h.breaker.snapshot().window_calls == 0
    assert h.breaker.snapshot().failure_rate == 0.0


# -- open ----------------------------------------------------------------------------------


def test_open_rejects_counts_and_counts_down() -> None:
    h = make(consecutive_failures=2, open_s=2.0)
    h.trip()
    b = h.breaker
    assert b.retry_after_s() == pytest.approx(2.0)
    for _ in range(5):
        assert not b.allow()
    assert b.counters()["rejected"] == 5
    h.clock.advance(0.5)
    assert b.retry_after_s() == pytest.approx(1.5)
    assert not b.allow()
    h.clock.advance(1.4)
    assert b.retry_after_s() == pytest.approx(0.1)
    assert b.state is OPEN
    assert not b.allow()
    assert b.counters()["rejected"] == 7
    snap = b.snapshot()
    assert snap.state is OPEN
    assert snap.open_until == pytest.approx(h.clock.now + 0.1)


def test_half_open_after_open_period() -> None:
    h = make(consecutive_failures=2, open_s=2.0)
    h.trip()
    h.clock.advance(1.999)
    assert h.breaker.state is OPEN
    h.clock.advance(0.001)
    assert h.breaker.state is HALF_OPEN  # lazily, on reading the property
    assert h.breaker.retry_after_s() == 0.0
    assert h.breaker.snapshot().open_until is None
    assert h.changes[-1] == ("triton-a", OPEN, HALF_OPEN, "open period of 2s elapsed")


def test_half_open_probes_are_bounded() -> None:
    h = make(consecutive_failures=1, open_s=1.0, half_open_probes=2, half_open_successes=3)
    h.trip()
    h.clock.advance(1.0)
    b = h.breaker
    assert b.allow()
    assert b.allow()
    assert not b.allow()
    assert not b.allow()
    assert b.snapshot().probes_in_flight == 2
    assert b.retry_after_s() == pytest.approx(1.0)  # the oldest probe's deadline
    b.record_success()  # frees a slot, one success of three
    assert b.state is HALF_OPEN
    assert b.retry_after_s() == 0.0
    assert b.allow()
    assert not b.allow()
    b.record_success()
    b.record_success()
    assert b.state is CLOSED
    c = b.counters()
    assert c["rejected"] == 3
    assert c["calls"] == 1 + 3


def test_probe_success_closes_and_resets_backoff() -> None:
    h = make(consecutive_failures=1, open_s=1.0, max_open_s=30.0)
    h.trip()
    h.clock.advance(1.0)
    h.fail(reason="still down")  # probe fails: open for 2 s
    assert h.breaker.state is OPEN
    assert h.breaker.retry_after_s() == pytest.approx(2.0)
    h.clock.advance(2.0)
    h.succeed()  # probe succeeds: closed
    assert h.breaker.state is CLOSED
    assert h.changes[-1] == ("triton-a", HALF_OPEN, CLOSED, "1 probe success")
    snap = h.breaker.snapshot()
    assert (snap.consecutive_failures, snap.window_calls, snap.open_period_s) == (0, 0, 1.0)
    h.trip()  # the next trip opens for open_s again
    assert h.breaker.retry_after_s() == pytest.approx(1.0)


def test_several_successes_needed_to_close() -> None:
    h = make(consecutive_failures=1, half_open_successes=3)
    h.trip()
    h.clock.advance(1.0)
    h.succeed(2)
    assert h.breaker.state is HALF_OPEN
    h.succeed(1)
    assert h.breaker.state is CLOSED
    assert h.changes[-1][3] == "3 probe successes"


def test_probe_failure_reopens_with_doubled_period_capped() -> None:
    h = make(consecutive_failures=1, open_s=1.0, max_open_s=5.0)
    h.trip()
    periods = []
    for _ in range(5):
        period = h.breaker.retry_after_s()
        periods.append(period)
        h.clock.advance(period - 0.01)
        assert not h.breaker.allow()
        h.clock.advance(0.01)
        h.fail(reason="refused")
        assert h.breaker.state is OPEN
    periods.append(h.breaker.retry_after_s())
    assert periods == pytest.approx([1.0, 2.0, 4.0, 5.0, 5.0, 5.0])
    assert h.changes[2] == ("triton-a", HALF_OPEN, OPEN, "probe failed: refused")


def test_on_change_transitions_and_reasons() -> None:
    h = make(consecutive_failures=2, open_s=1.0)
    h.fail(2, reason="connection refused")
    h.clock.advance(1.0)
    h.fail(reason="connection refused")
    h.clock.advance(2.0)
    h.succeed()
    assert h.changes == [
        ("triton-a", CLOSED, OPEN, "2 consecutive failures: connection refused"),
        ("triton-a", OPEN, HALF_OPEN, "open period of 1s elapsed"),
        ("triton-a", HALF_OPEN, OPEN, "probe failed: connection refused"),
        ("triton-a", OPEN, HALF_OPEN, "open period of 2s elapsed"),
        ("triton-a", HALF_OPEN, CLOSED, "1 probe success"),
    ]


def test_failure_without_reason() -> None:
    h = make(consecutive_failures=1)
    assert h.breaker.allow()
    h.breaker.record_failure()
    assert h.changes == [("triton-a", CLOSED, OPEN, "1 consecutive failures")]


def test_lazy_evaluation_replays_every_transition() -> None:
    """Nobody looks for a long time: every due transition happens, at the time it was due."""
    h = make(consecutive_failures=1, open_s=1.0, max_open_s=8.0)
    h.trip()
    h.clock.advance(1.0)
    assert h.breaker.allow()  # a probe, never answered
    # The probe times out at +1 s (re-open for 2 s), half-open again at +3 s; nothing else.
    h.clock.advance(100.0)
    assert h.breaker.state is HALF_OPEN
    assert h.transitions() == [
        (CLOSED, OPEN),
        (OPEN, HALF_OPEN),
        (HALF_OPEN, OPEN),
        (OPEN, HALF_OPEN),
    ]


def test_counters() -> None:
    h = make(consecutive_failures=2, open_s=1.0)
    h.succeed(3)
    h.fail(2)
    assert not h.breaker.allow()
    assert not h.breaker.allow()
    h.clock.advance(1.0)
    h.fail()  # probe fails
    h.clock.advance(2.0)
    h.succeed()  # probe closes
    assert h.breaker.counters() == {
        "calls": 7,
        "successes": 4,
        "failures": 3,
        "rejected": 2,
        "opened": 2,
        "half_opened": 2,
        "closed": 1,
        "probes_timed_out": 0,
    }


def test_snapshot_is_encodable() -> None:
    h = make(consecutive_failures=2)
    h.fail(2, reason="timeout")
    snap = h.breaker.snapshot()
    assert isinstance(snap, BreakerSnapshot)
    decoded = msgspec.json.decode(msgspec.json.encode(snap))
    assert decoded["state"] == "open"
    assert decoded["consecutive_failures"] == 2
    assert decoded["failure_rate"] == 1.0
    assert decoded["last_failure_reason"] == "timeout"
    assert decoded["retry_after_s"] == pytest.approx(1.0)


# -- lost probes ---------------------------------------------------------------------------


def test_forgotten_probe_times_out_and_reopens() -> None:
    h = make(consecutive_failures=1, open_s=1.0)
    h.trip()
    h.clock.advance(1.0)
    b = h.breaker
    assert b.allow()  # the caller never records a result
    assert not b.allow()
    h.clock.advance(0.999)
    assert b.state is HALF_OPEN
    assert b.retry_after_s() == pytest.approx(0.001)
    h.clock.advance(0.001)
    assert b.state is OPEN  # timed out: counts as a failed probe, doubled period
    assert b.retry_after_s() == pytest.approx(2.0)
    assert b.counters()["probes_timed_out"] == 1
    assert h.changes[-1] == (
        "triton-a",
        HALF_OPEN,
        OPEN,
        "probe timed out after 1s without a result",
    )
    h.clock.advance(2.0)
    h.succeed()  # not wedged: the next probe goes through and closes
    assert b.state is CLOSED


def test_probe_timeout_follows_backoff_by_default() -> None:
    h = make(consecutive_failures=1, open_s=1.0)
    h.trip()
    h.clock.advance(1.0)
    h.fail()  # open for 2 s
    h.clock.advance(2.0)
    assert h.breaker.allow()
    h.clock.advance(1.5)  # more than open_s, less than the 2 s open period
    assert h.breaker.state is HALF_OPEN
    h.clock.advance(0.5)
    assert h.breaker.state is OPEN


def test_probe_timeout_configurable() -> None:
    h = make(consecutive_failures=1, open_s=1.0, probe_timeout_s=5.0)
    h.trip()
    h.clock.advance(1.0)
    assert h.breaker.allow()
    h.clock.advance(4.9)
    assert h.breaker.state is HALF_OPEN  # a slow but live probe is not cut short
    h.breaker.record_success()
    assert h.breaker.state is CLOSED


def test_late_result_of_timed_out_probe_does_not_move_state() -> None:
    h = make(consecutive_failures=1, open_s=1.0)
    h.trip()
    h.clock.advance(1.0)
    assert h.breaker.allow()
    h.clock.advance(1.5)  # the probe timed out 0.5 s ago: open for 2 s from then
    assert h.breaker.state is OPEN
    assert h.breaker.retry_after_s() == pytest.approx(1.5)
    h.breaker.record_success()  # the late answer
    assert h.breaker.state is OPEN
    h.clock.advance(1.5)  # half-open again, no probe outstanding
    assert h.breaker.state is HALF_OPEN
    h.breaker.record_failure("late")  # stale: no probe outstanding
    assert h.breaker.state is HALF_OPEN
    c = h.breaker.counters()
    assert (c["successes"], c["failures"]) == (1, 2)
    h.succeed()
    assert h.breaker.state is CLOSED


def test_results_recorded_while_open_do_not_close() -> None:
    # A call allowed before the trip (concurrent use) answering after it.
    h = make(consecutive_failures=1)
    assert h.breaker.allow()
    h.fail()
    h.breaker.record_success()
    assert h.breaker.state is OPEN


def test_on_change_exception_leaves_state_consistent() -> None:
    def explode(*_: object) -> None:
        raise RuntimeError("logger broke")

    clock = FakeClock()
    b = CircuitBreaker("x", BreakerConfig(consecutive_failures=1), clock=clock, on_change=explode)
    assert b.allow()
    with pytest.raises(RuntimeError):
        b.record_failure()
    assert b.state is OPEN
    assert b.counters()["opened"] == 1
    assert not b.allow()


# -- config --------------------------------------------------------------------------------


def test_config_defaults() -> None:
    c = msgspec.convert({}, BreakerConfig)
    assert c == BreakerConfig()
    assert (c.consecutive_failures, c.failure_rate, c.window_s, c.min_calls) == (5, 0.5, 10.0, 20)
    assert (c.open_s, c.max_open_s, c.half_open_probes, c.half_open_successes) == (1.0, 30.0, 1, 1)
    assert c.probe_timeout_s is None


@pytest.mark.parametrize(
    "bad",
    [
        {"consecutive_failures": 0},
        {"consecutive_failures": -1},
        {"consecutive_failures": 1.5},
        {"failure_rate": 0.0},
        {"failure_rate": 1.01},
        {"failure_rate": float("nan")},
        {"window_s": 0.0},
        {"window_s": float("inf")},
        {"min_calls": 0},
        {"open_s": 0.0},
        {"open_s": -1.0},
        {"max_open_s": 0.0},
        {"open_s": 5.0, "max_open_s": 2.0},
        {"half_open_probes": 0},
        {"half_open_successes": 0},
        {"probe_timeout_s": 0.0},
        {"consecutive_failures": True},
        {"open_s": "1s"},
        {"unknown_field": 1},
    ],
)
def test_config_rejects_nonsense(bad: dict[str, Any]) -> None:
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert(bad, BreakerConfig)


def test_config_accepts_edges() -> None:
    c = msgspec.convert(
        {"failure_rate": 1.0, "open_s": 2, "max_open_s": 2, "probe_timeout_s": 3},
        BreakerConfig,
    )
    assert (c.failure_rate, c.open_s, c.max_open_s, c.probe_timeout_s) == (1.0, 2.0, 2.0, 3.0)


def test_config_from_toml() -> None:
    import tomllib

    raw = tomllib.loads("consecutive_failures = 3\nopen_s = 0.5\nmax_open_s = 8\n")
    c = msgspec.convert(raw, BreakerConfig)
    assert (c.consecutive_failures, c.open_s, c.max_open_s) == (3, 0.5, 8.0)


def test_default_clock_is_monotonic() -> None:
    b = CircuitBreaker("real", BreakerConfig())
    assert b.allow()
    b.record_success()
    assert b.state is CLOSED
    assert b.retry_after_s() == 0.0
