"""Inference backends: one small interface (:mod:`workers.backends.base`), several recognizers.

:func:`create_backend` builds the configured one; the embedded backend's pocketsphinx is only
imported when it is chosen.
"""

from __future__ import annotations

from daemon.config import BackendConfig
from workers.backends.base import (
    SAMPLE_RATE,
    Backend,
    BackendBusy,
    BackendError,
    Transcript,
    WordTiming,
)

__all__ = [
    "SAMPLE_RATE",
    "Backend",
    "BackendBusy",
    "BackendError",
    "Transcript",
    "WordTiming",
    "create_backend",
]


def create_backend(config: BackendConfig) -> Backend:
    """The backend ``config.kind`` names, built from its section of the config."""
    if config.kind == "embedded":
        from workers.backends.embedded import EmbeddedBackend

        return EmbeddedBackend(config.embedded)
    if config.kind == "null":
        from workers.backends.null import NullBackend

        return NullBackend(config.null)
    raise BackendError(f"unknown backend kind {config.kind!r}")
