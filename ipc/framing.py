"""Length-prefixed msgpack frames: a 4-byte big-endian body length, then one msgspec message.

One :class:`FrameWriter` and one :class:`FrameReader` per connection: the writer encodes into a
reused buffer with ``encode_into`` (no per-message allocation but the final bytes); the reader
checks the length against the maximum *before* it buffers the body, so an oversized frame costs
nothing but the 4-byte prefix.
"""

from __future__ import annotations

from typing import Any, Generic, TypeVar

import msgspec

from ipc.protocol import ErrorCode

PREFIX = 4
T = TypeVar("T")


class FrameTooLarge(Exception):
    """The peer announced a frame above the limit; the stream cannot be resynchronised."""

    def __init__(self, length: int, limit: int) -> None:
        super().__init__(f"frame of {length} bytes exceeds the limit of {limit} bytes")
        self.length = length
        self.limit = limit


class BadFrame(msgspec.Struct, frozen=True):
    """A frame whose body could not be decoded; the connection can go on with the next frame."""

    code: str
    message: str
    stream: str | None = None


class FrameWriter:
    """Encodes messages into one reused buffer; ``take()`` hands out what is pending."""

    __slots__ = ("_buf", "_enc")

    def __init__(self) -> None:
        self._enc = msgspec.msgpack.Encoder()
        self._buf = bytearray()

    def append(self, msg: Any) -> None:
        buf = self._buf
        start = len(buf)
        self._enc.encode_into(msg, buf, start + PREFIX)
        buf[start : start + PREFIX] = (len(buf) - start - PREFIX).to_bytes(4, "big")

    def __len__(self) -> int:
        return len(self._buf)

    def take(self) -> bytes:
        out = bytes(self._buf)
        self._buf.clear()
        return out

    def encode(self, msg: Any) -> bytes:
        """One frame on its own (keeps nothing pending)."""
        self.append(msg)
        return self.take()


def describe_decode_error(exc: msgspec.MsgspecError) -> tuple[str, str]:
    """Map a msgspec error to a wire error code and a message for the client."""
    text = str(exc)
    if isinstance(exc, msgspec.ValidationError):
        if "`$.type`" in text or "missing required field `type`" in text:
            return ErrorCode.UNKNOWN_MESSAGE, f"unknown or missing message type: {text}"
        return ErrorCode.INVALID_MESSAGE, text
    return ErrorCode.MALFORMED_FRAME, f"frame body is not valid msgpack: {text}"


class FrameReader(Generic[T]):
    """Incremental frame parser for one connection.

    ``feed()`` appends bytes; iterating yields decoded messages, or :class:`BadFrame` for a
    frame whose body did not decode. An oversized length raises :class:`FrameTooLarge`.
    """

    __slots__ = ("_buf", "_dec", "_pos", "max_frame_bytes")

    def __init__(self, type: Any, max_frame_bytes: int) -> None:
        self._dec: msgspec.msgpack.Decoder[T] = msgspec.msgpack.Decoder(type)
        self._buf = bytearray()
        self._pos = 0
        self.max_frame_bytes = max_frame_bytes

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._pos and self._pos == len(self._buf):
            self._buf.clear()
            self._pos = 0
        self._buf += data

    def pending(self) -> int:
        return len(self._buf) - self._pos

    def __iter__(self) -> FrameReader[T]:
        return self

    def __next__(self) -> T | BadFrame:
        buf, pos = self._buf, self._pos
        if len(buf) - pos < PREFIX:
            self._compact()
            raise StopIteration
        length = int.from_bytes(buf[pos : pos + PREFIX], "big")
        if length > self.max_frame_bytes:
            raise FrameTooLarge(length, self.max_frame_bytes)
        end = pos + PREFIX + length
        if len(buf) < end:
            self._compact()
            raise StopIteration
        self._pos = end
        try:
            return self._dec.decode(memoryview(buf)[pos + PREFIX : end])
        except msgspec.MsgspecError as exc:
            code, message = describe_decode_error(exc)
            return BadFrame(code, message)

    def _compact(self) -> None:
        # Drop consumed bytes once they dominate the buffer, so a long-lived connection's buffer
        # does not grow without bound and a small tail is not copied on every read.
        if self._pos > 65536 and self._pos * 2 > len(self._buf):
            del self._buf[: self._pos]
            self._pos = 0
