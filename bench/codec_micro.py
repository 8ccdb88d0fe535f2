"""Micro-benchmark of the per-chunk codec work on the hot path, in nanoseconds per operation.

Single process, single thread: the Python-side cost of what the client, the ingress worker and
the infer worker do to every 100 ms chunk (3200 bytes of 16 kHz s16le audio), with no I/O:

- ``audio_encode``: msgspec msgpack encoding of an ``ipc.protocol.Audio`` message (built
  once; the encoder reused, as every client and worker keeps one);
- ``audio_decode``: decoding that frame body as the ``ClientMessage`` tagged union, as the
  ingress worker does;
- ``audio_encode_decode``: both in a row (one hop of a chunk);
- ``framewriter_append_take``: :class:`~ipc.framing.FrameWriter` ``append`` of the Audio frame
  and ``take()`` (the bytes handed to the socket);
- ``partials_x10_framewriter``: ten ``Partial`` messages appended and one ``take()`` (what the
  ingress worker writes to a connection of 10 streams); ``partials_x10_encode_into``: the same
  with the design FrameWriter had before, ``encode_into`` a reused bytearray at an offset
  (kept here as the reference it was measured against);
- ``pcm_float_roundtrip``: a chunk to float32 and back to int16 bytes, the work that keeping
  raw bytes (converting only for a recognizer or resampler that needs floats) saves;
- ``framereader_feed_decode``: :class:`~ipc.framing.FrameReader` ``feed()`` of one frame and
  its decode;
- ``copy_3200_bytes``: ``bytes(bytearray)`` of 3200 bytes (allocation + copy), and
  ``copy_3200_into``: slice assignment into a preallocated ``bytearray`` (copy only);
- ``webrtcvad_30ms_speech`` / ``webrtcvad_30ms_silence``: one ``webrtcvad.Vad(2).is_speech``
  call on a 30 ms frame (960 bytes at 16 kHz) of speech from ``samples/`` and of silence: the
  VAD runs this per frame, about 3.3 calls per chunk;
- ``resample_8k_100ms``: python-soxr resampling 100 ms of 8 kHz audio to 16 kHz on a stream
  (what the ingress worker does for 8 kHz clients);
- ``decoder_new`` / ``decoder_reuse``: a pocketsphinx decoder for an utterance, created with
  the embedded backend's settings (model loaded) or taken from its pool and reset in place
  (``reinit_feat``, ``start_utt``, ``end_utt``): what the decoder pool saves per utterance.

Each figure is the best per-operation time over repeated batches for ``--seconds`` (minimum
of means, so scheduling noise is mostly left out). The CPU reference from ``bench.floor``
(one trivial Python function call) is measured in the same run and kept as the floor, so
``bench.compare`` can tell a slower machine from slower code. Prints a table and writes
``bench/results/codec-<timestamp>.json``.

    python -m bench codec [--seconds 0.5] [--smoke]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import wave
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import soxr
import webrtcvad

from bench.floor import cpu_reference, metric
from bench.load import REPO, RESULTS_DIR, machine_facts, write_report
from bench.ring_micro import best_ns
from ipc.framing import FrameReader, FrameWriter
from ipc.protocol import Audio, ClientMessage, Partial

CHUNK_BYTES = 3200
VAD_FRAME_BYTES = 960  # 30 ms at 16 kHz, s16le
FLOOR_KEY = "python_call_us"


def _speech_frame() -> bytes:
    """The loudest 30 ms frame of the first 16 kHz sample (speech, for the VAD)."""
    for path in sorted((REPO / "samples").glob("*.wav")):
        with wave.open(str(path), "rb") as w:
            if w.getframerate() != 16000 or w.getsampwidth() != 2 or w.getnchannels() != 1:
                continue
            pcm = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16)
        step = VAD_FRAME_BYTES // 2
        frames = [pcm[i : i + step] for i in range(0, len(pcm) - step, step)]
        loud = max(frames, key=lambda f: float(np.abs(f.astype(np.int32)).mean()))
        return loud.tobytes()
    rng = np.random.default_rng(1)  # no sample: noise is still a realistic VAD workload
    return (rng.normal(0, 3000, VAD_FRAME_BYTES // 2)).astype(np.int16).tobytes()


class EncodeIntoWriter:
    """FrameWriter's former design: ``encode_into`` one reused bytearray after a 4-byte gap,
    then the prefix written into the gap; ``take()`` copies the buffer out."""

    def __init__(self) -> None:
        self._enc = msgspec.msgpack.Encoder()
        self._buf = bytearray()

    def append(self, msg: Any) -> None:
        buf = self._buf
        start = len(buf)
        self._enc.encode_into(msg, buf, start + 4)
        buf[start : start + 4] = (len(buf) - start - 4).to_bytes(4, "big")

    def take(self) -> bytes:
        out = bytes(self._buf)
        self._buf.clear()
        return out


def run_codec(seconds: float) -> dict[str, float]:
    pcm = os.urandom(CHUNK_BYTES)
    msg = Audio(stream="stream-0001", seq=12345, pcm=pcm)
    enc = msgspec.msgpack.Encoder()
    dec: msgspec.msgpack.Decoder[Any] = msgspec.msgpack.Decoder(ClientMessage)
    body = enc.encode(msg)
    assert dec.decode(body) == msg
    writer = FrameWriter()
    frame = writer.encode(msg)
    reader: FrameReader[Any] = FrameReader(ClientMessage, 1 << 20)
    src = bytearray(pcm)
    dst = bytearray(CHUNK_BYTES)
    vad = webrtcvad.Vad(2)
    speech = _speech_frame()
    silence = bytes(VAD_FRAME_BYTES)
    pcm8k = np.frombuffer(os.urandom(1600), dtype=np.int16)  # 100 ms at 8 kHz
    partials = [
        Partial(stream=f"s{i}.0", utterance=1, text=f"chunks={i + 10} bytes=38400", seq=i + 9)
        for i in range(10)
    ]
    old_writer = EncodeIntoWriter()
    assert old_writer.append(partials[0]) is None and old_writer.take() == writer.encode(
        partials[0]
    )

    def encode(n: int) -> None:
        e, m = enc.encode, msg
        for _ in range(n):
            e(m)

    def decode(n: int) -> None:
        d, b = dec.decode, body
        for _ in range(n):
            d(b)

    def encode_decode(n: int) -> None:
        e, d, m = enc.encode, dec.decode, msg
        for _ in range(n):
            d(e(m))

    def writer_append_take(n: int) -> None:
        append, take, m = writer.append, writer.take, msg
        for _ in range(n):
            append(m)
            take()

    def ten_partials(w: Any, n: int) -> None:
        append, take, ms = w.append, w.take, partials
        for _ in range(n):
            for m in ms:
                append(m)
            take()

    def float_roundtrip(n: int) -> None:
        for _ in range(n):
            x = np.frombuffer(pcm, dtype=np.int16).astype(np.float32)
            np.rint(x).clip(-32768, 32767).astype(np.int16).tobytes()

    def reader_feed_decode(n: int) -> None:
        feed, f = reader.feed, frame
        for _ in range(n):
            feed(f)
            next(reader)

    def copy_bytes(n: int) -> None:
        s = src
        for _ in range(n):
            bytes(s)

    def copy_into(n: int) -> None:
        s, d = src, dst
        for _ in range(n):
            d[:] = s

    def vad_call(frame: bytes, n: int) -> None:
        is_speech = vad.is_speech
        for _ in range(n):
            is_speech(frame, 16000)

    stream = soxr.ResampleStream(8000, 16000, 1, dtype="int16")

    def resample(n: int) -> None:
        chunk = stream.resample_chunk
        for _ in range(n):
            chunk(pcm8k)

    from daemon.config import EmbeddedConfig
    from workers.backends.embedded import _new_decoder, decoder_options

    options = decoder_options(EmbeddedConfig())
    pooled = _new_decoder(options)

    def decoder_new(n: int) -> None:
        for _ in range(n):
            _new_decoder(options)

    def decoder_reuse(n: int) -> None:
        d = pooled
        for _ in range(n):
            d.reinit_feat()
            d.start_utt()
            d.end_utt()

    assert vad.is_speech(speech, 16000), "the speech frame should be voiced"
    cases: dict[str, tuple[Callable[[int], None], int]] = {
        "audio_encode_ns": (encode, 2000),
        "audio_decode_ns": (decode, 2000),
        "audio_encode_decode_ns": (encode_decode, 2000),
        "framewriter_append_take_ns": (writer_append_take, 2000),
        "partials_x10_framewriter_ns": (partial(ten_partials, writer), 500),
        "partials_x10_encode_into_ns": (partial(ten_partials, old_writer), 500),
        "framereader_feed_decode_ns": (reader_feed_decode, 2000),
        "pcm_float_roundtrip_ns": (float_roundtrip, 500),
        "copy_3200_bytes_ns": (copy_bytes, 5000),
        "copy_3200_into_ns": (copy_into, 5000),
        "webrtcvad_30ms_speech_ns": (partial(vad_call, speech), 500),
        "webrtcvad_30ms_silence_ns": (partial(vad_call, silence), 500),
        "resample_8k_100ms_ns": (resample, 200),
        "decoder_new_ns": (decoder_new, 1),
        "decoder_reuse_ns": (decoder_reuse, 20),
    }
    return {name: round(best_ns(fn, n, seconds), 1) for name, (fn, n) in cases.items()}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench codec",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(__doc__ or "").split("\n\n")[0],
    )
    p.add_argument("--seconds", type=float, default=0.5, help="time per measurement (0.5)")
    p.add_argument("--json", metavar="PATH", help="report path (default bench/results/...)")
    p.add_argument("--smoke", action="store_true", help="0.02 s per measurement (tests)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    seconds = 0.02 if args.smoke else args.seconds
    started = dt.datetime.now(dt.UTC)
    ref = cpu_reference(min(seconds, 0.2))
    results = run_codec(seconds)
    report = {
        "benchmark": "codec",
        "started_at": started.isoformat(timespec="seconds"),
        "smoke": args.smoke,
        "config": {"seconds": seconds, "chunk_bytes": CHUNK_BYTES, "vad_frame_bytes": 960},
        "machine": {**machine_facts(), "loadavg": [round(x, 2) for x in os.getloadavg()]},
        "results_ns": results,
        "floor": ref,
        "metrics": {k: metric(v, "ns", FLOOR_KEY) for k, v in results.items()},
    }
    path = args.json or RESULTS_DIR / f"codec-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    out = write_report(report, Path(path))
    call_ns = 1000 * ref[FLOOR_KEY]
    width = max(map(len, results))
    print(f"{'operation':<{width}}  {'ns/op':>9}  {'x Python call':>13}")
    for k, v in results.items():
        print(f"{k:<{width}}  {v:9.1f}  {v / call_ns:13.1f}")
    print(f"floor: one trivial Python call = {call_ns:.1f} ns (same run)")
    print(f"report: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
