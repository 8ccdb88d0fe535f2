"""sd_notify without libsystemd: one datagram per state change to ``$NOTIFY_SOCKET``.

Does nothing when the variable is unset (not started by systemd, not under a test that listens).
The supervisor sends ``READY=1`` once every lane serves, ``STATUS=`` lines, ``WATCHDOG=1`` at
half of ``WATCHDOG_USEC`` only while every worker's heartbeat is fresh, ``EXTEND_TIMEOUT_USEC``
while workers are still starting (a backend warming up) and ``STOPPING=1`` on drain.
"""

from __future__ import annotations

import os
import socket


class Notifier:
    def __init__(self, address: str | None = None) -> None:
        addr = address if address is not None else os.environ.get("NOTIFY_SOCKET", "")
        self._addr: str | bytes | None = None
        self._sock: socket.socket | None = None
        if addr:
            # A leading "@" names an abstract socket.
            self._addr = b"\0" + addr[1:].encode() if addr.startswith("@") else addr
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def notify(self, *lines: str) -> bool:
        if self._sock is None or self._addr is None:
            return False
        try:
            # Never block the supervisor: a manager (or a test) that does not read its socket
            # fills it, and a blocking send would then stall the whole loop. Dropped instead.
            self._sock.sendto("\n".join(lines).encode(), socket.MSG_DONTWAIT, self._addr)
        except OSError:
            return False
        return True

    def ready(self, status: str = "") -> bool:
        return self.notify("READY=1", f"STATUS={status}") if status else self.notify("READY=1")

    def status(self, status: str) -> bool:
        return self.notify(f"STATUS={status}")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for ``seconds`` more before systemd's start (or stop) timeout fires."""
        return self.notify(f"EXTEND_TIMEOUT_USEC={int(seconds * 1e6)}")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_interval() -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half of ``WATCHDOG_USEC``), or None when systemd
    set no watchdog for this process (``WATCHDOG_PID``, when set, must be ours)."""
    pid = os.environ.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", "0"))
    except ValueError:
        return None
    return usec / 2e6 if usec > 0 else None


def listen_fds() -> list[int]:
    """File descriptors passed by socket activation (``LISTEN_FDS``), if they are for us."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return []
    try:
        count = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return []
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    return list(range(3, 3 + count))
