"""Client protocol messages (msgspec tagged unions, tag field ``type``).

The wire format and every message and error code are documented in ``docs/protocol.md``;
change both together. Unknown fields are ignored (forward compatible), except inside ``vad``
where a misspelt setting must not pass silently; wrong types are errors.
"""

from __future__ import annotations

from typing import Literal

import msgspec

PROTOCOL_VERSION = 1
DEFAULT_MAX_FRAME_BYTES = 1024 * 1024
SAMPLE_RATES = (8000, 16000, 32000, 48000)


class _Msg(msgspec.Struct, tag_field="type", kw_only=True, omit_defaults=True):
    pass


# --- client -> daemon -------------------------------------------------------------------------


class VadOverrides(msgspec.Struct, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    """Per-stream VAD settings; fields left out keep the daemon's configured values."""

    enabled: bool | None = None
    aggressiveness: int | None = None
    frame_ms: int | None = None
    start_window_ms: int | None = None
    start_threshold: float | None = None
    end_window_ms: int | None = None
    end_threshold: float | None = None
    pre_roll_ms: int | None = None
    min_speech_ms: int | None = None
    max_utterance_s: float | None = None


class Hello(_Msg, tag="hello"):
    protocol: int
    client: str = ""


class Start(_Msg, tag="start"):
    stream: str
    sample_rate: int = 16000
    encoding: str = "s16le"
    interim: bool = True
    vad: VadOverrides | None = None


class Audio(_Msg, tag="audio"):
    stream: str
    seq: int
    pcm: bytes


class Finish(_Msg, tag="finish"):
    stream: str


class Cancel(_Msg, tag="cancel"):
    stream: str


class Ping(_Msg, tag="ping"):
    id: int = 0


ClientMessage = Hello | Start | Audio | Finish | Cancel | Ping


# --- daemon -> client -------------------------------------------------------------------------


class Limits(msgspec.Struct, kw_only=True):
    max_frame_bytes: int
    max_streams_per_connection: int
    sample_rates: list[int]
    encodings: list[str]


class Welcome(_Msg, tag="welcome"):
    protocol: int
    limits: Limits
    server: str = "asrd"
    backend: str = ""


class Started(_Msg, tag="started"):
    stream: str
    lane: int = 0


class Speech(_Msg, tag="speech"):
    stream: str
    event: Literal["start", "end"]
    at_ms: int
    utterance: int = 0
    reason: str = ""  # for "end": "silence", "max_length", "finish"
    confidence: float | None = None  # for "end": mean VAD speech share over the utterance


class Partial(_Msg, tag="partial"):
    stream: str
    utterance: int
    text: str
    seq: int = -1  # last Audio seq this partial covers


class Word(msgspec.Struct, array_like=True):
    word: str
    start_ms: int
    end_ms: int
    confidence: float


class Final(_Msg, tag="final"):
    stream: str
    utterance: int
    text: str
    start_ms: int
    end_ms: int
    words: list[Word] | None = None
    confidence: float | None = None


class StreamStats(msgspec.Struct, kw_only=True):
    audio_ms: int = 0
    chunks: int = 0
    speech_frames: int = 0
    silence_frames: int = 0
    utterances: int = 0


class Closed(_Msg, tag="closed"):
    stream: str
    reason: str  # "finished", "cancelled", "shutdown", "error"
    stats: StreamStats = msgspec.field(default_factory=StreamStats)


class Error(_Msg, tag="error"):
    code: str
    message: str
    stream: str | None = None
    retry_after_ms: int | None = None
    # The utterance an inference error is about; the stream goes on to its next utterance.
    utterance: int | None = None


class Pong(_Msg, tag="pong"):
    id: int = 0


ServerMessage = Welcome | Started | Speech | Partial | Final | Closed | Error | Pong


class ErrorCode:
    """The stable list of wire error codes (documented in docs/protocol.md)."""

    FRAME_TOO_LARGE = "frame_too_large"  # length prefix above max_frame_bytes; connection closed
    MALFORMED_FRAME = "malformed_frame"  # body is not msgpack
    UNKNOWN_MESSAGE = "unknown_message"  # no or unknown "type"
    INVALID_MESSAGE = "invalid_message"  # a field is missing, of the wrong type or out of range
    HELLO_REQUIRED = "hello_required"  # first message must be Hello
    UNSUPPORTED_PROTOCOL = "unsupported_protocol"
    UNKNOWN_STREAM = "unknown_stream"
    DUPLICATE_STREAM = "duplicate_stream"
    UNSUPPORTED_SAMPLE_RATE = "unsupported_sample_rate"
    UNSUPPORTED_ENCODING = "unsupported_encoding"
    ODD_BYTE_COUNT = "odd_byte_count"  # PCM s16le needs an even number of bytes
    BAD_SEQUENCE = "bad_sequence"  # Audio seq not increasing
    TOO_MANY_STREAMS = "too_many_streams"
    TOO_MANY_CONNECTIONS = "too_many_connections"
    WORKER_RESTARTED = "worker_restarted"  # the stream's lane lost a worker; start a new stream
    INFERENCE_UNAVAILABLE = "inference_unavailable"
    INFERENCE_FAILED = "inference_failed"
    SHUTTING_DOWN = "shutting_down"
    INTERNAL = "internal"

    ALL: tuple[str, ...] = ()


ErrorCode.ALL = tuple(v for k, v in vars(ErrorCode).items() if k.isupper() and k != "ALL")
