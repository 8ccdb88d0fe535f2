"""Typed configuration: TOML decoded by msgspec into Structs with constraints.

Every error raised from here is a :class:`~daemon.errors.ConfigError` whose message names the
field path, the value found and what is allowed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from daemon.errors import ConfigError

SAMPLE_RATES = (8000, 16000, 32000, 48000)


class VadConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Voice activity detection and endpointing, per stream (a client's Start may override)."""

    enabled: bool = True
    aggressiveness: Annotated[int, Meta(ge=0, le=3)] = 2
    frame_ms: Literal[10, 20, 30] = 30
    start_window_ms: Annotated[int, Meta(ge=10, le=5000)] = 300
    start_threshold: Annotated[float, Meta(gt=0.0, le=1.0)] = 0.6
    end_window_ms: Annotated[int, Meta(ge=10, le=10000)] = 600
    end_threshold: Annotated[float, Meta(gt=0.0, le=1.0)] = 0.9
    pre_roll_ms: Annotated[int, Meta(ge=0, le=5000)] = 300
    min_speech_ms: Annotated[int, Meta(ge=0, le=10000)] = 250
    max_utterance_s: Annotated[float, Meta(gt=0.0, le=600.0)] = 30.0


class LimitsConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    max_frame_bytes: Annotated[int, Meta(ge=4096, le=64 * 1024 * 1024)] = 1024 * 1024
    max_connections: Annotated[int, Meta(ge=1)] = 4096
    max_streams_per_connection: Annotated[int, Meta(ge=1)] = 256
    max_streams: Annotated[int, Meta(ge=1)] = 8192
    # Audio of one utterance kept until its final arrives (replay after a backend failure).
    max_pending_audio_s: Annotated[float, Meta(gt=0.0, le=3600.0)] = 120.0


class RingConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    audio_bytes: Annotated[int, Meta(ge=64 * 1024, le=1024 * 1024 * 1024)] = 8 * 1024 * 1024
    result_bytes: Annotated[int, Meta(ge=64 * 1024, le=1024 * 1024 * 1024)] = 2 * 1024 * 1024


class EmbeddedConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """pocketsphinx, in the infer worker."""

    decoders: Annotated[int, Meta(ge=0, le=256)] = 2  # created at worker start
    max_decoders: Annotated[int, Meta(ge=1, le=256)] = 16  # bounded pool; more utterances wait
    hmm: str = ""  # acoustic model directory; "" = the model the wheel ships
    dict: str = ""
    lm: str = ""
    beam: float | None = None


class NullConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A recognizer that does no recognition work: for benchmarks and pipeline tests."""

    delay_ms: Annotated[float, Meta(ge=0.0, le=10000.0)] = 0.0


class BackendConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    kind: Literal["embedded", "null"] = "embedded"
    interim_ms: Annotated[int, Meta(ge=0, le=60000)] = 300
    embedded: EmbeddedConfig = msgspec.field(default_factory=EmbeddedConfig)
    null: NullConfig = msgspec.field(default_factory=NullConfig)


class RestartConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    backoff_initial_s: Annotated[float, Meta(ge=0.0, le=60.0)] = 0.1
    backoff_max_s: Annotated[float, Meta(ge=0.0, le=600.0)] = 10.0


class Config(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    instance: Annotated[str, Meta(pattern=r"^[A-Za-z0-9_]{1,32}$")] = "default"
    runtime_dir: str = ""  # "" = $RUNTIME_DIRECTORY, $XDG_RUNTIME_DIR/asrd or /tmp/asrd-<uid>
    socket: str = ""  # "" = <runtime_dir>/asrd.sock
    control_socket: str = ""  # "" = <runtime_dir>/control.sock
    socket_mode: Annotated[int, Meta(ge=0, le=0o777)] = 0o660
    lanes: Literal["auto"] | Annotated[int, Meta(ge=1, le=256)] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    shutdown_timeout_s: Annotated[float, Meta(gt=0.0, le=3600.0)] = 15.0
    heartbeat_interval_s: Annotated[float, Meta(gt=0.0, le=60.0)] = 0.5
    heartbeat_timeout_s: Annotated[float, Meta(gt=0.0, le=600.0)] = 10.0
    limits: LimitsConfig = msgspec.field(default_factory=LimitsConfig)
    ring: RingConfig = msgspec.field(default_factory=RingConfig)
    vad: VadConfig = msgspec.field(default_factory=VadConfig)
    backend: BackendConfig = msgspec.field(default_factory=BackendConfig)
    restart: RestartConfig = msgspec.field(default_factory=RestartConfig)

    def resolved_runtime_dir(self) -> Path:
        if self.runtime_dir:
            return Path(self.runtime_dir)
        if os.environ.get("RUNTIME_DIRECTORY"):
            return Path(os.environ["RUNTIME_DIRECTORY"].split(":")[0])
        if os.environ.get("XDG_RUNTIME_DIR"):
            return Path(os.environ["XDG_RUNTIME_DIR"]) / "asrd"
        return Path(f"/tmp/asrd-{os.getuid()}")

    def socket_path(self) -> Path:
        return Path(self.socket) if self.socket else self.resolved_runtime_dir() / "asrd.sock"

    def control_socket_path(self) -> Path:
        if self.control_socket:
            return Path(self.control_socket)
        return self.resolved_runtime_dir() / "control.sock"

    def lane_count(self) -> int:
        if self.lanes == "auto":
            return max(1, len(os.sched_getaffinity(0)))
        return self.lanes


def load_config(path: str | Path | None) -> Config:
    """Read and validate a TOML config; ``None`` gives the defaults."""
    if path is None:
        return Config()
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from exc
    return parse_config(data, source=str(path))


def parse_config(data: bytes | str, source: str = "<config>") -> Config:
    try:
        return msgspec.toml.decode(data, type=Config)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{source}: {exc}") from exc
    except msgspec.DecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from exc
