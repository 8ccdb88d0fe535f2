"""Start-up shared by both worker kinds: logging, process title, signals, parent watch."""

from __future__ import annotations

import logging
import os
import signal
import sys

import setproctitle

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
    if spec.cpus:
        os.sched_setaffinity(0, spec.cpus)
    return logging.getLogger(f"asrd.{spec.role}")


def parent_alive(spec: WorkerSpec) -> bool:
    """False once the supervisor has died (we were re-parented)."""
    return os.getppid() == spec.supervisor_pid
