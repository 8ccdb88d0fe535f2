"""Start-up shared by both worker kinds: logging, process title, signals, parent watch."""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import sys

import msgspec
import setproctitle

from daemon.config import Config, live_config_path
from ipc.heartbeat import HeartbeatTable
from ipc.ring import Ring
from ipc.wakeup import Wakeup
from workers.spec import WorkerSpec


def setup_process(spec: WorkerSpec) -> logging.Logger:
    title = f"asrd: {spec.role} lane {spec.lane}"
    setproctitle.setproctitle(title)
    # Ctrl-C on a terminal reaches the whole process group; only the supervisor decides what
    # happens then (drain), so workers ignore SIGINT.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(
        level=spec.config.log_level.upper(),
        stream=sys.stderr,
        format=f"%(asctime)s asrd[{os.getpid()}] {spec.role}{spec.lane} %(levelname)s %(message)s",
    )
    # SIGABRT (the supervisor's answer to a stale heartbeat) prints every thread's Python stack
    # to stderr, the log, before the process dies: what the stuck loop was doing.
    faulthandler.enable()
    if spec.cpus:
        os.sched_setaffinity(0, spec.cpus)
    return logging.getLogger(f"asrd.{spec.role}")


def read_live_config(spec: WorkerSpec) -> Config | None:
    """The config the supervisor reloaded (SIGHUP), or None (logged) if it cannot be read."""
    path = live_config_path(spec.config)
    try:
        cfg = msgspec.json.decode(path.read_bytes(), type=Config)
    except (OSError, msgspec.DecodeError) as exc:
        logging.getLogger("asrd").error("reload: cannot read %s: %s; config unchanged", path, exc)
        return None
    logging.getLogger().setLevel(cfg.log_level.upper())
    return cfg


def parent_alive(spec: WorkerSpec) -> bool:
    """False once the supervisor has died (we were re-parented)."""
    return os.getppid() == spec.supervisor_pid


class LaneWorker:
    """The shared-memory ends every worker of a lane holds: both rings, their four wake-ups,
    and its own heartbeat slot."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.audio = Ring.attach(spec.audio_ring)
        self.results = Ring.attach(spec.result_ring)
        self.audio_data = Wakeup.from_fds(*spec.fds.audio_data)
        self.audio_space = Wakeup.from_fds(*spec.fds.audio_space)
        self.result_data = Wakeup.from_fds(*spec.fds.result_data)
        self.result_space = Wakeup.from_fds(*spec.fds.result_space)
        self.table = HeartbeatTable.attach(spec.heartbeat)
        self.slot = self.table.slot(spec.slot)

    def close_lane(self) -> None:
        self.audio.close()
        self.results.close()
        del self.slot  # the slot's views must go before the table's mapping can close
        self.table.close()
