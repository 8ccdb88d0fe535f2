"""Typed configuration: TOML decoded by msgspec into Structs with constraints.

Every error raised from here is a :class:`~daemon.errors.ConfigError` whose message names the
field path, the value found and what is allowed.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
import tomllib
from collections.abc import Mapping
from datetime import date, datetime, time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import msgspec
import msgspec.inspect as mi
from msgspec import Meta

from daemon.errors import ConfigError
from daemon.metrics import parse_listen
from ipc.heartbeat import MAX_ENDPOINTS
from workers.breaker import BreakerConfig

if TYPE_CHECKING:
    from ipc.protocol import VadOverrides

SAMPLE_RATES = (8000, 16000, 32000, 48000)
TRITON_WAIT_MARGIN_S = 1.0  # beyond timeout_s, how long a batch of Triton requests may take


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


CMN_PATTERN = r"^$|^-?[0-9]+(\.[0-9]+)?(,-?[0-9]+(\.[0-9]+)?){0,63}$"
DEFAULT_CMN_INIT = "46.76,4.62,-2.72,10.98,-8.89,3.91,-4.48,-3.61,1.56,-1.97,2.09,-1.85,0.46"


class EmbeddedConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """pocketsphinx, in the infer worker."""

    decoders: Annotated[int, Meta(ge=0, le=256)] = 2  # created at worker start
    max_decoders: Annotated[int, Meta(ge=1, le=256)] = 16  # bounded pool; more utterances wait
    # Threads that decode one pass's utterances at once in the infer worker (pocketsphinx is
    # called without the GIL: workers/backends/sphinx.py), so a lane is not held to one core;
    # 0 = 2 (1 on a single usable CPU), the best measured with a lane per CPU.
    threads: Annotated[int, Meta(ge=0, le=64)] = 0
    hmm: str = ""  # acoustic model directory; "" = the model the wheel ships
    dict: str = ""
    lm: str = ""
    beam: float | None = None
    # Initial cepstral mean of every utterance (comma-separated, one value per cepstral
    # coefficient); "" = the acoustic model's own (40,3,-1 for the shipped en-us model). The
    # default is the mean over real read speech, which cut word errors on the shared LibriVox
    # speech from 35 % to 25 % in streaming decodes (docs/recognizer.md).
    cmn_init: Annotated[str, Meta(pattern=CMN_PATTERN)] = DEFAULT_CMN_INIT
    # pocketsphinx's second (flat-lexicon) pass at utterance end: about 10x the final's latency
    # (100-400 ms against 10-150 ms), and it made word errors worse on the shared speech.
    fwdflat: bool = False


class NullConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A recognizer that does no recognition work: for benchmarks and pipeline tests."""

    delay_ms: Annotated[float, Meta(ge=0.0, le=10000.0)] = 0.0


class TritonConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A streaming recognizer on NVIDIA Triton Inference Server (docs/triton.md)."""

    # host:port of each server, in order of preference (the gRPC port with protocol "grpc",
    # the HTTP port with "http"). Utterances go to the first endpoint whose breaker is not
    # open; the others take over while it is.
    endpoints: Annotated[
        list[Annotated[str, Meta(pattern=r"^[^\s/]+:[0-9]{1,5}$")]],
        Meta(min_length=1, max_length=MAX_ENDPOINTS),
    ] = msgspec.field(default_factory=lambda: ["127.0.0.1:8001"])
    protocol: Literal["grpc", "http"] = "grpc"
    model: Annotated[str, Meta(min_length=1)] = "asr_streaming"
    # "system": tensors through a shared-memory region per lane and endpoint (a Triton on this
    # host); "none": tensors in the requests (a Triton on another host).
    shared_memory: Literal["system", "none"] = "system"
    shm_bytes: Annotated[int, Meta(ge=64 * 1024, le=256 * 1024 * 1024)] = 1024 * 1024
    timeout_s: Annotated[float, Meta(gt=0.0, le=600.0)] = 5.0  # per request
    # While every endpoint's breaker is open: "embedded" decodes on the embedded recognizer
    # ([backend.embedded]); "none" answers Error(code="inference_unavailable", retry_after_ms).
    fallback: Literal["none", "embedded"] = "none"
    # How often an endpoint that is down (breaker open, or not ready at start) is probed.
    health_interval_s: Annotated[float, Meta(gt=0.0, le=600.0)] = 1.0
    breaker: BreakerConfig = msgspec.field(default_factory=BreakerConfig)


class BackendConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    kind: Literal["embedded", "null", "triton"] = "embedded"
    interim_ms: Annotated[int, Meta(ge=0, le=60000)] = 300
    embedded: EmbeddedConfig = msgspec.field(default_factory=EmbeddedConfig)
    null: NullConfig = msgspec.field(default_factory=NullConfig)
    triton: TritonConfig = msgspec.field(default_factory=TritonConfig)


class PlacementConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Where lanes run (daemon/placement.py, docs/platform.md)."""

    # "bare-metal": lanes spread over NUMA nodes, workers pinned; "cloud": no pinning;
    # "auto": cloud on a virtual machine, else bare-metal.
    profile: Literal["auto", "bare-metal", "cloud"] = "auto"
    # Override the profile; "on" where it cannot work is an error at start.
    pinning: Literal["auto", "on", "off"] = "auto"
    numa: Literal["auto", "on", "off"] = "auto"


class IoConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # The control socket's I/O. "auto" = epoll, the faster path measured here; "io_uring"
    # needs the optional liburing binding and a kernel and sysctl that allow it (checked at
    # start, docs/platform.md).
    backend: Literal["auto", "epoll", "io_uring"] = "auto"
    # The ingress workers' event loop (the client sockets): "auto" = uvloop where it is
    # installed (it is a dependency; measured cheaper per chunk, docs/performance.md), else
    # asyncio's own; "uvloop" is refused at start where it cannot be imported.
    client_loop: Literal["auto", "asyncio", "uvloop"] = "auto"


class MetricsConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # Prometheus metrics over HTTP, served by the supervisor: "host:port" ("[v6]:port"), an IP
    # address, no name; port 0 takes any free port (the status says which). "" = off: the
    # same figures are on the control socket (`asrctl status`, `asrctl metrics`).
    listen: str = ""


class FaultsConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Fault injection for tests (workers/faults.py); refused unless $ASRD_ALLOW_FAULTS=1."""

    # "none", or what the chosen worker does once it has handled after_records ring records:
    # "crash" (SIGKILL itself), "hang" (a busy loop: no heartbeat), "slow" (sleep slow_ms per
    # record from then on), "corrupt" (push one record with a garbage payload), "stall" (infer:
    # the next recognizer call never returns, without holding Python's lock).
    action: Literal["none", "crash", "hang", "slow", "corrupt", "stall"] = "none"
    worker: Literal["ingress", "infer"] = "infer"
    lane: Annotated[int, Meta(ge=0, le=255)] = 0
    after_records: Annotated[int, Meta(ge=0)] = 0
    slow_ms: Annotated[float, Meta(ge=0.0, le=10000.0)] = 50.0
    # Only the worker's first generation: the respawned one runs normally.
    first_generation_only: bool = True


class RestartConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    backoff_initial_s: Annotated[float, Meta(ge=0.0, le=60.0)] = 0.1
    backoff_max_s: Annotated[float, Meta(ge=0.0, le=600.0)] = 10.0
    # A worker that fails this many times within failure_window_s stops its lane (reported in
    # status and the log) instead of being restarted for ever.
    max_failures: Annotated[int, Meta(ge=1, le=1000)] = 5
    failure_window_s: Annotated[float, Meta(gt=0.0, le=86400.0)] = 60.0
    # A worker whose heartbeat is stale gets SIGABRT (its Python stacks go to the log), then
    # SIGKILL if it is still there this many seconds later.
    abort_grace_s: Annotated[float, Meta(ge=0.0, le=60.0)] = 2.0


class Config(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    instance: Annotated[str, Meta(pattern=r"^[A-Za-z0-9_]{1,32}$")] = "default"
    runtime_dir: str = ""  # "" = $RUNTIME_DIRECTORY, $XDG_RUNTIME_DIR/asrd or /tmp/asrd-<uid>
    socket: str = ""  # "" = <runtime_dir>/asrd.sock
    control_socket: str = ""  # "" = <runtime_dir>/control.sock
    # extra octal: error messages show the value and bounds as 0o... like the TOML is written.
    socket_mode: Annotated[int, Meta(ge=0, le=0o777, extra={"octal": True})] = 0o660
    lanes: Literal["auto"] | Annotated[int, Meta(ge=1, le=256)] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    shutdown_timeout_s: Annotated[float, Meta(gt=0.0, le=3600.0)] = 15.0
    heartbeat_interval_s: Annotated[float, Meta(gt=0.0, le=60.0)] = 0.5
    heartbeat_timeout_s: Annotated[float, Meta(gt=0.0, le=600.0)] = 10.0
    limits: LimitsConfig = msgspec.field(default_factory=LimitsConfig)
    ring: RingConfig = msgspec.field(default_factory=RingConfig)
    vad: VadConfig = msgspec.field(default_factory=VadConfig)
    backend: BackendConfig = msgspec.field(default_factory=BackendConfig)
    placement: PlacementConfig = msgspec.field(default_factory=PlacementConfig)
    io: IoConfig = msgspec.field(default_factory=IoConfig)
    metrics: MetricsConfig = msgspec.field(default_factory=MetricsConfig)
    restart: RestartConfig = msgspec.field(default_factory=RestartConfig)
    faults: FaultsConfig = msgspec.field(default_factory=FaultsConfig)

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


# Reload (SIGHUP): which top-level fields a running daemon can take.
NEEDS_RESTART = (
    "instance",
    "runtime_dir",
    "socket",
    "control_socket",
    "socket_mode",
    "lanes",
    "placement",
    "io",
    "metrics",
)
NEEDS_NEW_WORKERS = ("backend", "ring", "heartbeat_interval_s", "heartbeat_timeout_s", "faults")
LIVE = ("vad", "limits", "log_level", "shutdown_timeout_s", "restart")


def live_config_path(cfg: Config) -> Path:
    """Where the supervisor puts the config it reloaded, for its workers to read on SIGHUP."""
    return cfg.resolved_runtime_dir() / f"live-config-{cfg.instance}.json"


def reload_plan(old: Config, new: Config) -> tuple[list[str], list[str], list[str]]:
    """(fields that need a restart, fields that need new workers, fields that apply live).

    ``backend.triton.breaker`` applies live; the rest of ``backend`` needs new workers."""

    def differs(name: str) -> bool:
        return bool(getattr(old, name) != getattr(new, name))

    restart = [f for f in NEEDS_RESTART if differs(f)]
    live = [f for f in LIVE if differs(f)]
    workers = [f for f in NEEDS_NEW_WORKERS if differs(f)]
    if "backend" in workers:
        ob, nb = old.backend, new.backend
        same_but_breaker = msgspec.structs.replace(
            nb, triton=msgspec.structs.replace(nb.triton, breaker=ob.triton.breaker)
        )
        if same_but_breaker == ob:
            workers.remove("backend")
            live.append("backend.triton.breaker")
    return restart, workers, live


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
    """Decode and validate TOML text; every problem is a :class:`ConfigError` naming ``source``."""
    if isinstance(data, bytes):
        try:
            # utf-8-sig: tolerate a BOM written by some Windows editors.
            data = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise ConfigError(
                f"{source}: not valid TOML: not UTF-8 (byte {exc.start}: {exc.reason})"
            ) from exc
    try:
        raw = tomllib.loads(data)
    except tomllib.TOMLDecodeError as exc:
        # tomllib's message ends with "(at line L, column C)".
        raise ConfigError(f"{source}: not valid TOML: {exc}") from exc
    try:
        cfg = msgspec.convert(raw, Config)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{source}: {_explain(exc, raw, Config)}") from exc
    problems = _cross_field_problems(cfg)
    if problems:
        raise ConfigError("\n".join(f"{source}: {p}" for p in problems))
    return cfg


def vad_with_overrides(
    base: VadConfig,
    overrides: VadOverrides | None,
    *,
    limits: LimitsConfig | None = None,
) -> VadConfig:
    """Apply a client's per-stream VAD overrides (fields that are not ``None``) to ``base``.

    The result is validated with the same rules and messages as the config file, with field
    paths ``vad.<name>`` and no file name, so the ingress worker can put the message on the wire.
    Given ``limits``, ``vad.max_utterance_s`` is also checked against
    ``limits.max_pending_audio_s``.
    """
    if overrides is None:
        return base
    changes = {k: v for k, v in msgspec.structs.asdict(overrides).items() if v is not None}
    if not changes:
        return base
    data = msgspec.to_builtins(base)
    data.update(changes)
    try:
        # strict: a client's 1.0 for an integer field or "30" for frame_ms is an error, as in TOML.
        vad = msgspec.convert(data, VadConfig)
    except msgspec.ValidationError as exc:
        raise ConfigError(_explain(exc, data, VadConfig, prefix=("vad",))) from exc
    problems = _vad_problems(vad)
    if limits is not None:
        problems += _pending_audio_problems(vad, limits)
    if problems:
        raise ConfigError("; ".join(problems))
    return vad


def config_to_toml_dict(cfg: Config) -> dict[str, Any]:
    """The config as plain TOML-ready builtins (for ``asrd check-config --print``).

    Fields that are ``None`` are left out: TOML has no null, and leaving a key out means the same.
    """
    out = msgspec.to_builtins(cfg)
    assert isinstance(out, dict)
    return _drop_none(out)


def _drop_none(d: dict[str, Any]) -> dict[str, Any]:
    return {k: _drop_none(v) if isinstance(v, dict) else v for k, v in d.items() if v is not None}


# --- cross-field rules --------------------------------------------------------------------------
# Each rule is something the types alone cannot say; each message names every field involved.

# Linux sockaddr_un.sun_path holds 108 bytes including the terminating NUL.
_SUN_PATH_MAX = 107


def _cross_field_problems(cfg: Config) -> list[str]:
    p: list[str] = []
    emb = cfg.backend.embedded
    # The pool is created with `decoders` and grows up to `max_decoders`; a cap below the
    # initial size cannot be honoured.
    if emb.max_decoders < emb.decoders:
        p.append(
            f"backend.embedded.max_decoders = {emb.max_decoders}: must be >= "
            f"backend.embedded.decoders ({emb.decoders})"
        )
    # A worker must be able to miss one heartbeat (scheduling jitter, a GC pause) without
    # being killed, so the timeout spans more than two intervals.
    if not cfg.heartbeat_timeout_s > 2 * cfg.heartbeat_interval_s:
        p.append(
            f"heartbeat_timeout_s = {_toml_value(cfg.heartbeat_timeout_s)}: must be more than "
            f"2 * heartbeat_interval_s (2 * {_fmt(cfg.heartbeat_interval_s)})"
        )
    # One Triton request blocks the infer worker's loop for up to timeout_s (plus a margin of
    # TRITON_WAIT_MARGIN_S for concurrent requests); the worker beats between requests.
    tri = cfg.backend.triton
    if cfg.backend.kind == "triton" and not (
        cfg.heartbeat_timeout_s > tri.timeout_s + 2 * TRITON_WAIT_MARGIN_S
    ):
        p.append(
            f"heartbeat_timeout_s = {_toml_value(cfg.heartbeat_timeout_s)}: must be more than "
            f"backend.triton.timeout_s + {_fmt(2 * TRITON_WAIT_MARGIN_S)} "
            f"({_fmt(tri.timeout_s)} + {_fmt(2 * TRITON_WAIT_MARGIN_S)}), or the supervisor "
            "would kill an infer worker waiting on a slow server"
        )
    # Fault injection makes workers crash on purpose: only where a test asked for it.
    if cfg.faults.action != "none" and os.environ.get("ASRD_ALLOW_FAULTS") != "1":
        p.append(
            f"faults.action = {cfg.faults.action!r}: fault injection is for tests; it is refused "
            "unless the environment has ASRD_ALLOW_FAULTS=1"
        )
    if cfg.metrics.listen:
        try:
            parse_listen(cfg.metrics.listen)
        except ValueError as exc:
            p.append(f"metrics.listen = {_toml_value(cfg.metrics.listen)}: {exc}")
    # Backoff doubles from the initial value and is capped at the maximum.
    if cfg.restart.backoff_max_s < cfg.restart.backoff_initial_s:
        p.append(
            f"restart.backoff_max_s = {_toml_value(cfg.restart.backoff_max_s)}: must be >= "
            f"restart.backoff_initial_s ({_fmt(cfg.restart.backoff_initial_s)})"
        )
    p += _vad_problems(cfg.vad)
    p += _pending_audio_problems(cfg.vad, cfg.limits)
    # One connection can never hold more streams than the whole daemon admits.
    lim = cfg.limits
    if lim.max_streams_per_connection > lim.max_streams:
        p.append(
            f"limits.max_streams_per_connection = {lim.max_streams_per_connection}: must be <= "
            f"limits.max_streams ({lim.max_streams})"
        )
    # Ring records are aligned to 8 bytes; a capacity that is not a multiple of 8 would leave
    # a tail no record can use and break the wrap-around arithmetic.
    for name in ("audio_bytes", "result_bytes"):
        size = getattr(cfg.ring, name)
        if size % 8:
            p.append(f"ring.{name} = {size}: must be a multiple of 8")
    p += _socket_problems(cfg)
    return p


def _vad_problems(vad: VadConfig) -> list[str]:
    p: list[str] = []
    # A window shorter than one frame holds no frame at all, so its share is undefined.
    for name in ("start_window_ms", "end_window_ms"):
        window = getattr(vad, name)
        if window < vad.frame_ms:
            p.append(f"vad.{name} = {window}: must be >= vad.frame_ms ({vad.frame_ms})")
    # A forced cut at max_utterance_s yields utterances of that length; if they were still
    # shorter than min_speech_ms every utterance would be discarded.
    if vad.min_speech_ms > vad.max_utterance_s * 1000:
        p.append(
            f"vad.min_speech_ms = {vad.min_speech_ms}: must be <= vad.max_utterance_s * 1000 "
            f"({_fmt(vad.max_utterance_s * 1000)})"
        )
    return p


def _pending_audio_problems(vad: VadConfig, limits: LimitsConfig) -> list[str]:
    # The audio of an unfinished utterance is kept for replay after a backend failure; an
    # utterance longer than that budget could not be replayed whole.
    if vad.max_utterance_s > limits.max_pending_audio_s:
        return [
            f"vad.max_utterance_s = {_toml_value(vad.max_utterance_s)}: must be <= "
            f"limits.max_pending_audio_s ({_fmt(limits.max_pending_audio_s)})"
        ]
    return []


def _socket_problems(cfg: Config) -> list[str]:
    p: list[str] = []
    sock, ctl = cfg.socket_path(), cfg.control_socket_path()
    if sock == ctl:
        p.append(
            f"control_socket = {_toml_value(cfg.control_socket)}: must differ from socket "
            f"({_toml_value(str(sock))})"
        )
    # bind() fails late and obscurely on an over-long path; say so at load time. Paths derived
    # from the environment ($XDG_RUNTIME_DIR) are not the config's fault and are left to bind().
    for name, path, default_name in (
        ("socket", sock, "asrd.sock"),
        ("control_socket", ctl, "control.sock"),
    ):
        size = len(os.fsencode(path))
        if size <= _SUN_PATH_MAX:
            continue
        if getattr(cfg, name):
            p.append(
                f"{name} = {_toml_value(getattr(cfg, name))}: must be at most {_SUN_PATH_MAX} "
                f"bytes (a Unix socket path limit), is {size}"
            )
        elif cfg.runtime_dir:
            p.append(
                f"runtime_dir = {_toml_value(cfg.runtime_dir)}: too long for the socket path "
                f"<runtime_dir>/{default_name} ({size} bytes, a Unix socket path allows "
                f"{_SUN_PATH_MAX})"
            )
    return p


# --- turning a msgspec ValidationError into a message about the TOML --------------------------

_AT = " - at `"
_UNKNOWN = "Object contains unknown field `"
_MISSING = "Object missing required field `"
_PATH_TOKEN = re.compile(r"\.([A-Za-z_][A-Za-z0-9_]*)|\[(\d+)\]")
_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
_MAX_VALUE_CHARS = 80
_MISSING_VALUE = object()


def _explain(
    exc: msgspec.ValidationError,
    data: Mapping[str, Any],
    root: type[msgspec.Struct],
    prefix: tuple[str | int, ...] = (),
) -> str:
    """Describe a validation error in TOML terms: field path, value as written, what is allowed.

    msgspec reports only the first error, as ``<what> - at `$.a.b```; we keep the path, look the
    value up in the decoded data and describe the allowed values from the field's type.
    """
    text = str(exc)
    what, sep, at = text.rpartition(_AT)
    if sep and at.startswith("$") and at.endswith("`"):
        path_text = at[:-1]
    else:
        what, path_text = text, "$"
    path = _parse_path(path_text)
    if path is None:
        return text  # a path we cannot follow: msgspec's own words are still accurate
    node_type = _type_at(mi.type_info(root), path)
    full = prefix + path

    if what.startswith(_UNKNOWN) and what.endswith("`"):
        name = what[len(_UNKNOWN) : -1]
        key = _key_path((*full, name))
        if isinstance(node_type, mi.StructType):
            allowed = [f.encode_name for f in node_type.fields]
            hint = difflib.get_close_matches(name, allowed, n=1)
            did_you_mean = f"; did you mean {_key_path((*full, hint[0]))}?" if hint else ""
            where = f" in [{_key_path(full)}]" if full else ""
            return f"unknown field {key} (allowed{where}: {', '.join(allowed)}){did_you_mean}"
        return f"unknown field {key}"
    if what.startswith(_MISSING) and what.endswith("`"):
        name = what[len(_MISSING) : -1]
        return f"missing required field {_key_path((*full, name))}"

    value = _lookup(data, path)
    octal = _is_octal(node_type)
    shown = "" if value is _MISSING_VALUE else f" = {_toml_value(value, octal=octal)}"
    if node_type is None:
        return f"{_key_path(full)}{shown}: {what}"
    return f"{_key_path(full) or '<top level>'}{shown}: must be {_allowed(node_type, full)}"


def _parse_path(text: str) -> tuple[str | int, ...] | None:
    if not text.startswith("$"):
        return None
    rest = text[1:]
    out: list[str | int] = []
    pos = 0
    while pos < len(rest):
        m = _PATH_TOKEN.match(rest, pos)
        if m is None:
            return None
        out.append(m.group(1) if m.group(1) is not None else int(m.group(2)))
        pos = m.end()
    return tuple(out)


def _type_at(t: mi.Type, path: tuple[str | int, ...]) -> mi.Type | None:
    for seg in path:
        t = _strip_optional(t)
        if isinstance(t, mi.StructType) and isinstance(seg, str):
            fields = {f.encode_name: f.type for f in t.fields}
            if seg not in fields:
                return None
            t = fields[seg]
        elif isinstance(t, mi.ListType | mi.VarTupleType | mi.SetType) and isinstance(seg, int):
            t = t.item_type
        elif isinstance(t, mi.DictType) and isinstance(seg, str):
            t = t.value_type
        else:
            return None
    return t


def _strip_optional(t: mi.Type) -> mi.Type:
    if isinstance(t, mi.Metadata):
        t = t.type
    if isinstance(t, mi.UnionType):
        rest = [x for x in t.types if not isinstance(x, mi.NoneType)]
        if len(rest) == 1:
            return rest[0]
    return t


def _lookup(data: Any, path: tuple[str | int, ...]) -> Any:
    for seg in path:
        try:
            data = data[seg]
        except (KeyError, IndexError, TypeError):
            return _MISSING_VALUE
    return data


def _key_path(path: tuple[str | int, ...]) -> str:
    out = ""
    for seg in path:
        if isinstance(seg, int):
            out += f"[{seg}]"
        else:
            key = seg if _BARE_KEY.match(seg) else json.dumps(seg, ensure_ascii=False)
            out += f".{key}" if out else key
    return out


def _is_octal(t: mi.Type | None) -> bool:
    return isinstance(t, mi.Metadata) and bool((t.extra or {}).get("octal"))


def _toml_value(v: Any, *, octal: bool = False) -> str:
    """Render a decoded value the way it would be written in TOML."""
    if isinstance(v, bool):
        text = "true" if v else "false"
    elif isinstance(v, int):
        text = oct(v) if octal and v >= 0 else str(v)
    elif isinstance(v, float):
        text = _fmt_float(v)
    elif isinstance(v, str):
        text = json.dumps(v, ensure_ascii=False)
    elif isinstance(v, datetime | date | time):
        text = v.isoformat()
    elif isinstance(v, list):
        text = "[" + ", ".join(_toml_value(x) for x in v) + "]"
    elif isinstance(v, dict):
        inner = ", ".join(f"{_key_path((k,))} = {_toml_value(x)}" for k, x in v.items())
        text = "{ " + inner + " }" if inner else "{}"
    else:
        text = repr(v)
    if len(text) > _MAX_VALUE_CHARS:
        text = text[: _MAX_VALUE_CHARS - 3] + "..."
    return text


def _fmt_float(x: float) -> str:
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return repr(x)


def _fmt(x: float) -> str:
    """A bound or computed number, without a pointless ".0"."""
    if isinstance(x, float) and x.is_integer() and abs(x) < 1e15:
        return str(int(x))
    return _fmt_float(x) if isinstance(x, float) else str(x)


def _bounds(t: mi.IntType | mi.FloatType, octal: bool = False) -> str:
    def fmt(x: float) -> str:
        return oct(x) if octal and isinstance(x, int) and x >= 0 else _fmt(x)

    if t.ge is not None and t.le is not None:
        parts = [f"from {fmt(t.ge)} to {fmt(t.le)}"]
    else:
        parts = [
            f"{op} {fmt(bound)}"
            for op, bound in ((">", t.gt), (">=", t.ge), ("<", t.lt), ("<=", t.le))
            if bound is not None
        ]
    if t.multiple_of is not None:
        parts.append(f"a multiple of {fmt(t.multiple_of)}")
    return " and ".join(parts)


def _allowed(t: mi.Type, path: tuple[str | int, ...], octal: bool = False) -> str:
    """What a field of type ``t`` accepts, in words, derived from the type annotations."""
    if isinstance(t, mi.Metadata):
        return _allowed(t.type, path, octal=_is_octal(t))
    if isinstance(t, mi.BoolType):
        return "true or false"
    if isinstance(t, mi.IntType | mi.FloatType):
        noun = "an integer" if isinstance(t, mi.IntType) else "a number"
        bounds = _bounds(t, octal)
        return f"{noun} {bounds}" if bounds else noun
    if isinstance(t, mi.StrType):
        parts = []
        if t.min_length is not None:
            parts.append(f"at least {t.min_length} characters")
        if t.max_length is not None:
            parts.append(f"at most {t.max_length} characters")
        if t.pattern is not None:
            parts.append(f"matching {t.pattern}")
        return "a string" + (" " + " and ".join(parts) if parts else "")
    if isinstance(t, mi.LiteralType):
        values = [_toml_value(v) for v in t.values]
        return values[0] if len(values) == 1 else "one of " + ", ".join(values)
    if isinstance(t, mi.UnionType):
        # TOML has no null: a None member means "leave the key out", said separately.
        members = [x for x in t.types if not isinstance(x, mi.NoneType)]
        words = [_allowed(x, path) for x in members]
        text = words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]
        if len(members) < len(t.types):
            text += " (or left out)"
        return text
    if isinstance(t, mi.StructType):
        return f"a table [{_key_path(path)}]" if path else "a table"
    if isinstance(t, mi.ListType | mi.VarTupleType | mi.SetType):
        return f"an array of {_plural(_allowed(t.item_type, path))}"
    if isinstance(t, mi.DictType):
        return f"a table of {_plural(_allowed(t.value_type, path))}"
    if isinstance(t, mi.AnyType):
        return "any value"
    return type(t).__name__.removesuffix("Type").lower()


def _plural(words: str) -> str:
    for article in ("an ", "a "):
        if words.startswith(article):
            return words[len(article) :]
    return words
