"""Supervisor: owns the sockets and shared memory, spawns, watches, reaps and respawns workers.

Threading model: one thread. Signal handlers only enqueue the signal number (and
``signal.set_wakeup_fd`` wakes the loop); the main loop sleeps in ``select`` on the wake-up
pipe, the control socket and the metrics endpoint (daemon/metrics.py) with a short timeout,
answers them, then reaps (``waitpid(-1, WNOHANG)``), checks heartbeats, respawns what is due
and advances a drain. It runs no per-chunk work.

Liveness and timeouts: a worker whose heartbeat is older than ``heartbeat_timeout_s`` (or that
has not beaten that long after its spawn) is killed with SIGKILL and replaced. Respawns back off
exponentially from ``restart.backoff_initial_s`` to ``restart.backoff_max_s``; the count resets
after a worker has run for ``STABLE_AFTER_S``. A drain (SIGTERM/SIGINT) asks the ingress workers
to finish their streams, then stops the infer workers; whatever still runs after
``shutdown_timeout_s`` is killed. Every shared-memory segment and socket file created here is
removed on the way out, whatever happened to the workers.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import logging
import os
import selectors
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec
import psutil

from daemon import __version__
from daemon.config import Config, live_config_path, load_config, reload_plan
from daemon.errors import BootError, ConfigError, LanesFailedError, SocketInUseError
from daemon.metrics import MetricsServer, parse_listen
from daemon.metrics import render as render_metrics
from daemon.placement import plan as plan_placement
from daemon.placement import running_on
from daemon.platform import format_cpulist, probe
from daemon.systemd import Notifier, listen_fds, watchdog_interval
from ipc import control as ctl
from ipc.framing import BadFrame, FrameReader, FrameTooLarge, FrameWriter
from ipc.heartbeat import (
    ENDPOINT_STATES,
    INFER_COUNTERS,
    INGRESS_COUNTERS,
    HeartbeatTable,
    WorkerState,
)
from ipc.ring import Ring
from ipc.shm import Manifest, segment_name, sweep_stale, triton_region_name
from ipc.wakeup import Wakeup
from workers.spec import ENV_VAR, LaneFds, WorkerSpec, slot_index

if TYPE_CHECKING:
    from ipc.uring import UringControlServer

log = logging.getLogger("asrd.supervisor")

STABLE_AFTER_S = 10.0
TICK_S = 0.1
EXTEND_TIMEOUT_S = 10.0  # asked for at a time while workers start, renewed at half of it
ROLES = ("ingress", "infer")


class SlotState(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    RESTARTING = "restarting"
    STOPPED = "stopped"


@dataclass(slots=True)
class WorkerSlot:
    role: str
    lane: int
    index: int
    pid: int = 0
    generation: int = 0
    restarts: int = 0
    failures: int = 0
    state: SlotState = SlotState.STOPPED
    started_at: float = 0.0  # spawn time, or the last kill for a stale heartbeat
    spawned_at: float = 0.0
    next_start_at: float = 0.0
    cpus: list[int] = field(default_factory=list)
    failed_at: deque[float] = field(default_factory=deque)  # exits within failure_window_s
    aborted_at: float = 0.0  # SIGABRT sent for a stale heartbeat; SIGKILL after the grace


@dataclass(slots=True)
class Lane:
    index: int
    audio: Ring
    result: Ring
    fds: LaneFds
    wakeups: list[Wakeup]
    failed: str = ""  # why the lane was stopped after a crash loop; "" while it runs


def describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = str(sig)
        return f"was killed by {name}"
    return f"exited with code {os.waitstatus_to_exitcode(status)}"


class Supervisor:
    def __init__(self, config: Config, config_path: str | None = None) -> None:
        self.config = config
        self.pid = os.getpid()
        self.runtime_dir = config.resolved_runtime_dir()
        self.socket_path = config.socket_path()
        self.control_path = config.control_socket_path()
        self.lanes: list[Lane] = []
        self.slots: list[WorkerSlot] = []
        self.by_pid: dict[int, WorkerSlot] = {}
        self.signals: deque[int] = deque()
        self.notifier = Notifier()
        self.listen_sock: socket.socket | None = None
        self.own_socket_file = False
        self.control_sock: socket.socket | None = None
        self.control_conns: dict[socket.socket, FrameReader[ctl.ControlRequest]] = {}
        self.uring_control: UringControlServer[ctl.ControlRequest] | None = None
        self.metrics: MetricsServer | None = None
        self.table: HeartbeatTable | None = None
        self.manifest: Manifest | None = None
        self.selector = selectors.DefaultSelector()
        self.state = "starting"
        self.ready = False
        self.config_path = config_path
        self.rolling: deque[int] = deque()  # lanes still to restart with a reloaded config
        self.roll_phase = ""  # "ingress" (draining it), "infer" (stopping it), "starting"
        self.watchdog_every = watchdog_interval()
        self.watchdog_due = 0.0
        self.watchdog_warned = 0.0
        self.extend_due = 0.0
        self.drain_deadline = 0.0
        self.infer_stop_sent = False
        self.started_at = time.monotonic()
        self._wake_r = -1
        self._wake_w = -1

    # --- boot -----------------------------------------------------------------------------------
    def boot(self) -> None:
        cfg = self.config
        self.platform = probe()
        if not self.platform.supported:
            raise BootError(f"asrd cannot run here: {self.platform.unsupported_reason}")
        self.plan = plan_placement(cfg, self.platform)  # ConfigError: an "on" that cannot work
        if self.plan.io_backend == "io_uring":
            from ipc.uring import check_binding

            problem = check_binding()  # in a child: a bad binding kills that, not us
            if problem:
                raise ConfigError(f"io.backend = 'io_uring': {problem}; use 'auto' or 'epoll'")
        log.info("placement: %s", self.plan.summary())
        for lp in self.plan.lanes:
            if lp.cpus:
                log.info(
                    "lane %d on CPU %s%s",
                    lp.lane,
                    format_cpulist(lp.cpus),
                    f" (NUMA node {lp.node})" if lp.node is not None else "",
                )
        for warning in self.plan.warnings:
            log.warning("placement: %s", warning)
        self.runtime_dir.mkdir(parents=True, exist_ok=True)
        swept = sweep_stale(cfg.instance, self.runtime_dir)
        if swept:
            log.warning(
                "removed %d stale shared-memory segments of instance %r left by a dead "
                "supervisor: %s",
                len(swept),
                cfg.instance,
                ", ".join(swept),
            )
        self.listen_sock = self._listening_socket()
        self.control_sock = self._bind(self.control_path, what="control socket")
        self.control_sock.setblocking(False)
        if self.plan.io_backend == "io_uring":
            from ipc.uring import UringControlServer

            self.uring_control = UringControlServer(
                self.control_sock,
                ctl.ControlRequest,
                self._control_reply,
                on_too_large=lambda exc: ctl.ControlError(message=str(exc)),
                close_listener=False,
            )
            self.selector.register(self.uring_control.fileno(), selectors.EVENT_READ, "uring")
        else:
            self.selector.register(self.control_sock, selectors.EVENT_READ, "control")
        if cfg.metrics.listen:
            self.metrics = self._metrics_server(cfg.metrics.listen)
            log.info("Prometheus metrics on %s", self.metrics.url)
        self.manifest = Manifest(self.runtime_dir, cfg.instance)
        n_lanes = len(self.plan.lanes)
        name = segment_name(cfg.instance, self.pid, "heartbeat", 0)
        self.table = HeartbeatTable.create(name, n_lanes * 2)
        self.manifest.add(name)
        for lane in range(n_lanes):
            self.lanes.append(self._make_lane(lane))
            for role in ROLES:
                self.slots.append(
                    WorkerSlot(role, lane, slot_index(role, lane), cpus=self.plan.lanes[lane].cpus)
                )
        log.info(
            "asrd %s: instance %r, %d lanes, %s backend, listening on %s",
            __version__,
            cfg.instance,
            n_lanes,
            cfg.backend.kind,
            self.socket_path,
        )

    @contextlib.contextmanager
    def _on_lane_node(self, n: int) -> Iterator[None]:
        """Run on the CPUs of lane ``n``'s NUMA node meanwhile (with NUMA placement): creating
        a ring allocates its pages (posix_fallocate), and Linux's default policy allocates on
        the node of the CPU that asks, so the lane's rings land where its workers run."""
        node = self.plan.lanes[n].node if self.plan.numa else None
        cpus = [c for nd in self.platform.numa_nodes if nd.id == node for c in nd.cpus]
        with running_on(cpus):
            yield

    def _make_lane(self, n: int) -> Lane:
        cfg = self.config
        assert self.manifest is not None
        audio_name = segment_name(cfg.instance, self.pid, "audio", n)
        result_name = segment_name(cfg.instance, self.pid, "result", n)
        with self._on_lane_node(n):
            audio = Ring.create(audio_name, cfg.ring.audio_bytes)
            self.manifest.add(audio_name)
            result = Ring.create(result_name, cfg.ring.result_bytes)
            self.manifest.add(result_name)
        if cfg.backend.kind == "triton" and cfg.backend.triton.shared_memory == "system":
            # The lane's infer worker creates these regions; listed here so that it is unlinked
            # at exit even if the worker could not do it.
            for i in range(len(cfg.backend.triton.endpoints)):
                self.manifest.add(triton_region_name(cfg.instance, self.pid, n, i))
        wakeups = [Wakeup() for _ in range(4)]
        fds = LaneFds(
            audio_data=wakeups[0].fds(),
            audio_space=wakeups[1].fds(),
            result_data=wakeups[2].fds(),
            result_space=wakeups[3].fds(),
        )
        return Lane(n, audio, result, fds, wakeups)

    def _listening_socket(self) -> socket.socket:
        fds = listen_fds()
        if fds:
            sock = socket.socket(fileno=fds[0])
            if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
                raise BootError(
                    "the socket passed by systemd (LISTEN_FDS) is not a Unix stream socket; "
                    "use ListenStream= with a path in asrd.socket"
                )
            name = sock.getsockname()
            self.socket_path = Path(name if isinstance(name, str) else name.decode())
            log.info("using the listening socket passed by systemd: %s", self.socket_path)
            return sock
        sock = self._bind(self.socket_path, what="socket")
        self.own_socket_file = True
        return sock

    def _bind(self, path: Path, what: str) -> socket.socket:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() or path.is_symlink():
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            probe.settimeout(1.0)
            try:
                probe.connect(str(path))
            except OSError:
                path.unlink(missing_ok=True)  # left by a daemon that died: nobody listens
            else:
                raise SocketInUseError(
                    f"another asrd is already listening on {what} {path}; stop it, or give "
                    "this one another instance/socket in the config"
                )
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(path))
            os.chmod(path, self.config.socket_mode)
            sock.listen(1024)
        except OSError as exc:
            sock.close()
            raise BootError(f"cannot listen on {what} {path}: {exc.strerror}") from exc
        return sock

    def _metrics_server(self, listen: str) -> MetricsServer:
        host, port = parse_listen(listen)  # validated with the config
        try:
            return MetricsServer(host, port, lambda: render_metrics(self.status()), self.selector)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise SocketInUseError(
                    f"metrics.listen = {listen!r}: the address is in use (another asrd, or "
                    "another exporter); choose another port"
                ) from exc
            raise BootError(f"metrics.listen = {listen!r}: cannot listen: {exc.strerror}") from exc

    # --- workers --------------------------------------------------------------------------------
    def spawn(self, slot: WorkerSlot) -> None:
        assert self.table is not None and self.listen_sock is not None
        lane = self.lanes[slot.lane]
        partner = self.slots[
            slot_index("infer" if slot.role == "ingress" else "ingress", slot.lane)
        ]
        if slot.generation and not partner.pid:
            # Neither side of the lane runs: nothing of what the rings hold has an owner, and
            # a dead side may have left a sleep or space-request flag set. Start them empty.
            lane.audio.reset()
            lane.result.reset()
        slot.generation += 1
        spec = WorkerSpec(
            role=slot.role,
            lane=slot.lane,
            lanes=len(self.lanes),
            generation=slot.generation,
            supervisor_pid=self.pid,
            heartbeat=self.table.name,
            slot=slot.index,
            audio_ring=lane.audio.name,
            result_ring=lane.result.name,
            fds=lane.fds,
            listen_fd=self.listen_sock.fileno() if slot.role == "ingress" else -1,
            cpus=slot.cpus,
            config=self.config,
        )
        pass_fds = lane.fds.all()
        if slot.role == "ingress":
            pass_fds.append(self.listen_sock.fileno())
        env = dict(os.environ)
        env[ENV_VAR] = spec.encode()
        argv = [sys.executable, "-m", f"workers.{slot.role}"]
        pid = os.fork()
        if pid == 0:  # child: exec at once; nothing of the supervisor's state is used
            try:
                signal.set_wakeup_fd(-1)
                for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD, signal.SIGUSR1):
                    signal.signal(sig, signal.SIG_DFL)
                for fd in pass_fds:
                    os.set_inheritable(fd, True)
                os.execve(sys.executable, argv, env)
            finally:
                os._exit(127)
        self.table.reset_slot(slot.index, pid, slot.generation)
        slot.pid = pid
        slot.state = SlotState.STARTING
        slot.started_at = slot.spawned_at = time.monotonic()
        self.by_pid[pid] = slot
        log.info("started %s lane %d (pid %d)", slot.role, slot.lane, pid)

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            slot = self.by_pid.pop(pid, None)
            if slot is None:
                continue
            self.worker_exited(slot, status)

    def worker_exited(self, slot: WorkerSlot, status: int) -> None:
        now = time.monotonic()
        slot.pid = 0
        slot.aborted_at = 0.0
        how = describe_status(status)
        if slot.role == "infer":
            # Utterances the dead worker held are lost; the lane's ingress tells their streams
            # (during a drain too, so the drain does not wait for finals that cannot come).
            # Only a serving ingress has its handler installed (SIGUSR1 would kill one starting).
            ingress = self.slots[slot_index("ingress", slot.lane)]
            # The table, not only our record: a respawned ingress may already serve (its
            # handler is installed before it says RUNNING) before check_workers has seen it.
            assert self.table is not None
            serving = self.table.read(ingress.index)[1] in (
                WorkerState.RUNNING,
                WorkerState.DRAINING,
            )
            if ingress.pid and (ingress.state == SlotState.RUNNING or serving):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(ingress.pid, signal.SIGUSR1)
        if (
            self.state == "draining"
            or self.lanes[slot.lane].failed
            or (self.rolling and self.rolling[0] == slot.lane and slot.state == SlotState.STOPPED)
        ):
            slot.state = SlotState.STOPPED
            clean = os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
            level = logging.INFO if clean else logging.WARNING
            log.log(level, "%s lane %d %s", slot.role, slot.lane, how)
            return
        ran = now - slot.spawned_at
        slot.failures = 1 if ran >= STABLE_AFTER_S else slot.failures + 1
        rc = self.config.restart
        slot.failed_at.append(now)
        while slot.failed_at and slot.failed_at[0] < now - rc.failure_window_s:
            slot.failed_at.popleft()
        if len(slot.failed_at) >= rc.max_failures:
            self.fail_lane(
                slot.lane,
                f"{slot.role} worker {how}, {len(slot.failed_at)} failures within "
                f"{rc.failure_window_s:g} s (restart.max_failures = {rc.max_failures})",
            )
            return
        delay = min(rc.backoff_max_s, rc.backoff_initial_s * (2 ** (slot.failures - 1)))
        slot.state = SlotState.RESTARTING
        slot.next_start_at = now + delay
        slot.restarts += 1
        log.error(
            "%s lane %d %s after %.1f s; restarting in %.2f s (restart %d)",
            slot.role,
            slot.lane,
            how,
            ran,
            delay,
            slot.restarts,
        )

    # --- reload ---------------------------------------------------------------------------------
    def reload(self) -> None:
        """SIGHUP: re-read the config file. Live changes (VAD, limits, breaker settings, log
        level, restart policy) reach the workers at once and apply to new streams; changes
        that need new workers (backend, rings, heartbeats) restart the lanes one at a time,
        each draining its streams first while the others serve; changes that need a new
        supervisor (sockets, instance, lanes, placement, io) and invalid configs are refused
        with the reason, and the running config stays."""
        if self.config_path is None:
            log.warning("SIGHUP: started without --config, nothing to re-read")
            return
        if self.rolling:
            log.warning("SIGHUP: lanes are still restarting after the last reload; try later")
            return
        try:
            new = load_config(self.config_path)
        except ConfigError as exc:
            log.error("reload refused, the running config stays: %s", exc)
            self.notifier.status(f"reload refused: {str(exc).splitlines()[0]}")
            return
        restart, workers, live = reload_plan(self.config, new)
        if restart:
            log.error(
                "reload refused, the running config stays: %s changed, which needs a restart "
                "(systemctl restart asrd)",
                ", ".join(restart),
            )
            self.notifier.status(f"reload refused: {', '.join(restart)} need a restart")
            return
        if not workers and not live:
            log.info("reload: %s unchanged", self.config_path)
            return
        self.config = new
        logging.getLogger().setLevel(new.log_level.upper())
        path = live_config_path(new)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(msgspec.json.encode(new))
        tmp.replace(path)
        if live:
            for slot in self.slots:
                if slot.pid and slot.state == SlotState.RUNNING:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(slot.pid, signal.SIGHUP)
        log.info(
            "reloaded %s: live %s; %s",
            self.config_path,
            ", ".join(live) or "nothing",
            f"restarting lanes one at a time for {', '.join(workers)}"
            if workers
            else "no lane restarts",
        )
        if workers:
            self.rolling.extend(lane.index for lane in self.lanes if not lane.failed)
            self.roll_phase = ""

    def advance_roll(self) -> None:
        """One lane at a time: drain its ingress (its streams finish; new connections go to the
        other lanes), stop its infer worker, start both with the new config, wait until they
        serve, then the next lane."""
        lane = self.rolling[0]
        ingress = self.slots[slot_index("ingress", lane)]
        infer = self.slots[slot_index("infer", lane)]
        if self.roll_phase == "":
            log.info("reload: restarting lane %d", lane)
            self.roll_phase = "ingress"
            ingress.state = SlotState.STOPPED
            infer.state = SlotState.STOPPED
            if ingress.pid:
                os.kill(ingress.pid, signal.SIGTERM)
        elif self.roll_phase == "ingress" and not ingress.pid:
            self.roll_phase = "infer"
            if infer.pid:
                os.kill(infer.pid, signal.SIGTERM)
        elif self.roll_phase == "infer" and not infer.pid:
            self._renew_rings(lane)
            for slot in (ingress, infer):
                slot.failures = 0
                slot.failed_at.clear()
                self.spawn(slot)
            self.roll_phase = "starting"
        elif self.roll_phase == "starting" and all(
            s.state == SlotState.RUNNING for s in (ingress, infer)
        ):
            log.info("reload: lane %d serves with the new config", lane)
            self.rolling.popleft()
            self.roll_phase = ""
            if not self.rolling:
                log.info("reload: every lane restarted")

    def _renew_rings(self, n: int) -> None:
        """New rings for lane ``n`` when their configured sizes changed (both sides stopped)."""
        lane = self.lanes[n]
        cfg = self.config
        if lane.audio.capacity == cfg.ring.audio_bytes and (
            lane.result.capacity == cfg.ring.result_bytes
        ):
            return
        assert self.manifest is not None
        for ring in (lane.audio, lane.result):
            ring.close()
            ring.unlink()
        with self._on_lane_node(n):
            lane.audio = Ring.create(lane.audio.name, cfg.ring.audio_bytes)
            lane.result = Ring.create(lane.result.name, cfg.ring.result_bytes)

    def fail_lane(self, index: int, why: str) -> None:
        """Stop lane ``index`` for good (a crash loop): no more restarts; its other worker is
        stopped (its streams get errors); the other lanes go on. With no lane left the daemon
        exits 69 so that systemd (Restart=on-failure) starts it afresh."""
        lane = self.lanes[index]
        lane.failed = why
        log.error(
            "lane %d stopped: %s; the other lanes keep serving (restart the daemon to retry)",
            index,
            why,
        )
        for role in ROLES:
            other = self.slots[slot_index(role, index)]
            other.state = SlotState.STOPPED
            if other.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(other.pid, signal.SIGTERM)
        if all(lane.failed for lane in self.lanes):
            raise LanesFailedError(f"every lane failed; the last: lane {index}: {why}")

    def check_workers(self) -> None:
        assert self.table is not None
        now = time.monotonic()
        timeout = self.config.heartbeat_timeout_s
        for slot in self.slots:
            if slot.state == SlotState.RESTARTING and now >= slot.next_start_at:
                if self.state != "draining":
                    self.spawn(slot)
                continue
            if not slot.pid:
                continue
            _pid, wstate, _gen, beat = self.table.read(slot.index)
            if slot.state == SlotState.STARTING and wstate in (
                WorkerState.RUNNING,
                WorkerState.DRAINING,
            ):
                slot.state = SlotState.RUNNING
                log.info("%s lane %d (pid %d) is serving", slot.role, slot.lane, slot.pid)
            last = beat if beat > 0 else slot.started_at
            age = now - max(last, slot.started_at)
            if slot.aborted_at and now - slot.aborted_at >= self.config.restart.abort_grace_s:
                log.error(
                    "%s lane %d (pid %d) still there %.1f s after SIGABRT: SIGKILL",
                    slot.role,
                    slot.lane,
                    slot.pid,
                    now - slot.aborted_at,
                )
                with contextlib.suppress(ProcessLookupError):
                    os.kill(slot.pid, signal.SIGKILL)
                slot.aborted_at = 0.0
                slot.started_at = now  # one kill per timeout period
            elif age > timeout and not slot.aborted_at:
                log.error(
                    "%s lane %d (pid %d) sent no heartbeat for %.1f s "
                    "(heartbeat_timeout_s = %g): SIGABRT (its stacks follow in the log), "
                    "then SIGKILL",
                    slot.role,
                    slot.lane,
                    slot.pid,
                    age,
                    timeout,
                )
                with contextlib.suppress(ProcessLookupError):
                    os.kill(slot.pid, signal.SIGABRT)
                slot.aborted_at = now
        if not self.ready and all(
            s.state == SlotState.RUNNING for s in self.slots if not self.lanes[s.lane].failed
        ):
            self.ready = True
            self.state = "serving"
            text = f"serving {len(self.lanes)} lanes on {self.socket_path}"
            log.info("ready: %s", text)
            self.notifier.ready(text)

    # --- drain ----------------------------------------------------------------------------------
    def begin_drain(self, why: str) -> None:
        if self.state == "draining":
            log.warning("%s again while draining: stopping now", why)
            self.drain_deadline = 0.0
            return
        log.info("%s: draining (up to %g s)", why, self.config.shutdown_timeout_s)
        self.state = "draining"
        self.notifier.stopping()
        self.drain_deadline = time.monotonic() + self.config.shutdown_timeout_s
        for slot in self.slots:
            if slot.state == SlotState.RESTARTING:
                slot.state = SlotState.STOPPED
        self._signal_role("ingress", signal.SIGTERM)

    def _signal_role(self, role: str, sig: int) -> None:
        for slot in self.slots:
            if slot.role == role and slot.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(slot.pid, sig)

    def advance_drain(self) -> bool:
        """True once every worker is gone."""
        if not self.by_pid:
            return True
        if not self.infer_stop_sent and not any(s.pid for s in self.slots if s.role == "ingress"):
            self.infer_stop_sent = True
            self._signal_role("infer", signal.SIGTERM)
        if time.monotonic() >= self.drain_deadline:
            log.warning(
                "shutdown_timeout_s (%g s) passed: killing %d workers",
                self.config.shutdown_timeout_s,
                len(self.by_pid),
            )
            self.kill_all()
            return True
        return False

    def kill_all(self) -> None:
        for pid in list(self.by_pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5.0
        while self.by_pid and time.monotonic() < deadline:
            try:
                pid, _status = os.waitpid(-1, 0)
            except ChildProcessError:
                break
            slot = self.by_pid.pop(pid, None)
            if slot is not None:
                slot.pid = 0
                slot.state = SlotState.STOPPED

    # --- control socket -------------------------------------------------------------------------
    def on_control_accept(self) -> None:
        assert self.control_sock is not None
        try:
            conn, _ = self.control_sock.accept()
        except BlockingIOError:
            return
        conn.setblocking(False)
        self.control_conns[conn] = FrameReader(ctl.ControlRequest, 64 * 1024)
        self.selector.register(conn, selectors.EVENT_READ, "control-conn")

    def on_control_data(self, conn: socket.socket) -> None:
        reader = self.control_conns[conn]
        try:
            data = conn.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._close_control(conn)
            return
        reader.feed(data)
        writer = FrameWriter()
        try:
            for msg in reader:
                if isinstance(msg, BadFrame):
                    writer.append(ctl.ControlError(message=f"{msg.code}: {msg.message}"))
                else:
                    writer.append(self.status())
        except FrameTooLarge as exc:
            writer.append(ctl.ControlError(message=str(exc)))
            reader = None  # type: ignore[assignment]
        if len(writer):
            conn.setblocking(True)
            conn.settimeout(2.0)
            try:
                conn.sendall(writer.take())
            except OSError:
                self._close_control(conn)
                return
            conn.setblocking(False)
        if reader is None:
            self._close_control(conn)

    def _control_reply(self, msg: object) -> ctl.Status | ctl.ControlError:
        if isinstance(msg, BadFrame):
            return ctl.ControlError(message=f"{msg.code}: {msg.message}")
        return self.status()

    def _close_control(self, conn: socket.socket) -> None:
        self.control_conns.pop(conn, None)
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(conn)
        conn.close()

    def status(self) -> ctl.Status:
        assert self.table is not None
        now = time.monotonic()
        lanes = []
        totals: dict[str, int] = {}
        for lane in self.lanes:
            workers = []
            for role in ROLES:
                slot = self.slots[slot_index(role, lane.index)]
                names = INGRESS_COUNTERS if role == "ingress" else INFER_COUNTERS
                counters = self.table.counters(slot.index, names)
                for k, v in counters.items():
                    totals[f"{role}.{k}"] = totals.get(f"{role}.{k}", 0) + v
                _pid, _state, _gen, beat = self.table.read(slot.index)
                rss = None
                if slot.pid:
                    with contextlib.suppress(psutil.Error):
                        rss = psutil.Process(slot.pid).memory_info().rss
                workers.append(
                    ctl.WorkerStatus(
                        role=role,
                        lane=lane.index,
                        pid=slot.pid,
                        state=slot.state.value,
                        restarts=slot.restarts,
                        heartbeat_age_s=round(now - beat, 3) if beat > 0 and slot.pid else None,
                        cpus=slot.cpus,
                        rss_bytes=rss,
                        counters=counters,
                    )
                )
            lanes.append(
                ctl.LaneStatus(
                    lane=lane.index,
                    workers=workers,
                    audio_ring=lane.audio.stats(),
                    result_ring=lane.result.stats(),
                    failed=lane.failed,
                )
            )
        return ctl.Status(
            endpoints=self.endpoint_status(),
            version=__version__,
            instance=self.config.instance,
            pid=self.pid,
            uptime_s=round(now - self.started_at, 3),
            state=self.state,
            backend=self.config.backend.kind,
            socket=str(self.socket_path),
            metrics=self.metrics.url if self.metrics is not None else "",
            lanes=lanes,
            totals=totals,
        )

    # --- main loop ------------------------------------------------------------------------------
    def _on_signal(self, signum: int, frame: object) -> None:
        self.signals.append(signum)

    def install_signals(self) -> None:
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, self._on_signal)
        self.selector.register(self._wake_r, selectors.EVENT_READ, "signal")

    def run(self) -> int:
        self.install_signals()
        try:
            self.boot()
            for slot in self.slots:
                self.spawn(slot)
            self.loop()
        finally:
            self.cleanup()
        return 0

    def loop(self) -> None:
        status_due = 0.0
        while True:
            for key, _ in self.selector.select(TICK_S):
                if key.data == "signal":
                    with contextlib.suppress(BlockingIOError):
                        while os.read(self._wake_r, 512):
                            pass
                elif key.data == "control":
                    self.on_control_accept()
                elif key.data == "uring":
                    assert self.uring_control is not None
                    self.uring_control.process()
                elif key.data == "metrics":
                    assert self.metrics is not None
                    self.metrics.accept()
                elif key.data == "metrics-conn":
                    assert self.metrics is not None
                    self.metrics.on_data(key.fileobj)  # type: ignore[arg-type]
                else:
                    self.on_control_data(key.fileobj)  # type: ignore[arg-type]
            while self.signals:
                sig = self.signals.popleft()
                if sig in (signal.SIGTERM, signal.SIGINT):
                    self.begin_drain(signal.Signals(sig).name)
                elif sig == signal.SIGHUP:
                    self.reload()
            self.reap()
            if self.metrics is not None:
                self.metrics.expire()
            if self.state == "draining":
                if self.advance_drain():
                    return
                continue
            self.check_workers()
            if self.rolling:
                self.advance_roll()
            now = time.monotonic()
            if self.ready and now >= status_due:
                status_due = now + 5.0
                self.notifier.status(self.status_line())
            self.tell_systemd(now)

    def stale_workers(self, now: float) -> list[str]:
        """Workers whose heartbeat (or, before the first beat, whose start) is older than
        heartbeat_timeout_s."""
        assert self.table is not None
        stale = []
        for slot in self.slots:
            if not slot.pid:
                continue
            beat = self.table.read(slot.index)[3]
            age = now - max(beat if beat > 0 else slot.started_at, slot.started_at)
            if age > self.config.heartbeat_timeout_s or slot.aborted_at:
                stale.append(f"{slot.role} lane {slot.lane} ({age:.1f} s)")
        return stale

    def tell_systemd(self, now: float) -> None:
        """WATCHDOG=1 at half of WATCHDOG_USEC while every worker's heartbeat is fresh (a stuck
        worker withholds it, so systemd restarts a daemon that cannot heal itself), and more
        start time while workers are starting and beating (a backend warming up)."""
        if self.watchdog_every is not None and now >= self.watchdog_due:
            stale = self.stale_workers(now)
            if stale:
                if now >= self.watchdog_warned + 5.0:
                    self.watchdog_warned = now
                    log.warning("watchdog ping withheld: stale heartbeat of %s", ", ".join(stale))
            else:
                self.notifier.watchdog()
                self.watchdog_due = now + self.watchdog_every
        if not self.ready and now >= self.extend_due and not self.stale_workers(now):
            self.notifier.extend_timeout(EXTEND_TIMEOUT_S)
            self.extend_due = now + EXTEND_TIMEOUT_S / 2

    def endpoint_status(self) -> list[ctl.EndpointStatus]:
        """Each Triton endpoint's breaker state per lane, from the infer workers' counters."""
        assert self.table is not None
        if self.config.backend.kind != "triton":
            return []
        out = []
        for i, url in enumerate(self.config.backend.triton.endpoints):
            states = []
            for lane in self.lanes:
                slot = self.slots[slot_index("infer", lane.index)]
                code = self.table.counters(slot.index, INFER_COUNTERS)[f"endpoint{i}"]
                running = slot.state == SlotState.RUNNING
                states.append(ENDPOINT_STATES[code - 1] if code and running else "unknown")
            if all(s == "closed" for s in states):
                summary = "up"
            elif all(s == "open" for s in states):
                summary = "down"
            else:
                summary = "degraded"
            out.append(ctl.EndpointStatus(url=url, lanes=states, state=summary))
        return out

    def status_line(self) -> str:
        assert self.table is not None
        streams = sum(
            self.table.counters(s.index, INGRESS_COUNTERS)["streams"]
            for s in self.slots
            if s.role == "ingress"
        )
        up = sum(1 for s in self.slots if s.state == SlotState.RUNNING)
        line = f"{len(self.lanes)} lanes, {up}/{len(self.slots)} workers up, {streams} streams"
        endpoints = self.endpoint_status()
        if endpoints:
            line += ", triton " + " ".join(f"{e.url} {e.state}" for e in endpoints)
        return line

    def cleanup(self) -> None:
        if self.by_pid:
            self.kill_all()
        for conn in list(self.control_conns):
            self._close_control(conn)
        if self.uring_control is not None:
            self.uring_control.close()
            self.uring_control = None
        if self.metrics is not None:
            self.metrics.shutdown()
            self.metrics = None
        for lane in self.lanes:
            for ring in (lane.audio, lane.result):
                ring.close()
            for w in lane.wakeups:
                w.close()
        if self.table is not None:
            self.table.close()
        if self.manifest is not None:
            self.manifest.unlink_all()
        with contextlib.suppress(OSError):
            live_config_path(self.config).unlink(missing_ok=True)
        if self.control_sock is not None:
            self.control_sock.close()
            self.control_path.unlink(missing_ok=True)
        if self.listen_sock is not None:
            self.listen_sock.close()
            if self.own_socket_file:
                self.socket_path.unlink(missing_ok=True)
        self.notifier.close()
        log.info("stopped; shared memory and sockets removed")
