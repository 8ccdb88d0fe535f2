"""Circuit breaker for one inference endpoint.

State machine::

                 trip (consecutive failures or failure rate)
      CLOSED ------------------------------------------------> OPEN
        ^                                                      |  ^
        | half_open_successes probe successes    open period   |  | a probe fails or times out
        |                                        has passed    v  | (open period doubles, capped)
        +-------------------------------------------------- HALF_OPEN

* CLOSED: every call is allowed. The breaker trips to OPEN when ``consecutive_failures``
  results in a row were failures, or when, over the last ``window_s`` seconds, at least
  ``min_calls`` results were recorded and the share of failures among them reached
  ``failure_rate``. Only a failure can trip it, so the check runs in :meth:`record_failure`.
* OPEN: every call is rejected (and counted as ``rejected``) until the open period has
  passed; then the breaker is HALF_OPEN. The first open period is ``open_s``; each re-open
  after a failed half-open doubles it, up to ``max_open_s``; closing resets it to ``open_s``.
* HALF_OPEN: at most ``half_open_probes`` calls (probes) may be in flight. A probe failure
  re-opens the breaker (with the doubled period); ``half_open_successes`` probe successes
  close it, which also clears the consecutive-failure count and the failure-rate window.

Time transitions are lazy: nothing runs in the background. ``allow()``, ``record_*()``,
``retry_after_s()``, ``state`` and ``snapshot()`` first bring the state up to date with the
injected monotonic clock, replaying every transition that fell due since the last call at
the time it fell due (so a breaker nobody looked at for a minute is in the state it would be
in had it been polled all along, and ``on_change`` sees each step).

Lost probes: a call allowed in HALF_OPEN whose result is never recorded (the caller forgot,
or an exception skipped ``record_*``) must not hold its slot for ever. Probes therefore time
out: a probe with no result after ``probe_timeout_s`` (by default the open period that
preceded this half-open, so ``open_s`` on the first one) counts as a failed probe, re-opens
the breaker with reason ``"probe timed out ..."`` and is counted in ``probes_timed_out``.
There is no ``release_probe()``: the caller's I/O sits between ``allow()`` and
``record_*()``, and a timed-out request is a failure anyway. Set ``probe_timeout_s`` at or
above the per-request timeout of the transport so a slow but live probe is not cut short.

Usage and threading model: one breaker per endpoint, owned by one infer worker and used from
one thread (the worker's loop). The caller does the I/O itself::

    if not breaker.allow():
        fail over, or Error(code="inference_unavailable",
                            retry_after_ms=round(breaker.retry_after_s() * 1000))
    try:
        result = endpoint.infer(...)
    except TransportError as exc:
        breaker.record_failure(str(exc))
        ...
    else:
        breaker.record_success()

Methods never block, sleep, do I/O or take locks; no lock is ever held across the caller's
I/O. The class is not thread-safe: to share one breaker between threads, wrap each method
call (never the I/O) in one lock. ``on_change(name, old, new, reason)`` is called
synchronously, after the new state is fully in place, on every state change; it is meant for
logging and metrics, should be quick and should not raise (an exception propagates to the
caller of the method that caused the change, with the breaker left consistent).

Limits:

* ``allow()`` returns a bool, not a token, so results are not tied to the call that produced
  them. In HALF_OPEN a result is counted against the oldest outstanding probe; a result that
  arrives when no probe is outstanding (a late answer from a probe that already timed out,
  or from a call allowed before the breaker tripped) is counted in the totals and the window
  but does not move the state. A late result arriving while a newer probe is outstanding is
  indistinguishable from that probe's result.
* The failure-rate window keeps one ``(time, ok)`` entry per result recorded in the last
  ``window_s`` seconds (pruned lazily, O(1) amortized per call): memory grows with the call
  rate, about 100 bytes per entry (10,000 entries at 1,000 results/s over 10 s).
* Only ``msgspec.convert``/``msgspec.decode`` enforce the field constraints of
  :class:`BreakerConfig`; constructing it directly checks only the cross-field rule
  (``max_open_s >= open_s``).
* Whether a result is a failure is the caller's decision: a malformed response from a live
  server is usually not an endpoint failure and should not be recorded as one.
"""

from __future__ import annotations

import enum
import time
from collections import deque
from collections.abc import Callable
from typing import Annotated

import msgspec
from msgspec import Meta

__all__ = [
    "BreakerConfig",
    "BreakerSnapshot",
    "BreakerState",
    "ChangeCallback",
    "CircuitBreaker",
]


class BreakerConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Trip thresholds, open periods and half-open limits of one endpoint's breaker."""

    # Trip after this many failures in a row (while closed).
    consecutive_failures: Annotated[int, Meta(ge=1, le=1_000_000)] = 5
    # Trip when, over the last window_s seconds, at least min_calls results were recorded and
    # the share of failures among them is at least failure_rate.
    failure_rate: Annotated[float, Meta(gt=0.0, le=1.0)] = 0.5
    window_s: Annotated[float, Meta(gt=0.0, le=3600.0)] = 10.0
    min_calls: Annotated[int, Meta(ge=1, le=1_000_000)] = 20
    # First open period; doubled on each re-open after a failed half-open, capped at
    # max_open_s, reset by a close.
    open_s: Annotated[float, Meta(gt=0.0, le=3600.0)] = 1.0
    max_open_s: Annotated[float, Meta(gt=0.0, le=3600.0)] = 30.0
    # Calls allowed in flight at once while half-open, and probe successes needed to close.
    half_open_probes: Annotated[int, Meta(ge=1, le=10_000)] = 1
    half_open_successes: Annotated[int, Meta(ge=1, le=10_000)] = 1
    # A probe with no recorded result after this long counts as a failed probe. None: the
    # open period that preceded this half-open (open_s the first time, then the backoff).
    probe_timeout_s: Annotated[float, Meta(gt=0.0, le=3600.0)] | None = None

    def __post_init__(self) -> None:
        if self.max_open_s < self.open_s:
            raise ValueError(
                f"max_open_s ({self.max_open_s}) must be at least open_s ({self.open_s})"
            )


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


ChangeCallback = Callable[[str, BreakerState, BreakerState, str], None]


class BreakerSnapshot(msgspec.Struct, kw_only=True):
    """Point-in-time view for status reports (msgspec-encodable)."""

    name: str
    state: BreakerState
    consecutive_failures: int
    # Results recorded in the last window_s seconds, failures among them, and their share.
    window_calls: int
    window_failures: int
    failure_rate: float
    # Current open period (the one in force when OPEN, the next base for backoff otherwise).
    open_period_s: float
    # In the clock's timebase (time.monotonic by default); None unless OPEN.
    open_until: float | None
    retry_after_s: float
    probes_in_flight: int
    last_failure_reason: str


class CircuitBreaker:
    """Per-endpoint breaker; see the module docstring for the state machine and its limits."""

    def __init__(
        self,
        name: str,
        config: BreakerConfig,
        clock: Callable[[], float] = time.monotonic,
        on_change: ChangeCallback | None = None,
    ) -> None:
        self.name = name
        self.config = config
        self._clock = clock
        self._on_change = on_change
        self._state = BreakerState.CLOSED
        self._consecutive = 0
        # (time, ok) per recorded result, oldest first; _window_failures counts the not-ok ones.
        self._window: deque[tuple[float, bool]] = deque()
        self._window_failures = 0
        self._open_period = config.open_s
        self._open_until = 0.0  # meaningful while OPEN
        # Start times of the outstanding half-open probes, oldest first.
        self._probes: deque[float] = deque()
        self._probe_timeout = config.open_s  # set on each entry to HALF_OPEN
        self._probe_successes = 0
        self._last_failure_reason = ""
        self._calls = 0
        self._successes = 0
        self._failures = 0
        self._rejected = 0
        self._opened = 0
        self._half_opened = 0
        self._closed = 0
        self._probes_timed_out = 0

    # -- queries -------------------------------------------------------------------------

    @property
    def state(self) -> BreakerState:
        self._advance(self._clock())
        return self._state

    def retry_after_s(self) -> float:
        """Seconds until a call may be allowed; 0 if one would be allowed now.

        OPEN: time left in the open period. HALF_OPEN with every probe slot taken: time until
        the oldest probe's deadline, by which it has either answered or timed out (which
        re-opens the breaker; ask again then for the new period).
        """
        now = self._clock()
        self._advance(now)
        return self._retry_after(now)

    def _retry_after(self, now: float) -> float:
        if self._state is BreakerState.OPEN:
            return max(0.0, self._open_until - now)
        if self._state is BreakerState.HALF_OPEN and not self._probe_slot_free():
            return max(0.0, self._probes[0] + self._probe_timeout - now)
        return 0.0

    def counters(self) -> dict[str, int]:
        """Totals since creation. ``calls`` counts allowed calls, ``rejected`` refused ones."""
        return {
            "calls": self._calls,
            "successes": self._successes,
            "failures": self._failures,
            "rejected": self._rejected,
            "opened": self._opened,
            "half_opened": self._half_opened,
            "closed": self._closed,
            "probes_timed_out": self._probes_timed_out,
        }

    def snapshot(self) -> BreakerSnapshot:
        now = self._clock()
        self._advance(now)
        self._prune(now)
        n = len(self._window)
        return BreakerSnapshot(
            name=self.name,
            state=self._state,
            consecutive_failures=self._consecutive,
            window_calls=n,
            window_failures=self._window_failures,
            failure_rate=self._window_failures / n if n else 0.0,
            open_period_s=self._open_period,
            open_until=self._open_until if self._state is BreakerState.OPEN else None,
            retry_after_s=self._retry_after(now),
            probes_in_flight=len(self._probes),
            last_failure_reason=self._last_failure_reason,
        )

    # -- the call protocol ---------------------------------------------------------------

    def allow(self) -> bool:
        """May a call go to the endpoint now? Each True must be followed by one record_*()."""
        now = self._clock()
        self._advance(now)
        if self._state is BreakerState.CLOSED:
            self._calls += 1
            return True
        if self._state is BreakerState.HALF_OPEN and self._probe_slot_free():
            self._probes.append(now)
            self._calls += 1
            return True
        self._rejected += 1
        return False

    def record_success(self) -> None:
        now = self._clock()
        self._advance(now)
        self._successes += 1
        self._consecutive = 0
        self._push(now, True)
        if self._state is BreakerState.HALF_OPEN and self._probes:
            self._probes.popleft()
            self._probe_successes += 1
            if self._probe_successes >= self.config.half_open_successes:
                self._open_period = self.config.open_s
                self._window.clear()
                self._window_failures = 0
                self._probes.clear()
                self._closed += 1
                n = self._probe_successes
                self._transition(BreakerState.CLOSED, f"{n} probe success{'es' if n != 1 else ''}")

    def record_failure(self, reason: str = "") -> None:
        now = self._clock()
        self._advance(now)
        self._failures += 1
        self._consecutive += 1
        self._last_failure_reason = reason
        self._push(now, False)
        suffix = f": {reason}" if reason else ""
        if self._state is BreakerState.CLOSED:
            cfg = self.config
            if self._consecutive >= cfg.consecutive_failures:
                self._open_period = cfg.open_s
                self._open(now, f"{self._consecutive} consecutive failures{suffix}")
                return
            self._prune(now)
            n = len(self._window)
            if n >= cfg.min_calls and self._window_failures / n >= cfg.failure_rate:
                self._open_period = cfg.open_s
                self._open(
                    now,
                    f"failure rate {self._window_failures}/{n} in {cfg.window_s:g}s"
                    f" >= {cfg.failure_rate:g}{suffix}",
                )
        elif self._state is BreakerState.HALF_OPEN and self._probes:
            self._reopen(now, f"probe failed{suffix}")

    def trip(self, reason: str) -> None:
        """Open now, whatever the counts: the caller knows the endpoint is down (a failed
        health probe). In OPEN nothing changes; in HALF_OPEN it is a failed probe (re-open with
        the doubled period); in CLOSED it opens for ``open_s``."""
        now = self._clock()
        self._advance(now)
        self._last_failure_reason = reason
        if self._state is BreakerState.HALF_OPEN:
            self._reopen(now, reason)
        elif self._state is BreakerState.CLOSED:
            self._open_period = self.config.open_s
            self._open(now, reason)

    # -- internals -----------------------------------------------------------------------

    def _probe_slot_free(self) -> bool:
        return len(self._probes) < self.config.half_open_probes

    def _push(self, now: float, ok: bool) -> None:
        self._window.append((now, ok))
        if not ok:
            self._window_failures += 1
        self._prune(now)

    def _prune(self, now: float) -> None:
        horizon = now - self.config.window_s
        window = self._window
        while window and window[0][0] <= horizon:
            _, ok = window.popleft()
            if not ok:
                self._window_failures -= 1

    def _advance(self, now: float) -> None:
        """Apply the time-driven transitions due by ``now``, each at the time it fell due."""
        while True:
            if self._state is BreakerState.OPEN:
                if now < self._open_until:
                    return
                self._probes.clear()
                self._probe_successes = 0
                self._probe_timeout = (
                    self.config.probe_timeout_s
                    if self.config.probe_timeout_s is not None
                    else self._open_period
                )
                self._half_opened += 1
                self._transition(
                    BreakerState.HALF_OPEN, f"open period of {self._open_period:g}s elapsed"
                )
            elif self._state is BreakerState.HALF_OPEN and self._probes:
                deadline = self._probes[0] + self._probe_timeout
                if now < deadline:
                    return
                self._probes_timed_out += 1
                self._reopen(
                    deadline, f"probe timed out after {self._probe_timeout:g}s without a result"
                )
            else:
                return

    def _reopen(self, at: float, reason: str) -> None:
        self._open_period = min(self._open_period * 2.0, self.config.max_open_s)
        self._open(at, reason)

    def _open(self, at: float, reason: str) -> None:
        self._open_until = at + self._open_period
        self._probes.clear()
        self._probe_successes = 0
        self._opened += 1
        self._transition(BreakerState.OPEN, reason)

    def _transition(self, new: BreakerState, reason: str) -> None:
        old = self._state
        self._state = new
        if self._on_change is not None:
            self._on_change(self.name, old, new, reason)
