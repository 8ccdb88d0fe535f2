"""``asrctl``: command-line client for asrd (transcribe WAV files, daemon status, ping).

Exit codes: 0 ok, 1 a stream failed (the daemon sent an Error), 2 usage or connection error,
130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import threading
import time
import wave
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import IO, Any

import msgspec
import numpy as np

from daemon.config import load_config
from daemon.errors import AsrdError, ClientError
from daemon.metrics import render as render_metrics
from ipc.client import STREAM_ENDING_CODES, Client, ConnectionClosed, ControlClient
from ipc.control import Status
from ipc.protocol import (
    SAMPLE_RATES,
    Closed,
    Error,
    Final,
    Partial,
    ServerMessage,
    Started,
    VadOverrides,
)

EXIT_OK = 0
EXIT_STREAM_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

RESAMPLE_TO = 16000
PROGRESS_MIN_S = 10.0  # show a progress indication only for audio at least this long


class WavError(AsrdError):
    """A WAV file asrctl cannot send."""


# --- audio files ------------------------------------------------------------------------------


@dataclass
class WavAudio:
    path: str
    pcm: bytes  # s16le mono
    sample_rate: int
    notes: list[str] = field(default_factory=list)  # conversions done, for stderr

    @property
    def duration_s(self) -> float:
        return len(self.pcm) / 2 / self.sample_rate


def load_wav(path: str | os.PathLike[str], rates: Sequence[int] = SAMPLE_RATES) -> WavAudio:
    """Read a 16-bit PCM WAV as mono s16le at one of ``rates``.

    Several channels are averaged into one; a rate outside ``rates`` is resampled (soxr) to
    16 kHz. Both are noted in ``notes``. Anything but 16-bit PCM raises :class:`WavError`.
    """
    name = os.fspath(path)
    try:
        with wave.open(name, "rb") as wav:
            channels = wav.getnchannels()
            width = wav.getsampwidth()
            rate = wav.getframerate()
            frames = wav.readframes(wav.getnframes())
    except FileNotFoundError:
        raise WavError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise WavError(f"{name}: is a directory") from None
    except (wave.Error, EOFError) as exc:
        # wave reads only integer PCM; float and compressed WAVs end up here too.
        raise WavError(f"{name}: not a 16-bit PCM WAV file ({exc})") from None
    except OSError as exc:
        raise WavError(f"{name}: cannot read: {exc.strerror}") from None
    if width != 2:
        raise WavError(
            f"{name}: {8 * width}-bit samples; asrd takes 16-bit PCM "
            f"(convert with: sox {name} -b 16 out.wav)"
        )
    notes: list[str] = []
    whole = len(frames) - len(frames) % (2 * channels)  # a truncated file may end mid-frame
    samples = np.frombuffer(frames[:whole], dtype="<i2")
    if channels > 1:
        kind = "stereo" if channels == 2 else f"{channels} channels"
        notes.append(f"{kind}, downmixed to mono")
        mean = samples.reshape(-1, channels).astype(np.int32).sum(axis=1) / channels
        samples = np.rint(mean).astype("<i2")
    if rate not in rates:
        import soxr  # only needed here; keeps the common path's import time down

        notes.append(f"{rate} Hz, resampled to {RESAMPLE_TO} Hz client-side")
        samples = soxr.resample(samples, rate, RESAMPLE_TO).astype("<i2", copy=False)
        rate = RESAMPLE_TO
    return WavAudio(name, samples.tobytes(), rate, notes)


# --- output -----------------------------------------------------------------------------------


@dataclass
class FileStream:
    """One file being transcribed on one stream."""

    audio: WavAudio
    stream: str
    label: str  # what output lines are prefixed with
    sent: int = 0  # bytes of audio sent so far (written by the sender thread)
    started: bool = False
    done: bool = False  # Closed received
    failed: bool = False  # ended by an Error
    finals: int = 0


CLEAR = "\r\x1b[2K"


class Renderer:
    """Turns stream events into output: JSON lines, plain lines, or a live terminal view."""

    def __init__(
        self,
        files: list[FileStream],
        *,
        json: bool,
        partials: bool,
        out: IO[str],
        err: IO[str],
    ) -> None:
        self.files = files
        self.json = json
        self.out = out
        self.err = err
        self.tty = not json and out.isatty()
        self.partials = partials
        self.multi = len(files) > 1
        total = sum(f.audio.duration_s for f in files)
        self.progress_on = total >= PROGRESS_MIN_S
        # Progress goes on stdout's live line on a terminal, else on stderr if that is one.
        self.err_progress = self.progress_on and not self.tty and err.isatty()
        self.live_text = ""  # latest partial shown on the live line (with its prefix)
        self.live_shown = False
        self.err_shown = False
        self.shown_pct: int | None = None
        self._json = msgspec.json.Encoder()

    def prefix(self, f: FileStream) -> str:
        return f"{f.label}: " if self.multi else ""

    def _width(self) -> int:
        return max(20, shutil.get_terminal_size((100, 24)).columns - 1)

    def _percent(self) -> int | None:
        total = sum(len(f.audio.pcm) for f in self.files)
        sent = sum(f.sent for f in self.files)
        if not self.progress_on or not total or sent >= total:
            return None
        return 100 * sent // total

    def _draw_live(self) -> None:
        pct = self.shown_pct = self._percent()
        line = (f"[{pct:3d}%] " if pct is not None else "") + self.live_text
        if not line and not self.live_shown:
            return
        # Cut to the terminal width: a wrapped line cannot be rewritten with a carriage return.
        self.out.write(CLEAR + line[-self._width() :] if line else CLEAR)
        self.out.flush()
        self.live_shown = bool(line)

    def _clear_live(self) -> None:
        if self.live_shown:
            self.out.write(CLEAR)
            self.live_shown = False

    def progress(self) -> None:
        """Redraw the progress indication if the percentage moved."""
        if not self.progress_on or self._percent() == self.shown_pct:
            return
        if self.tty:
            self._draw_live()
        elif self.err_progress:
            pct = self.shown_pct = self._percent()
            if pct is not None:
                self.err.write(f"\r[{pct:3d}%] audio sent")
                self.err.flush()
                self.err_shown = True
            elif self.err_shown:
                self.err.write(CLEAR)
                self.err_shown = False

    def event(self, f: FileStream, msg: ServerMessage) -> None:
        if self.json:
            obj: dict[str, Any] = {"file": f.audio.path}
            obj.update(msgspec.to_builtins(msg))
            self.out.write(self._json.encode(obj).decode() + "\n")
            self.out.flush()
        elif isinstance(msg, Partial):
            if self.tty:
                self.live_text = self.prefix(f) + msg.text
                self._draw_live()
            elif self.partials:
                self.out.write(f"{f.label} (partial): {msg.text}\n")
        elif isinstance(msg, Final):
            if self.tty:
                self._clear_live()
                self.live_text = ""
                if msg.text:
                    self.out.write(self.prefix(f) + msg.text + "\n")
                self._draw_live()
            elif msg.text:
                self.out.write(f"{f.label}: {msg.text}\n")
            self.out.flush()
        if isinstance(msg, Error):
            self.error(f"{f.label}: error {msg.code}: {msg.message}")

    def error(self, text: str) -> None:
        if self.tty:
            self._clear_live()
            self.out.flush()
        self.err.write(text + "\n")
        self.err.flush()

    def close(self) -> None:
        if self.tty:
            self._clear_live()
            self.out.flush()
        if self.err_shown:
            self.err.write(CLEAR)
            self.err.flush()


# --- transcribe -------------------------------------------------------------------------------


def _sender(
    client: Client,
    files: list[FileStream],
    chunk_ms: int,
    realtime: bool,
    stop: threading.Event,
    failure: list[BaseException],
) -> None:
    """Send every file's audio, chunk k of each file at t0 + k * chunk_ms when ``realtime``."""
    try:
        steps = [max(2, f.audio.sample_rate * chunk_ms // 1000 * 2) for f in files]
        for f in files:
            if not f.audio.pcm:
                client.finish(f.stream)  # nothing to send: the stream just closes
        t0 = time.monotonic()
        k = 0
        while not stop.is_set():
            active = False
            if realtime:
                delay = t0 + k * chunk_ms / 1000 - time.monotonic()
                if delay > 0 and stop.wait(delay):
                    return
            for f, step in zip(files, steps, strict=True):
                if f.done or f.failed or f.sent >= len(f.audio.pcm):
                    continue
                chunk = f.audio.pcm[k * step : (k + 1) * step]
                client.send_audio(f.stream, chunk)
                f.sent += len(chunk)
                if f.sent >= len(f.audio.pcm):
                    client.finish(f.stream)
                else:
                    active = True
            if not active:
                return
            k += 1
    except BaseException as exc:
        failure.append(exc)


def _vad(no_vad: bool) -> VadOverrides | None:
    return VadOverrides(enabled=False) if no_vad else None


def cmd_transcribe(args: argparse.Namespace) -> int:
    out, err = sys.stdout, sys.stderr
    audios: list[WavAudio] = []
    try:
        for name in args.files:
            audios.append(load_wav(name))
    except WavError as exc:
        print(f"asrctl: {exc}", file=err)
        return EXIT_USAGE
    try:
        client = Client.connect(_socket(args), client_name="asrctl", timeout=args.connect_timeout)
    except AsrdError as exc:
        print(f"asrctl: {exc}", file=err)
        return EXIT_USAGE
    with client:
        rates = client.limits.sample_rates or list(SAMPLE_RATES)
        for i, a in enumerate(audios):
            if a.sample_rate not in rates:
                # The daemon's list is narrower than the protocol's: resample to 16 kHz too.
                audios[i] = load_wav(a.path, rates)
            for note in audios[i].notes:
                print(f"asrctl: {a.path}: {note}", file=err)
        labels = [a.path for a in audios]
        files = [FileStream(a, f"f{i}", labels[i]) for i, a in enumerate(audios)]
        render = Renderer(files, json=args.json, partials=args.partials, out=out, err=err)
        interim = not args.no_interim and (args.json or render.tty or args.partials)
        try:
            return _run_streams(client, files, render, args, interim)
        except KeyboardInterrupt:
            for f in files:
                if not (f.done or f.failed):
                    try:
                        client.cancel(f.stream)
                    except ClientError:
                        break
            print("asrctl: interrupted", file=err)
            return EXIT_INTERRUPTED
        finally:
            render.close()


def _run_streams(
    client: Client,
    files: list[FileStream],
    render: Renderer,
    args: argparse.Namespace,
    interim: bool,
) -> int:
    by_stream = {f.stream: f for f in files}
    for fs in files:
        client.start(fs.stream, fs.audio.sample_rate, interim=interim, vad=_vad(args.no_vad))
    stop = threading.Event()
    failure: list[BaseException] = []
    sender = threading.Thread(
        target=_sender,
        args=(client, files, args.chunk_ms, args.realtime, stop, failure),
        name="asrctl-send",
        daemon=True,
    )
    sender.start()
    status = EXIT_OK
    last_activity = time.monotonic()
    try:
        while not all(f.done or f.failed for f in files):
            if failure:
                exc = failure[0]
                render.error(f"asrctl: sending failed: {exc}")
                return EXIT_STREAM_FAILED
            try:
                msg = client.recv(0.2)
            except ConnectionClosed:
                render.error("asrctl: asrd closed the connection before all streams finished")
                return EXIT_STREAM_FAILED
            now = time.monotonic()
            if msg is None:
                render.progress()
                if not sender.is_alive() and now - last_activity > args.timeout:
                    render.error(f"asrctl: no answer from asrd for {args.timeout:g} s")
                    return EXIT_STREAM_FAILED
                continue
            last_activity = now
            stream = getattr(msg, "stream", None)
            f = by_stream.get(stream) if isinstance(stream, str) else None
            if f is None:
                if isinstance(msg, Error):
                    # A connection-level error: every unfinished stream is lost with it.
                    render.error(f"asrctl: error {msg.code}: {msg.message}")
                    return EXIT_STREAM_FAILED
                continue
            if f.done or f.failed:
                continue  # e.g. a Closed after the Error that already ended the stream
            render.event(f, msg)
            if isinstance(msg, Started):
                f.started = True
            elif isinstance(msg, Final):
                f.finals += 1
            elif isinstance(msg, Closed):
                f.done = True
            elif isinstance(msg, Error):
                status = EXIT_STREAM_FAILED
                # A refused start or a stream-ending code is the stream's last message; other
                # errors (audio refused during shutdown) are followed by its Closed.
                if not f.started or msg.code in STREAM_ENDING_CODES:
                    f.failed = True
            render.progress()
    finally:
        stop.set()
        sender.join(5.0)
    return status


# --- status -----------------------------------------------------------------------------------


def _cpus(cpus: list[int]) -> str:
    """``[0, 1, 2, 3, 8]`` -> ``"0-3,8"``."""
    if not cpus:
        return "-"
    ordered = sorted(cpus)
    parts: list[str] = []
    run = [ordered[0], ordered[0]]
    for c in ordered[1:]:
        if c == run[1] + 1:
            run[1] = c
        else:
            parts.append(str(run[0]) if run[0] == run[1] else f"{run[0]}-{run[1]}")
            run = [c, c]
    parts.append(str(run[0]) if run[0] == run[1] else f"{run[0]}-{run[1]}")
    return ",".join(parts)


def _bytes(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(n)


def _duration(s: float) -> str:
    s = int(s)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return (f"{d}d " if d else "") + f"{h:02d}:{m:02d}:{s:02d}"


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def format_status(st: Status) -> str:
    lines = [
        f"asrd {st.version}  instance {st.instance}  pid {st.pid}  {st.state}  "
        f"up {_duration(st.uptime_s)}",
        f"backend {st.backend}  socket {st.socket}"
        + (f"  metrics {st.metrics}" if st.metrics else ""),
        "",
    ]
    if st.endpoints:
        rows = [["ENDPOINT", "STATE", "BREAKER PER LANE"]]
        rows += [[e.url, e.state, " ".join(e.lanes)] for e in st.endpoints]
        lines += [*_table(rows), ""]
    rows = [["LANE", "ROLE", "PID", "STATE", "RESTARTS", "HEARTBEAT", "CPUS", "RSS"]]
    for lane in st.lanes:
        for w in lane.workers:
            age = "-" if w.heartbeat_age_s is None else f"{w.heartbeat_age_s:.1f}s ago"
            rows.append(
                [
                    str(w.lane),
                    w.role,
                    str(w.pid),
                    w.state,
                    str(w.restarts),
                    age,
                    _cpus(w.cpus),
                    _bytes(w.rss_bytes),
                ]
            )
    lines += _table(rows) if len(rows) > 1 else ["(no workers)"]
    lines += [f"lane {lane.lane} FAILED: {lane.failed}" for lane in st.lanes if lane.failed]
    rings = [
        (lane.lane, name, ring)
        for lane in st.lanes
        for name, ring in (("audio", lane.audio_ring), ("result", lane.result_ring))
        if ring
    ]
    if rings:
        lines += ["", "rings:"]
        for lane_no, name, ring in rings:
            kv = "  ".join(f"{k}={v}" for k, v in sorted(ring.items()))
            lines.append(f"  lane {lane_no} {name}: {kv}")
    counters = [(f"lane {w.lane} {w.role}", w.counters) for lane in st.lanes for w in lane.workers]
    if any(c for _, c in counters):
        lines += ["", "worker counters:"]
        for who, c in counters:
            if c:
                lines.append(f"  {who}: " + "  ".join(f"{k}={v}" for k, v in sorted(c.items())))
    if st.totals:
        lines += ["", "totals:"]
        rows = [[k, str(v)] for k, v in sorted(st.totals.items())]
        lines += ["  " + line for line in _table(rows)]
    return "\n".join(lines)


def _control_status(args: argparse.Namespace) -> Status | None:
    path = args.control_socket
    if path is None and args.config:
        path = str(load_config(args.config).control_socket_path())
    try:
        return ControlClient.status(path, timeout=args.connect_timeout)
    except AsrdError as exc:
        print(f"asrctl: {exc}", file=sys.stderr)
        return None


def cmd_status(args: argparse.Namespace) -> int:
    st = _control_status(args)
    if st is None:
        return EXIT_USAGE
    if args.json:
        sys.stdout.write(msgspec.json.format(msgspec.json.encode(st)).decode() + "\n")
    else:
        print(format_status(st))
    return EXIT_OK


def cmd_metrics(args: argparse.Namespace) -> int:
    st = _control_status(args)
    if st is None:
        return EXIT_USAGE
    sys.stdout.write(render_metrics(st))
    return EXIT_OK


# --- ping -------------------------------------------------------------------------------------


def cmd_ping(args: argparse.Namespace) -> int:
    try:
        with Client.connect(
            _socket(args), client_name="asrctl", timeout=args.connect_timeout
        ) as client:
            w = client.welcome
            assert w is not None
            rtts = [client.ping(i, timeout=args.connect_timeout) for i in range(args.count)]
    except AsrdError as exc:
        print(f"asrctl: {exc}", file=sys.stderr)
        return EXIT_USAGE
    ms = sorted(r * 1000 for r in rtts)
    print(
        f"pong from {w.server} on {client.path} (protocol {w.protocol}, backend "
        f"{w.backend or '-'}): {len(ms)} round trips, min {ms[0]:.3f} ms, "
        f"median {ms[len(ms) // 2]:.3f} ms, max {ms[-1]:.3f} ms"
    )
    return EXIT_OK


# --- arguments --------------------------------------------------------------------------------


def _socket(args: argparse.Namespace) -> str | None:
    if args.socket:
        return str(args.socket)
    if args.config:
        return str(load_config(args.config).socket_path())
    return None  # $ASRD_SOCKET, else the default configuration's socket


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="asrctl",
        formatter_class=fmt,
        description="Command-line client for the asrd speech-recognition daemon.",
        epilog=(
            "examples:\n"
            "  asrctl transcribe meeting.wav\n"
            "  asrctl transcribe --realtime --json a.wav b.wav > events.jsonl\n"
            "  asrctl status\n"
            "  asrctl ping --count 10\n"
            "\n"
            "The daemon socket is --socket, else the socket of --config, else $ASRD_SOCKET,\n"
            "else the default ($XDG_RUNTIME_DIR/asrd/asrd.sock or /tmp/asrd-UID/asrd.sock);\n"
            "likewise --control-socket, --config, $ASRD_CONTROL_SOCKET for `status` and\n"
            "`metrics`.\n"
            "exit codes: 0 ok, 1 a stream failed, 2 usage or connection error"
        ),
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    conn = argparse.ArgumentParser(add_help=False)
    conn.add_argument("--socket", metavar="PATH", help="daemon socket (default: see asrctl -h)")
    conn.add_argument("--config", metavar="FILE", help="take the socket paths from this config")
    conn.add_argument(
        "--connect-timeout",
        type=float,
        default=10.0,
        metavar="S",
        help="seconds to wait for the daemon's greeting (default 10)",
    )

    t = sub.add_parser(
        "transcribe",
        parents=[conn],
        formatter_class=fmt,
        help="stream WAV files to asrd and print the transcripts",
        description=(
            "Stream WAV files (16-bit PCM) to asrd and print what it recognises.\n"
            "Several files are streamed concurrently, one stream each, on one connection.\n"
            "Stereo is downmixed to mono; rates other than 8/16/32/48 kHz are resampled to\n"
            "16 kHz before sending (both noted on stderr).\n"
            "\n"
            "On a terminal, partial results update in place and finals get their own lines;\n"
            "otherwise each final is printed as 'FILE: text'."
        ),
        epilog=(
            "examples:\n"
            "  asrctl transcribe call.wav\n"
            "  asrctl transcribe --realtime --chunk-ms 20 call.wav   # like a live source\n"
            "  asrctl transcribe --no-vad dictation.wav              # one utterance\n"
            "  asrctl transcribe --json *.wav | jq -r 'select(.type==\"final\") | .text'"
        ),
    )
    t.add_argument("files", nargs="+", metavar="FILE", help="16-bit PCM WAV file(s)")
    t.add_argument(
        "--realtime", action="store_true", help="send audio at its real pace (default: at once)"
    )
    t.add_argument(
        "--json",
        action="store_true",
        help='print every event as one JSON object per line, with a "file" key',
    )
    t.add_argument(
        "--chunk-ms",
        type=_positive_int,
        default=100,
        metavar="MS",
        help="audio per Audio message in milliseconds (default 100)",
    )
    t.add_argument(
        "--no-interim", action="store_true", help="ask for final results only (no partials)"
    )
    t.add_argument(
        "--no-vad",
        action="store_true",
        help="switch voice activity detection off: the whole file is one utterance "
        "(cut only at the daemon's max_utterance_s)",
    )
    t.add_argument(
        "--partials",
        action="store_true",
        help="when not on a terminal, also print partials as 'FILE (partial): text'",
    )
    t.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        metavar="S",
        help="give up when asrd sends nothing for S seconds after all audio is sent (default 120)",
    )
    t.set_defaults(func=cmd_transcribe)

    control = argparse.ArgumentParser(add_help=False)
    control.add_argument(
        "--control-socket",
        metavar="PATH",
        help="control socket (default: $ASRD_CONTROL_SOCKET, else from --config or defaults)",
    )
    control.add_argument(
        "--config", metavar="FILE", help="take the control socket path from this config"
    )
    control.add_argument(
        "--connect-timeout", type=float, default=5.0, metavar="S", help="seconds (default 5)"
    )

    s = sub.add_parser(
        "status",
        parents=[control],
        formatter_class=fmt,
        help="show lanes, workers, streams and counters",
        description="Ask the daemon's control socket for its status and print it as tables.",
        epilog="examples:\n  asrctl status\n  asrctl status --json | jq .totals",
    )
    s.add_argument("--json", action="store_true", help="print the raw status as JSON")
    s.set_defaults(func=cmd_status)

    m = sub.add_parser(
        "metrics",
        parents=[control],
        formatter_class=fmt,
        help="print the status as Prometheus metrics",
        description=(
            "Ask the daemon's control socket for its status and print it in Prometheus's text\n"
            "format: the page its metrics.listen endpoint serves, for node_exporter's textfile\n"
            "collector where no port may be opened."
        ),
        epilog=(
            "examples:\n"
            "  asrctl metrics | grep asrd_ingress_streams\n"
            "  asrctl metrics > /var/lib/node_exporter/asrd.prom.$$ &&\n"
            "    mv /var/lib/node_exporter/asrd.prom.$$ /var/lib/node_exporter/asrd.prom"
        ),
    )
    m.set_defaults(func=cmd_metrics)

    p = sub.add_parser(
        "ping",
        parents=[conn],
        formatter_class=fmt,
        help="check that asrd answers, and how fast",
        description="Connect, exchange Ping/Pong and print the round-trip times.",
        epilog="example:\n  asrctl ping --count 100",
    )
    p.add_argument(
        "--count", type=_positive_int, default=1, metavar="N", help="round trips (default 1)"
    )
    p.set_defaults(func=cmd_ping)
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error already printed by argparse
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        rc: int = args.func(args)
    except AsrdError as exc:  # e.g. an invalid --config
        print(f"asrctl: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    return rc


if __name__ == "__main__":
    sys.exit(main())
