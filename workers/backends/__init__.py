"""Inference backends: one small interface (:mod:`workers.backends.base`), several recognizers.

:func:`create_backend` builds the configured one; the embedded backend's pocketsphinx is only
imported when it is chosen.
"""

from __future__ import annotations

from collections.abc import Callable

from daemon.config import BackendConfig
from workers.backends.base import (
    SAMPLE_RATE,
    Backend,
    BackendBusy,
    BackendError,
    BackendUnavailable,
    Transcript,
    WordTiming,
)

__all__ = [
    "SAMPLE_RATE",
    "Backend",
    "BackendBusy",
    "BackendError",
    "BackendUnavailable",
    "Transcript",
    "WordTiming",
    "create_backend",
]


def create_backend(
    config: BackendConfig,
    *,
    region_name: Callable[[int], str] | None = None,
    max_pending_audio_s: float = 120.0,
    is_stale_region: Callable[[str], bool] | None = None,
    label: str = "",
    on_progress: Callable[[], None] | None = None,
) -> Backend:
    """The backend ``config.kind`` names, built from its section of the config.

    For ``triton``: ``region_name(i)`` names the shared-memory region of endpoint ``i`` (one
    per lane and endpoint, by the supervisor's scheme; used with ``shared_memory = "system"``),
    ``max_pending_audio_s`` caps the audio kept per utterance for replays, ``is_stale_region``
    tells which regions registered on a server were left by dead workers, ``label``
    prefixes log lines, and ``on_progress`` is called between requests (the worker's
    heartbeat: a long series of requests is progress, not a hang).
    """
    if config.kind == "embedded":
        from workers.backends.embedded import EmbeddedBackend

        return EmbeddedBackend(config.embedded)
    if config.kind == "null":
        from workers.backends.null import NullBackend

        return NullBackend(config.null)
    if config.kind == "triton":
        from workers.backends.failover import FailoverBackend
        from workers.backends.triton import TritonBackend

        t = config.triton
        endpoints: list[TritonBackend] = []
        try:
            for i, url in enumerate(t.endpoints):
                system = t.shared_memory == "system" and region_name is not None
                endpoints.append(
                    TritonBackend(
                        url,
                        t.model,
                        protocol=t.protocol,
                        shm_name=region_name(i) if system and region_name else None,
                        shm_bytes=t.shm_bytes,
                        timeout_s=t.timeout_s,
                        on_progress=on_progress,
                    )
                )
            fallback: Backend | None = None
            if t.fallback == "embedded":
                from workers.backends.embedded import EmbeddedBackend

                fallback = EmbeddedBackend(config.embedded)
        except BaseException:
            for backend in endpoints:
                backend.close()
            raise
        return FailoverBackend(
            endpoints,
            t.breaker,
            fallback=fallback,
            max_pending_bytes=int(max_pending_audio_s * SAMPLE_RATE * 2),
            health_interval_s=t.health_interval_s,
            is_stale_region=is_stale_region,
            label=label,
            on_progress=on_progress,
        )
    raise BackendError(f"unknown backend kind {config.kind!r}")
