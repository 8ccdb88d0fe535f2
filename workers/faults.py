"""Fault injection for tests: make one worker crash, hang, slow down or corrupt a ring record.

Configured by the ``[faults]`` section (daemon/config.py), which the config refuses unless
``$ASRD_ALLOW_FAULTS=1``: a production config cannot turn it on by accident. The chosen worker
(``worker``, ``lane``; by default only its first generation) counts the ring records it handles
(the infer worker: records it pops; the ingress worker: records it pushes) and, once the count
passes ``after_records``:

* ``crash``: SIGKILL itself (as a segfault or the OOM killer would end it);
* ``hang``: spin in a busy loop, making no progress and writing no heartbeat (the supervisor's
  SIGABRT then makes faulthandler print this frame);
* ``slow``: sleep ``slow_ms`` before every record from then on (a slow consumer or producer);
* ``corrupt``: hand the worker's next outgoing record a garbage payload (once);
* ``stall`` (infer worker): its next recognizer call never returns, sleeping without Python's
  lock as a native call stuck in a driver or a model would; on a decoding thread the worker's
  loop keeps running, so only the heartbeat's tie to the oldest running call shows it.

The hooks cost one integer compare per record when faults are off.
"""

from __future__ import annotations

import logging
import os
import signal
import time

from daemon.config import FaultsConfig

log = logging.getLogger("asrd.faults")
GARBAGE = b"\xc1\xff garbage: not msgpack \x00"


class FaultInjector:
    def __init__(self, config: FaultsConfig, role: str, lane: int, generation: int) -> None:
        chosen = config.worker == role and config.lane == lane
        first = generation == 1 or not config.first_generation_only
        self.action = config.action if chosen and first else "none"
        self.after = config.after_records
        self.slow_s = config.slow_ms / 1000.0
        self.count = 0
        self._corrupt_pending = False
        self._stall_pending = False
        if self.action != "none":
            log.warning(
                "fault injection: %s after %d records (this worker: %s lane %d)",
                self.action,
                self.after,
                role,
                lane,
            )

    @property
    def enabled(self) -> bool:
        return self.action != "none" or self._corrupt_pending or self._stall_pending

    def record(self) -> None:
        """Called for each record the worker handles."""
        self.count += 1
        if self.count <= self.after:
            return
        action = self.action
        if action == "slow":
            time.sleep(self.slow_s)
        elif action == "crash":
            log.warning("fault injection: crashing now (record %d)", self.count)
            os.kill(os.getpid(), signal.SIGKILL)
        elif action == "hang":
            log.warning("fault injection: hanging now (record %d)", self.count)
            while True:  # a stuck loop: no heartbeat, no progress
                pass
        elif action == "corrupt":
            self.action = "none"
            self._corrupt_pending = True
            log.warning("fault injection: corrupting the next outgoing record")
        elif action == "stall":
            self.action = "none"
            self._stall_pending = True

    def recognizer_call(self) -> None:
        """Called before a recognizer call: once a ``stall`` fired, this one never returns."""
        if self._stall_pending:
            self._stall_pending = False
            log.warning("fault injection: stalling in a recognizer call now")
            while True:
                time.sleep(3600)  # lock released: the worker's other threads run on

    def payload(self, payload: bytes) -> bytes:
        """The payload to push: garbage once after a ``corrupt`` fired."""
        if self._corrupt_pending:
            self._corrupt_pending = False
            return GARBAGE
        return payload
