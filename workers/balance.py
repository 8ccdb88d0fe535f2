"""Spread client connections over the lanes.

Every lane's ingress worker accepts on the same listening socket, and whichever wakes first
takes the connection: left alone, one lane can end up with most of the streams while another
idles. Each ingress therefore accepts only while its load (connections + streams, as published
in the heartbeat table) is no higher than the least loaded serving lane's; otherwise it stops
listening for a moment and lets the others take new connections.

Only lanes whose ingress is running and beating count: a lane being restarted must not stop
the others from accepting. Loads are read from shared memory without locks and may be a few
milliseconds old; a burst of connections can still land unevenly, and balancing is by
connection, so one connection's streams share a lane.
"""

from __future__ import annotations

import time

from ipc.heartbeat import INGRESS_COUNTERS, HeartbeatTable, WorkerState

_CONNECTIONS = INGRESS_COUNTERS.index("connections")
_STREAMS = INGRESS_COUNTERS.index("streams")


class LaneBalancer:
    def __init__(self, table: HeartbeatTable, lanes: int, lane: int, stale_after_s: float) -> None:
        self.table = table
        self.others = [n * 2 for n in range(lanes) if n != lane]  # ingress slots of other lanes
        self.stale_after_s = stale_after_s

    def least_other_load(self) -> int | None:
        """The lowest load among the other serving lanes (None: no other lane is serving)."""
        now = time.monotonic()
        best: int | None = None
        for index in self.others:
            _pid, state, _gen, beat = self.table.read(index)
            if state != WorkerState.RUNNING or now - beat > self.stale_after_s:
                continue
            load = self.table.counter(index, _CONNECTIONS) + self.table.counter(index, _STREAMS)
            if best is None or load < best:
                best = load
        return best

    def should_accept(self, my_load: int) -> bool:
        least = self.least_other_load()
        return least is None or my_load <= least
