"""Triton endpoints behind circuit breakers, with failover, replay and an embedded fallback.

This is the backend of ``kind = "triton"``: one :class:`~workers.backends.triton.TritonBackend`
per configured endpoint, each behind its own :class:`~workers.breaker.CircuitBreaker`, and
optionally the embedded recognizer as the last resort.

Routing: ``begin`` puts an utterance on the first endpoint whose breaker is not open, else on
the fallback, else raises :class:`BackendUnavailable` (the client gets
``Error(code="inference_unavailable", retry_after_ms)``, the time until the first breaker may
let a call through). An utterance stays where it is until that target fails.

Nothing lost: every chunk of an open utterance is kept (up to ``max_pending_bytes``, the
``limits.max_pending_audio_s`` cap) until its final. When its endpoint fails (unreachable, timed
out: :class:`EndpointError`) or forgets the sequence (restarted: :class:`SequenceLost`), the
utterance moves to the next usable target and its audio is replayed there from the start, in
requests of at most 1 s of audio (``REPLAY_PIECE``), under a new sequence; the client sees one
final, from wherever the utterance ended up (a partial may step back while the replay catches
up). With no usable target the utterance is *parked*: its audio is still kept, and it is placed
again on its next chunk or at its end; if nothing is usable at its end, it fails with
``inference_unavailable``. An utterance that grew past the cap keeps no audio: if its target
fails after that it fails with ``inference_failed``, saying so. A model error (an exception in
the model, a malformed answer) fails that utterance only and does not count against the
endpoint.

Breakers: every request batch to an endpoint is one call (``allow()`` before, one
``record_*`` after: a failure if any request of it failed on the endpoint's side). A request
the breaker refuses moves its utterance at once, without I/O. ``maintain()``, from the worker's
loop, probes endpoints (model ready and a one-request sequence): every endpoint at start, an
endpoint whose breaker is half-open, and one that failed while its breaker stayed closed, at most
every ``health_interval_s``. A failed probe opens the breaker at once (:meth:`CircuitBreaker.trip`),
so an endpoint that is down at start takes no traffic; a good probe in half-open closes it. The
first good probe of an endpoint also unregisters regions that dead workers of this instance left
registered there. State changes are logged with what happens to new utterances, and counted.

Threading model: single-threaded, like the infer worker that owns it; probes and requests block
the loop for at most ``timeout_s`` each (per request batch, per probe), so the heartbeat timeout
must exceed it. Clock: ``time.monotonic`` or an injected one.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

from workers.backends.base import (
    Backend,
    BackendBusy,
    BackendError,
    BackendUnavailable,
    Transcript,
)
from workers.backends.triton import EndpointError, SequenceLost, TritonBackend
from workers.breaker import BreakerConfig, BreakerState, CircuitBreaker

FALLBACK = -1
PARKED = -2
_T = TypeVar("_T")
# A replay goes in requests of at most 1 s of audio, each within timeout_s on a real
# recognizer (a 30 s utterance in one request would take pocketsphinx about 9 s).
REPLAY_PIECE = 32000
STATE_CODES = {BreakerState.CLOSED: 1, BreakerState.HALF_OPEN: 2, BreakerState.OPEN: 3}  # heartbeat

log = logging.getLogger("asrd.triton")


class _Refused(EndpointError):
    """The endpoint's breaker refused the call (no I/O was done)."""


class _Route:
    __slots__ = ("audio", "kept", "replayable", "target", "text")

    def __init__(self) -> None:
        self.target = PARKED
        self.audio: list[bytes] = []
        self.kept = 0
        self.replayable = True
        self.text = ""


class _Endpoint:
    __slots__ = ("backend", "breaker", "index", "next_probe", "reconnect", "swept", "up")

    def __init__(self, index: int, backend: TritonBackend, breaker: CircuitBreaker) -> None:
        self.index = index
        self.backend = backend
        self.breaker = breaker
        self.up: bool | None = None  # None: not probed yet
        self.next_probe = 0.0
        self.reconnect = False  # a fresh connection before the next probe
        self.swept = False


class FailoverBackend(Backend):
    name = "triton"

    def __init__(
        self,
        endpoints: Sequence[TritonBackend],
        breaker: BreakerConfig,
        *,
        fallback: Backend | None = None,
        max_pending_bytes: int = 120 * 32000,
        health_interval_s: float = 1.0,
        is_stale_region: Callable[[str], bool] | None = None,
        clock: Callable[[], float] = time.monotonic,
        label: str = "",
        on_progress: Callable[[], None] | None = None,
    ) -> None:
        if not endpoints:
            raise BackendError("no Triton endpoint configured")
        self._clock = clock
        self._label = label
        self._endpoints = [
            _Endpoint(i, b, CircuitBreaker(b.url, breaker, clock=clock, on_change=self._changed))
            for i, b in enumerate(endpoints)
        ]
        self._fallback = fallback
        self._max_pending = max_pending_bytes
        self._health_interval = health_interval_s
        self._is_stale_region = is_stale_region
        self._routes: dict[int, _Route] = {}
        self._on_progress = on_progress
        self._counters = dict.fromkeys(
            (
                "failovers",
                "replays",
                "replayed_bytes",
                "fallback_utterances",
                "unavailable",
                "replay_cap_hits",
                "breaker_opened",
                "probes",
                "probe_failures",
            ),
            0,
        )

    # --- routing --------------------------------------------------------------------------------

    def _choose(self, exclude: set[int]) -> int | None:
        for ep in self._endpoints:
            if ep.index not in exclude and ep.breaker.state is not BreakerState.OPEN:
                return ep.index
        return FALLBACK if self._fallback is not None else None

    def retry_after_s(self) -> float:
        waits = [ep.breaker.retry_after_s() for ep in self._endpoints]
        return max(min(waits), 0.1)

    def _unavailable(self) -> BackendUnavailable:
        self._counters["unavailable"] += 1
        states = ", ".join(f"{ep.backend.url} {ep.breaker.state.value}" for ep in self._endpoints)
        retry = self.retry_after_s()
        return BackendUnavailable(
            f"no Triton endpoint is available ({states}) and fallback is off;"
            f" retry in {retry:.1f} s",
            retry,
        )

    def _guarded(self, ep: _Endpoint, call: Callable[[], _T]) -> _T:
        if not ep.breaker.allow():
            raise _Refused(f"triton {ep.backend.url}: circuit {ep.breaker.state.value}")
        try:
            result = call()
        except EndpointError as exc:
            self._failed(ep, str(exc))
            raise
        except BackendError:
            ep.breaker.record_success()  # it answered: the model's or the sequence's problem
            raise
        ep.breaker.record_success()
        ep.up = True
        return result

    def _failed(self, ep: _Endpoint, reason: str) -> None:
        ep.breaker.record_failure(reason)
        ep.up = False
        ep.reconnect = True

    def _place(self, key: int, r: _Route, exclude: set[int], *, beginning: bool) -> None:
        """Put ``r`` on a usable target and replay its kept audio there; park it if none.
        ``beginning``: a BackendBusy of the fallback propagates (the worker queues the
        utterance), and no target at all raises BackendUnavailable."""
        while True:
            target = self._choose(exclude)
            if target is None:
                r.target = PARKED
                if beginning:
                    raise self._unavailable()
                return
            audio = b"".join(r.audio) if r.audio else b""
            pieces = [audio[i : i + REPLAY_PIECE] for i in range(0, len(audio), REPLAY_PIECE)]
            if target == FALLBACK:
                assert self._fallback is not None
                try:
                    self._fallback.begin(key)
                except BackendBusy:
                    if beginning:
                        raise
                    raise BackendUnavailable(
                        f"stream {key:x}: Triton failed and every decoder of the embedded "
                        "fallback is busy",
                        self.retry_after_s(),
                    ) from None
                try:
                    for piece in pieces:
                        self._fallback.feed(key, piece)
                        self._progress()
                except Exception:
                    self._fallback.cancel(key)
                    raise
                self._counters["fallback_utterances"] += 1
            else:
                ep = self._endpoints[target]
                ep.backend.begin(key)
                try:
                    for piece in pieces:
                        self._guarded(ep, functools.partial(ep.backend.feed, key, piece))
                except (EndpointError, SequenceLost):
                    ep.backend.forget(key)
                    exclude.add(target)
                    continue
                except BackendError:
                    ep.backend.forget(key)
                    raise
            if audio or not beginning:
                self._counters["replays"] += 1
                self._counters["replayed_bytes"] += len(audio)
            r.target = target
            return

    def _move(self, key: int, r: _Route, exc: BackendError) -> None:
        """``r``'s target failed with ``exc``: replay it elsewhere (or park it)."""
        old = r.target
        exclude: set[int] = set()
        if old >= 0:
            self._endpoints[old].backend.forget(key)
            if not isinstance(exc, SequenceLost):
                exclude.add(old)  # a lost sequence is replayed on the same, live endpoint
        elif old == FALLBACK and self._fallback is not None:
            self._fallback.cancel(key)
        r.target = PARKED
        if not r.replayable:
            raise BackendError(
                f"{exc}; the utterance is longer than limits.max_pending_audio_s"
                f" ({self._max_pending / 32000:g} s), so its audio was not kept for a replay"
            )
        self._counters["failovers"] += 1
        log.warning("%sstream %x moves after: %s", self._label, key, exc)
        self._place(key, r, exclude, beginning=False)

    def _progress(self) -> None:
        if self._on_progress is not None:
            self._on_progress()

    def _keep(self, r: _Route, pcm: bytes) -> None:
        if not r.replayable:
            return
        if r.kept + len(pcm) > self._max_pending:
            r.replayable = False
            r.audio = []
            r.kept = 0
            self._counters["replay_cap_hits"] += 1
            return
        r.audio.append(pcm)
        r.kept += len(pcm)

    # --- Backend --------------------------------------------------------------------------------

    def begin(self, key: int) -> None:
        if key in self._routes:
            raise BackendError(f"stream {key} already has an open utterance")
        r = _Route()
        self._place(key, r, set(), beginning=True)
        self._routes[key] = r

    def feed(self, key: int, pcm: bytes) -> None:
        error = self.feed_many([(key, pcm)]).get(key)
        if error is not None:
            raise error

    def feed_many(self, items: Sequence[tuple[int, bytes]]) -> dict[int, Exception]:
        errors: dict[int, Exception] = {}
        groups: dict[int, list[tuple[int, bytes]]] = {}
        for key, pcm in items:
            r = self._routes.get(key)
            if r is None:
                errors[key] = BackendError(f"stream {key} has no open utterance")
                continue
            self._keep(r, pcm)
            if r.target == PARKED:
                try:
                    self._replace(key, r)
                except Exception as exc:
                    errors[key] = exc
                continue
            groups.setdefault(r.target, []).append((key, pcm))
        for target, group in groups.items():
            if target == FALLBACK:
                assert self._fallback is not None
                errors.update(self._fallback.feed_many(group))
                continue
            ep = self._endpoints[target]
            failed: dict[int, Exception]
            if not ep.breaker.allow():
                refused = _Refused(f"triton {ep.backend.url}: circuit {ep.breaker.state.value}")
                failed = dict.fromkeys((k for k, _ in group), refused)
            else:
                failed = ep.backend.feed_many(group)
                down = [e for e in failed.values() if isinstance(e, EndpointError)]
                if down:
                    self._failed(ep, str(down[0]))
                else:
                    ep.breaker.record_success()
                    ep.up = True
            for key, failure in failed.items():
                if isinstance(failure, (EndpointError, SequenceLost)):
                    try:
                        self._move(key, self._routes[key], failure)
                    except Exception as exc:
                        errors[key] = exc
                else:
                    errors[key] = failure
        return errors

    def _replace(self, key: int, r: _Route) -> None:
        """A parked utterance: place it again if anything is usable now."""
        if not r.replayable:
            raise BackendError(
                f"stream {key:x}: its recognizer failed and the utterance is longer than "
                f"limits.max_pending_audio_s ({self._max_pending / 32000:g} s), so its audio "
                "was not kept for a replay"
            )
        if self._choose(set()) is not None:
            self._place(key, r, set(), beginning=False)

    def partial(self, key: int) -> str:
        r = self._routes.get(key)
        if r is None:
            raise BackendError(f"stream {key} has no open utterance")
        if r.target >= 0:
            r.text = self._endpoints[r.target].backend.partial(key)
        elif r.target == FALLBACK:
            assert self._fallback is not None
            r.text = self._fallback.partial(key)
        return r.text

    def end(self, key: int) -> Transcript:
        r = self._routes.get(key)
        if r is None:
            raise BackendError(f"stream {key} has no open utterance")
        try:
            # Each failed END replays the whole utterance elsewhere (or on the same endpoint
            # after a lost sequence): a bounded number of attempts.
            for _ in range(2 * len(self._endpoints) + 2):
                if r.target == PARKED:
                    self._replace(key, r)
                    if r.target == PARKED:
                        raise self._unavailable()
                if r.target == FALLBACK:
                    assert self._fallback is not None
                    return self._fallback.end(key)
                ep = self._endpoints[r.target]
                try:
                    return self._guarded(ep, functools.partial(ep.backend.end, key))
                except (EndpointError, SequenceLost) as exc:
                    self._move(key, r, exc)
            raise BackendError(f"stream {key:x}: every recognizer failed at the end")
        finally:
            self._routes.pop(key, None)
            self._release(key, r)  # a no-op after an end; else a replay's sequence stays open

    def _release(self, key: int, r: _Route) -> None:
        if r.target >= 0:
            self._endpoints[r.target].backend.forget(key)
        elif r.target == FALLBACK and self._fallback is not None:
            self._fallback.cancel(key)
        r.target = PARKED

    def cancel(self, key: int) -> None:
        r = self._routes.pop(key, None)
        if r is None:
            return
        if r.target >= 0:
            ep = self._endpoints[r.target]
            if ep.breaker.state is BreakerState.CLOSED and ep.up is not False:
                ep.backend.cancel(key)
            else:
                ep.backend.forget(key)  # no request to an endpoint that is down
        elif r.target == FALLBACK and self._fallback is not None:
            self._fallback.cancel(key)

    def active(self) -> int:
        return len(self._routes)

    def stats(self) -> dict[str, int]:
        out = dict(self._counters)
        out["parked"] = sum(1 for r in self._routes.values() if r.target == PARKED)
        out["endpoints_up"] = sum(
            1 for ep in self._endpoints if ep.breaker.state is BreakerState.CLOSED and ep.up
        )
        for ep in self._endpoints:
            out[f"endpoint{ep.index}"] = STATE_CODES[ep.breaker.state]
            for name, value in ep.backend.stats().items():
                out[f"triton.{name}"] = out.get(f"triton.{name}", 0) + value
        return out

    def set_breaker_config(self, config: BreakerConfig) -> None:
        """New thresholds and periods (a config reload); states and counts are kept."""
        for ep in self._endpoints:
            ep.breaker.config = config

    def breakers(self) -> list[CircuitBreaker]:
        return [ep.breaker for ep in self._endpoints]

    def close(self) -> None:
        for key in list(self._routes):
            self.cancel(key)
        for ep in self._endpoints:
            ep.backend.close()
        if self._fallback is not None:
            self._fallback.close()

    # --- health ---------------------------------------------------------------------------------

    def maintain(self) -> None:
        now = self._clock()
        for ep in self._endpoints:
            if now < ep.next_probe:
                continue
            state = ep.breaker.state
            if state is BreakerState.HALF_OPEN or (
                state is BreakerState.CLOSED and ep.up is not True
            ):
                self._probe(ep, now)
            elif ep.up and not ep.swept:  # the sweep after the first good probe failed
                ep.next_probe = now + self._health_interval
                self._sweep(ep)

    def _probe(self, ep: _Endpoint, now: float) -> None:
        ep.next_probe = now + self._health_interval
        if ep.reconnect:
            ep.reconnect = False
            try:
                ep.backend.reconnect()
            except BackendError as exc:
                log.warning("%striton %s: reconnect failed: %s", self._label, ep.backend.url, exc)
        if not ep.breaker.allow():
            return
        self._counters["probes"] += 1
        try:
            ep.backend.probe()
        except BackendError as exc:
            self._counters["probe_failures"] += 1
            first = ep.up is None
            ep.up = False
            ep.reconnect = True
            ep.breaker.record_failure(f"probe: {exc}")
            ep.breaker.trip(f"probe failed: {exc}")
            if first:
                log.warning(
                    "%striton endpoint %s is down at start: %s", self._label, ep.backend.url, exc
                )
            return
        ep.breaker.record_success()
        if ep.up is not True:
            log.info("%striton endpoint %s is up", self._label, ep.backend.url)
        ep.up = True
        self._sweep(ep)

    def _sweep(self, ep: _Endpoint) -> None:
        if self._is_stale_region is None:
            ep.swept = True
        if not ep.swept and self._is_stale_region is not None:
            try:
                gone = ep.backend.sweep_regions(self._is_stale_region)
            except BackendError as exc:
                log.warning(
                    "%striton %s: region sweep failed: %s", self._label, ep.backend.url, exc
                )
            else:
                ep.swept = True
                if gone:
                    log.info(
                        "%striton %s: unregistered %d stale region(s) of dead workers: %s",
                        self._label,
                        ep.backend.url,
                        len(gone),
                        ", ".join(gone),
                    )

    def _changed(self, name: str, old: BreakerState, new: BreakerState, reason: str) -> None:
        if new is BreakerState.OPEN:
            self._counters["breaker_opened"] += 1
            others = [
                e.backend.url
                for e in self._endpoints
                if e.backend.url != name and e.breaker.state is not BreakerState.OPEN
            ]
            if others:
                then = f"new utterances go to {others[0]}"
            elif self._fallback is not None:
                then = "new utterances go to the embedded fallback"
            else:
                then = "new utterances get inference_unavailable until it recovers"
            log.warning(
                "%striton endpoint %s: circuit %s -> open (%s); %s; probing every %g s",
                self._label,
                name,
                old.value,
                reason,
                then,
                self._health_interval,
            )
        else:
            log.info(
                "%striton endpoint %s: circuit %s -> %s (%s)",
                self._label,
                name,
                old.value,
                new.value,
                reason,
            )
