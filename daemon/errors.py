"""The error tree: every error asrd raises on purpose derives from :class:`AsrdError`.

Boot failures carry a reserved process exit code so that a supervisor (systemd, a shell script)
can tell them apart and does not restart a daemon that can never start.
"""

from __future__ import annotations


class AsrdError(Exception):
    """Root of every error asrd raises on purpose."""

    exit_code = 1


class ConfigError(AsrdError):
    """The configuration is invalid; the message names the field, the value and what is allowed."""

    exit_code = 78  # EX_CONFIG


class BootError(AsrdError):
    """The daemon cannot start (socket in use, no shared memory, unsupported platform)."""

    exit_code = 70  # EX_SOFTWARE


class SocketInUseError(BootError):
    """Another daemon already listens on the configured socket."""

    exit_code = 75  # EX_TEMPFAIL


class ShmError(BootError):
    """A shared-memory segment could not be created or mapped."""

    exit_code = 71  # EX_OSERR


class LanesFailedError(AsrdError):
    """Every lane stopped after a crash loop at run time: unlike a boot failure, a fresh start
    may help, so systemd's Restart=on-failure restarts it."""

    exit_code = 69  # EX_UNAVAILABLE


class RingError(AsrdError):
    """A shared-memory ring is corrupt or was attached with the wrong layout."""


class ProtocolError(AsrdError):
    """A client sent something the protocol does not allow; ``code`` is the wire error code."""

    def __init__(self, code: str, message: str, stream: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.stream = stream


class ClientError(AsrdError):
    """The daemon answered a client request with an error, or the connection failed."""

    def __init__(self, code: str, message: str, stream: str | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.stream = stream


class ConnectionClosed(ClientError):
    """The daemon closed the connection (or the client closed it and then used it)."""

    def __init__(self, message: str = "asrd closed the connection") -> None:
        super().__init__("connection_closed", message)
