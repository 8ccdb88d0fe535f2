"""Wire format: messages round-trip through FrameWriter/FrameReader; bad input is classified."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any, get_args

import msgspec
import pytest

from ipc.framing import BadFrame, FrameReader, FrameTooLarge, FrameWriter
from ipc.protocol import (
    DEFAULT_MAX_FRAME_BYTES,
    Audio,
    Cancel,
    ClientMessage,
    Closed,
    Error,
    ErrorCode,
    Final,
    Finish,
    Hello,
    Limits,
    Partial,
    Ping,
    Pong,
    ServerMessage,
    Speech,
    Start,
    Started,
    StreamStats,
    VadOverrides,
    Welcome,
    Word,
)

DOC = Path(__file__).resolve().parents[1] / "docs" / "protocol.md"

CLIENT_MESSAGES: list[Any] = [
    Hello(protocol=1, client="test-client/1.0"),
    Hello(protocol=1),
    Start(stream="s1"),
    Start(
        stream="call-42",
        sample_rate=8000,
        encoding="s16le",
        interim=False,
        vad=VadOverrides(
            enabled=True,
            aggressiveness=3,
            frame_ms=20,
            start_window_ms=200,
            start_threshold=0.5,
            end_window_ms=800,
            end_threshold=0.95,
            pre_roll_ms=250,
            min_speech_ms=100,
            max_utterance_s=12.5,
        ),
    ),
    Start(stream="bench", vad=VadOverrides(enabled=False)),
    Audio(stream="s1", seq=0, pcm=b""),
    Audio(stream="s1", seq=7, pcm=bytes(range(256)) * 13),
    Audio(stream="ünïcode-strëam", seq=2**62, pcm=b"\x00\x80" * 40000),  # bin32 payload
    Finish(stream="s1"),
    Cancel(stream="s1"),
    Ping(),
    Ping(id=123456789),
]

SERVER_MESSAGES: list[Any] = [
    Welcome(
        protocol=1,
        limits=Limits(
            max_frame_bytes=DEFAULT_MAX_FRAME_BYTES,
            max_streams_per_connection=256,
            sample_rates=[8000, 16000, 32000, 48000],
            encodings=["s16le"],
        ),
        server="asrd 0.1.0",
        backend="embedded",
    ),
    Started(stream="s1"),
    Started(stream="s1", lane=3),
    Speech(stream="s1", event="start", at_ms=120, utterance=0),
    Speech(stream="s1", event="end", at_ms=2040, utterance=0, reason="silence", confidence=0.83),
    Partial(stream="s1", utterance=0, text="go forward"),
    Partial(stream="s1", utterance=2, text="", seq=41),
    Final(stream="s1", utterance=0, text="go forward ten meters", start_ms=120, end_ms=2040),
    Final(
        stream="s1",
        utterance=1,
        text="hello world",
        start_ms=2500,
        end_ms=3300,
        words=[Word("hello", 2500, 2900, 0.9), Word("world", 2900, 3300, 0.75)],
        confidence=0.82,
    ),
    Closed(stream="s1", reason="finished"),
    Closed(
        stream="s1",
        reason="cancelled",
        stats=StreamStats(
            audio_ms=1000, chunks=10, speech_frames=30, silence_frames=3, utterances=1
        ),
    ),
    Error(code=ErrorCode.BAD_SEQUENCE, message="seq 3 after 5", stream="s1"),
    Error(code=ErrorCode.INFERENCE_UNAVAILABLE, message="breaker open", retry_after_ms=1500),
    Error(code=ErrorCode.MALFORMED_FRAME, message="not msgpack"),
    Pong(),
    Pong(id=99),
]


def _frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def _drain(reader: FrameReader[Any]) -> list[Any]:
    return list(reader)


def test_every_message_type_has_a_sample() -> None:
    assert {type(m) for m in CLIENT_MESSAGES} == set(get_args(ClientMessage))
    assert {type(m) for m in SERVER_MESSAGES} == set(get_args(ServerMessage))


@pytest.mark.parametrize(
    ("messages", "union"),
    [(CLIENT_MESSAGES, ClientMessage), (SERVER_MESSAGES, ServerMessage)],
    ids=["client", "server"],
)
def test_round_trip(messages: list[Any], union: Any) -> None:
    writer = FrameWriter()
    for msg in messages:
        reader: FrameReader[Any] = FrameReader(union, DEFAULT_MAX_FRAME_BYTES)
        data = writer.encode(msg)
        assert int.from_bytes(data[:4], "big") == len(data) - 4
        reader.feed(data)
        assert _drain(reader) == [msg]
        assert reader.pending() == 0


def test_writer_batches_frames_and_reuses_its_buffer() -> None:
    writer = FrameWriter()
    for msg in CLIENT_MESSAGES:
        writer.append(msg)
    assert len(writer) > 0
    data = writer.take()
    assert len(writer) == 0
    reader: FrameReader[Any] = FrameReader(ClientMessage, DEFAULT_MAX_FRAME_BYTES)
    reader.feed(data)  # several frames in one feed
    assert _drain(reader) == CLIENT_MESSAGES


@pytest.mark.parametrize(
    ("messages", "union"),
    [(CLIENT_MESSAGES[:7] + CLIENT_MESSAGES[8:], ClientMessage), (SERVER_MESSAGES, ServerMessage)],
    ids=["client", "server"],
)
def test_split_at_every_byte_boundary(messages: list[Any], union: Any) -> None:
    writer = FrameWriter()
    for msg in messages:
        writer.append(msg)
    data = writer.take()
    for cut in range(len(data) + 1):
        reader: FrameReader[Any] = FrameReader(union, DEFAULT_MAX_FRAME_BYTES)
        reader.feed(data[:cut])
        got = _drain(reader)
        reader.feed(data[cut:])
        got += _drain(reader)
        assert got == messages, f"split at byte {cut}"


def test_byte_by_byte() -> None:
    writer = FrameWriter()
    for msg in SERVER_MESSAGES:
        writer.append(msg)
    data = writer.take()
    reader: FrameReader[Any] = FrameReader(ServerMessage, DEFAULT_MAX_FRAME_BYTES)
    got: list[Any] = []
    for i in range(len(data)):
        reader.feed(data[i : i + 1])
        got += _drain(reader)
    assert got == SERVER_MESSAGES


def test_long_connection_buffer_is_compacted() -> None:
    # Many frames fed in pieces that never line up with frame ends: the reader must not keep
    # every consumed byte.
    writer = FrameWriter()
    frame = writer.encode(Audio(stream="s", seq=1, pcm=b"\x01\x02" * 1000))
    reader: FrameReader[Any] = FrameReader(ClientMessage, DEFAULT_MAX_FRAME_BYTES)
    stream = frame * 500
    n = 0
    for off in range(0, len(stream), 777):
        reader.feed(stream[off : off + 777])
        n += len(_drain(reader))
        assert len(reader._buf) < 200_000
    assert n == 500


def _decode_one(body: bytes, union: Any = ClientMessage) -> Any:
    reader: FrameReader[Any] = FrameReader(union, DEFAULT_MAX_FRAME_BYTES)
    reader.feed(_frame(body))
    items = _drain(reader)
    assert len(items) == 1
    return items[0]


enc = msgspec.msgpack.encode

BAD_INPUTS = [
    ("reserved byte", b"\xc1", ErrorCode.MALFORMED_FRAME),
    ("truncated map", b"\x82\xa4ty", ErrorCode.MALFORMED_FRAME),
    ("trailing bytes", enc({"type": "ping"}) + b"\x00", ErrorCode.MALFORMED_FRAME),
    ("empty body", b"", ErrorCode.MALFORMED_FRAME),
    ("truncated string", b"\x81\xa4type\xa4pi", ErrorCode.MALFORMED_FRAME),
    ("unknown type", enc({"type": "transcribe", "stream": "a"}), ErrorCode.UNKNOWN_MESSAGE),
    ("missing type", enc({"stream": "a", "seq": 1, "pcm": b""}), ErrorCode.UNKNOWN_MESSAGE),
    ("server type sent by client", enc({"type": "pong", "id": 1}), ErrorCode.UNKNOWN_MESSAGE),
    ("type not a string", enc({"type": 5}), ErrorCode.UNKNOWN_MESSAGE),
    (
        "seq is a string",
        enc({"type": "audio", "stream": "a", "seq": "1", "pcm": b""}),
        ErrorCode.INVALID_MESSAGE,
    ),
    (
        "pcm is a str, not bin",
        enc({"type": "audio", "stream": "a", "seq": 1, "pcm": "abc"}),
        ErrorCode.INVALID_MESSAGE,
    ),
    ("missing pcm", enc({"type": "audio", "stream": "a", "seq": 1}), ErrorCode.INVALID_MESSAGE),
    ("missing stream", enc({"type": "finish"}), ErrorCode.INVALID_MESSAGE),
    ("missing protocol", enc({"type": "hello", "client": "x"}), ErrorCode.INVALID_MESSAGE),
    (
        "interim not a bool",
        enc({"type": "start", "stream": "a", "interim": "yes"}),
        ErrorCode.INVALID_MESSAGE,
    ),
    (
        "unknown VAD field",
        enc({"type": "start", "stream": "a", "vad": {"enabeld": False}}),
        ErrorCode.INVALID_MESSAGE,
    ),
    ("not a map", enc([1, 2, 3]), ErrorCode.INVALID_MESSAGE),
]


@pytest.mark.parametrize(
    ("body", "code"), [b[1:] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS]
)
def test_bad_input_codes(body: bytes, code: str) -> None:
    item = _decode_one(body)
    assert isinstance(item, BadFrame)
    assert item.code == code, item.message
    assert item.code in ErrorCode.ALL
    assert item.message


def test_bad_frame_does_not_desynchronise() -> None:
    writer = FrameWriter()
    data = (
        writer.encode(Ping(id=1))
        + _frame(b"\xc1")
        + _frame(enc({"type": "nope"}))
        + writer.encode(Ping(id=2))
    )
    reader: FrameReader[Any] = FrameReader(ClientMessage, DEFAULT_MAX_FRAME_BYTES)
    reader.feed(data)
    items = _drain(reader)
    assert items[0] == Ping(id=1)
    assert isinstance(items[1], BadFrame) and items[1].code == ErrorCode.MALFORMED_FRAME
    assert isinstance(items[2], BadFrame) and items[2].code == ErrorCode.UNKNOWN_MESSAGE
    assert items[3] == Ping(id=2)


def test_unknown_fields_are_ignored() -> None:
    # Forward compatibility: a newer peer may add fields.
    assert _decode_one(enc({"type": "ping", "id": 3, "trace": "x"})) == Ping(id=3)
    msg = _decode_one(
        enc({"type": "partial", "stream": "a", "utterance": 0, "text": "t", "new": [1]}),
        ServerMessage,
    )
    assert msg == Partial(stream="a", utterance=0, text="t")


def test_omitted_defaults_decode_to_defaults() -> None:
    msg = _decode_one(enc({"type": "start", "stream": "a"}))
    assert msg == Start(stream="a", sample_rate=16000, encoding="s16le", interim=True, vad=None)
    closed = _decode_one(
        enc({"type": "closed", "stream": "a", "reason": "finished"}), ServerMessage
    )
    assert closed.stats == StreamStats()


def test_words_are_arrays() -> None:
    body = FrameWriter().encode(
        Final(
            stream="a", utterance=0, text="hi", start_ms=0, end_ms=5, words=[Word("hi", 0, 5, 1.0)]
        )
    )[4:]
    assert msgspec.msgpack.decode(body)["words"] == [["hi", 0, 5, 1.0]]


def test_frame_too_large_before_body() -> None:
    limit = 4096
    reader: FrameReader[Any] = FrameReader(ClientMessage, limit)
    reader.feed(struct.pack(">I", limit + 1))  # only the prefix: no body has arrived
    with pytest.raises(FrameTooLarge) as info:
        next(reader)
    assert info.value.length == limit + 1
    assert info.value.limit == limit


def test_frame_too_large_partial_prefix_waits() -> None:
    reader: FrameReader[Any] = FrameReader(ClientMessage, 4096)
    reader.feed(b"\x00\x00")
    assert _drain(reader) == []  # half a prefix: nothing to say yet
    reader.feed(b"\xff\xff")
    with pytest.raises(FrameTooLarge):
        next(reader)


def test_frame_at_limit_is_accepted() -> None:
    writer = FrameWriter()
    msg = Audio(stream="s", seq=0, pcm=b"")
    overhead = len(writer.encode(msg)) - 4
    # bin8 header (2 bytes) becomes bin16 (3 bytes) for the payload sizes used here.
    limit = 4096
    msg = Audio(stream="s", seq=0, pcm=b"\x00" * (limit - overhead - 1))
    data = writer.encode(msg)
    assert len(data) - 4 == limit
    reader: FrameReader[Any] = FrameReader(ClientMessage, limit)
    reader.feed(data[:4])
    assert _drain(reader) == []  # prefix at the limit: waits for the body
    reader.feed(data[4:])
    assert _drain(reader) == [msg]


def test_error_codes_are_stable_and_documented() -> None:
    assert len(set(ErrorCode.ALL)) == len(ErrorCode.ALL) == 19
    text = DOC.read_text()
    for code in ErrorCode.ALL:
        assert f"`{code}`" in text, f"{code} missing from docs/protocol.md"


def test_doc_hex_example_matches_encoding() -> None:
    frame = FrameWriter().encode(Ping(id=1))
    assert frame.hex(" ") in DOC.read_text()
