"""Start a real ``asrd run`` as a child process and wait until it serves (demo, tests, benches).

Readiness is the daemon's own ``READY=1`` sd_notify datagram, received on a private datagram
socket passed as ``NOTIFY_SOCKET``, exactly as systemd would get it; no polling of the socket.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import BinaryIO


class DaemonProcess:
    def __init__(
        self,
        config_text: str = "",
        *,
        runtime_dir: Path | None = None,
        extra_env: dict[str, str] | None = None,
        stderr: int | None = None,
        log_path: Path | None = None,
    ) -> None:
        self._tmp = None
        if runtime_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="asrd-")
            runtime_dir = Path(self._tmp.name)
        self.runtime_dir = runtime_dir
        self.config_path = runtime_dir / "asrd.toml"
        self.config_path.write_text(f'runtime_dir = "{runtime_dir}"\n{config_text}')
        self.socket_path = runtime_dir / "asrd.sock"
        self.control_path = runtime_dir / "control.sock"
        self.notify_path = runtime_dir / "notify.sock"
        self.log_path = log_path
        self.extra_env = extra_env or {}
        self.stderr = stderr
        self.proc: subprocess.Popen[bytes] | None = None
        self.notify: socket.socket | None = None
        self.messages: list[str] = []
        self._log_file: BinaryIO | None = None

    def start(self, timeout: float = 60.0) -> DaemonProcess:
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify_path.unlink(missing_ok=True)
        self.notify.bind(str(self.notify_path))
        env = dict(os.environ, NOTIFY_SOCKET=str(self.notify_path), **self.extra_env)
        stderr = self.stderr
        if self.log_path is not None:
            self._log_file = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
            stderr = self._log_file.fileno()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "daemon.cli", "run", "--config", str(self.config_path)],
            env=env,
            stderr=stderr,
            start_new_session=True,
        )
        self.wait_for("READY=1", timeout)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def wait_for(self, line: str, timeout: float, *, after: int = 0) -> str:
        """Wait for a notify datagram containing ``line`` (among those from index ``after``
        of :attr:`messages` on); raise if the daemon exits first."""
        assert self.notify is not None and self.proc is not None
        deadline = time.monotonic() + timeout
        for msg in self.messages[after:]:
            if line in msg:
                return msg
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"asrd sent no {line} within {timeout} s: {self.messages}")
            if self.proc.poll() is not None:
                raise RuntimeError(f"asrd exited with {self.proc.returncode} before {line}")
            self.notify.settimeout(min(left, 0.2))
            try:
                data = self.notify.recv(65536).decode()
            except TimeoutError:
                continue
            self.messages.append(data)
            if line in data:
                return data

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, wait; SIGKILL the whole session if it does not exit in time."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        return self.wait()

    def wait(self, timeout: float | None = None) -> int:
        assert self.proc is not None
        code = self.proc.wait(timeout)
        if self.notify is not None:
            self.notify.close()
            self.notify = None
            self.notify_path.unlink(missing_ok=True)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        return code

    def kill_session(self) -> None:
        """Last resort for test teardown: nothing of this daemon may outlive the test."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)

    def cleanup(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> DaemonProcess:
        try:
            return self.start()
        except BaseException:  # never READY: leave nothing running
            self.kill_session()
            self.cleanup()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if self.proc is not None and self.proc.poll() is None:
                self.stop()
        finally:
            self.kill_session()
            self.cleanup()
