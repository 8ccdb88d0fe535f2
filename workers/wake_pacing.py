"""A selector that wakes its event loop at most once per interval: ``[io] wake_interval_us``.

Under load an ingress worker wakes for every client write and for every batch of results the
infer worker pushes; each wake-up costs far more than the work it brings (about 80 µs of the
240 µs a write costs at 1,000 streams, docs/performance.md). :class:`PacedSelector` makes the
loop sleep out the rest of ``interval`` since its last wake-up before it polls again, so writes
and results that arrive meanwhile are served by one wake-up (and pushed to the audio ring as
one record, which wakes the infer worker once). The price is latency: a chunk or a result may
wait up to ``interval`` for its turn.

Only a loop that is about to block is paced: a ``select`` with a zero timeout (callbacks are
ready) returns at once, and a timer due sooner than the interval shortens the sleep. Signals
still reach their handlers, at the next poll.
"""

from __future__ import annotations

import selectors
import time


class PacedSelector(selectors.EpollSelector):
    def __init__(self, interval_s: float) -> None:
        super().__init__()
        self.interval_s = interval_s
        self._next = 0.0  # monotonic time before which a blocking poll sleeps first

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is None or timeout > 0:
            wait = self._next - time.monotonic()
            if wait > 0:
                if timeout is not None:
                    wait = min(wait, timeout)
                    timeout -= wait
                time.sleep(wait)
        ready = super().select(timeout)
        self._next = time.monotonic() + self.interval_s
        return ready
