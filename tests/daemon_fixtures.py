"""Fixtures that run the real daemon (``asrd run``) in a temporary runtime directory."""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from daemon.launcher import DaemonProcess
from ipc.client import ControlClient
from ipc.shm import sweep_stale

_counter = itertools.count()


def shm_segments(instance: str) -> list[str]:
    return sorted(n for n in os.listdir("/dev/shm") if n.startswith(f"asrd-{instance}-"))


def worker_pids(daemon: DaemonProcess) -> dict[tuple[str, int], int]:
    """(role, lane) -> pid, from the process titles of the supervisor's children."""
    out: dict[tuple[str, int], int] = {}
    for child in psutil.Process(daemon.pid).children():
        try:
            title = " ".join(child.cmdline())
        except psutil.Error:
            continue
        parts = title.split()
        if len(parts) >= 4 and parts[0] == "asrd:":
            out[(parts[1], int(parts[3]))] = child.pid
    return out


def wait_until(pred: Callable[[], object], timeout: float, what: str) -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def status(daemon: DaemonProcess):  # type: ignore[no-untyped-def]
    return ControlClient.status(daemon.control_path)


def wait_counters(daemon: DaemonProcess, timeout: float = 10.0, **minimums: int) -> dict[str, int]:
    """The daemon's counter totals once each named one (dots spelt ``__``) reaches its minimum.

    Workers publish their counters up to ``PUBLISH_INTERVAL_S`` after counting, so a status read
    right after a client saw an effect may still show the values from before it."""
    wanted = {name.replace("__", "."): least for name, least in minimums.items()}
    totals: dict[str, int] = {}

    def reached() -> bool:
        totals.update(status(daemon).totals)
        return all(totals.get(name, 0) >= least for name, least in wanted.items())

    try:
        wait_until(reached, timeout, f"counters to reach {wanted}")
    except AssertionError as e:
        raise AssertionError(f"{e}; last seen { ({n: totals.get(n) for n in wanted}) }") from None
    return totals


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator[Callable[..., DaemonProcess]]:
    """Start ``asrd run`` with extra TOML; every daemon is stopped and checked for leaks."""
    started: list[tuple[DaemonProcess, str]] = []

    def start(
        config: str = "",
        *,
        timeout: float = 90.0,
        instance: str | None = None,
        extra_env: dict[str, str] | None = None,
    ) -> DaemonProcess:
        instance = instance or f"t{os.getpid()}n{next(_counter)}"
        runtime = tmp_path / f"rt{len(started)}"
        runtime.mkdir()
        daemon = DaemonProcess(
            f'instance = "{instance}"\n{config}',
            runtime_dir=runtime,
            log_path=runtime / "asrd.log",
            extra_env=extra_env,
        )
        started.append((daemon, instance))
        daemon.start(timeout)
        return daemon

    yield start
    for daemon, instance in started:
        try:
            if daemon.proc is not None and daemon.proc.poll() is None:
                daemon.stop()
        finally:
            daemon.kill_session()
        leaked = shm_segments(instance)
        if leaked:  # a daemon killed in teardown: report it, and leave /dev/shm clean
            sweep_stale(instance)
        assert leaked == [], f"leaked shared memory of {instance}: {leaked}"
        assert not daemon.socket_path.exists(), "socket file left behind"
