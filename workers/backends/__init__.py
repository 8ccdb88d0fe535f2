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


def create_backend(config: BackendConfig, shm_name: str | None = None) -> Backend:
    """The backend ``config.kind`` names, built from its section of the config.

    ``shm_name``: the name of the shared-memory region a ``triton`` backend with
    ``shared_memory = "system"`` creates (one per lane, named by the supervisor's scheme).
    """
    if config.kind == "embedded":
        from workers.backends.embedded import EmbeddedBackend

        return EmbeddedBackend(config.embedded)
    if config.kind == "null":
        from workers.backends.null import NullBackend

        return NullBackend(config.null)
    if config.kind == "triton":
        from workers.backends.triton import TritonBackend

        t = config.triton
        return TritonBackend(
            t.url,
            t.model,
            shm_name=shm_name if t.shared_memory == "system" else None,
            shm_bytes=t.shm_bytes,
            timeout_s=t.timeout_s,
        )
    raise BackendError(f"unknown backend kind {config.kind!r}")
