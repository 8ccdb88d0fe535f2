"""Transport benchmark of asrd's Triton backend: shared memory against none, gRPC against HTTP.

Everything runs against a real Triton server (``scripts/triton_server.py``, CPU, Python backend)
serving ``asr_light``: the contract of the recognizer model with no recognition work (each chunk
is answered with its length and energy), so what is measured is the transport. The server is
started here on free loopback ports, or a running one is used (``--grpc-url``/``--http-url``).
A *transport* is a protocol (``grpc``, ``http``) and a ``shared_memory`` mode (``system``: the
audio and both outputs go through a registered POSIX shared-memory region; ``none``: in the
request and response bodies). Four parts, in one run, so their figures are comparable:

1. **Floor**: direct tritonclient calls from this process, with the daemon's pattern and none
   of the daemon. N streams play 16 kHz WAVs in real time (100 ms = 1600-sample chunks, starts
   spread over one chunk period, as ``bench.load`` does), each stream one Triton sequence (START
   on its first chunk, END, with an empty chunk, at the end). One client serves all the streams,
   as one daemon lane does: the chunks that are due go out together, with gRPC as concurrent
   ``async_infer`` requests (at most ``--floor-batch`` in flight) and with HTTP one after the
   other (the daemon's backend does the same: tritonclient's gevent ``async_infer`` is slow).
   Measured per chunk: *latency*, from the moment the chunk was due to its answer read (what
   the daemon's chunk round trip compares with), and *call*, from its request being issued to
   its answer (the inference stage alone); answered chunks per second; this process's and the
   server's CPU time per chunk. Then, *capacity*: the same client with no pacing (every stream
   always has a chunk due) for ``--capacity`` seconds: the most chunks per second it carries.
2. **Daemon**: ``asrd run`` (``lanes = 1``, ``interim_ms = 0`` so every processed chunk is
   answered by a Partial naming it, ``backend.kind = "triton"`` with the transport's protocol
   and ``shared_memory``) loaded by ``bench.load`` with the same streams (one connection per
   stream, VAD off so every chunk is forwarded, each stream one utterance). Measured: chunk
   round trip (Audio sent to its Partial received), answered chunks per second, errors, the
   daemon's and the server's CPU per chunk, and the infer worker's own time in the backend
   (its ``decode_us`` counter) per chunk. A daemon that cannot start, or whose endpoint is not
   up within ``--ready-timeout``, gives a failed row with the reason and its log's last lines.
3. **Tensor-size sweep**: one stream, one request at a time, ``--sweep-requests`` requests of
   each size in ``--sizes`` (1600, 16000, 160000 samples: 0.1, 1 and 10 s of audio) per
   transport, timed from writing (region) or packing (request) the input to both outputs read:
   where shared memory starts to pay. The transports take turns in rounds, so a change in the
   load of a shared machine does not land on one of them only.
4. **Ratios**: shared memory over none (p50 and p99; below 1 means shared memory is faster)
   per size, per floor row and per daemon row, and the daemon over its floor.

Tables go to stdout and everything, with the machine's facts, to
``bench/results/triton-<timestamp>.json``. The exit status is 1 when any row failed or had
errors. ``--smoke`` runs everything tiny (1 and 2 streams, 1 s, size 1600) for tests.

    python -m bench.triton                       # about 6 minutes with the defaults
    python -m bench.triton --streams 1,16 --duration 5 --transports grpc/system,grpc/none
    python -m bench.triton --grpc-url 127.0.0.1:8001 --http-url 127.0.0.1:8000 --no-daemon
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.metadata
import itertools
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import psutil
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm

from bench import load
from daemon.asrctl import load_wav
from daemon.errors import ClientError
from daemon.launcher import DaemonProcess
from ipc.client import ControlClient

REPO = Path(__file__).resolve().parents[1]
SERVER_SCRIPT = REPO / "scripts" / "triton_server.py"
RATE = 16000
CHUNK_MS = 100
CHUNK_SAMPLES = RATE * CHUNK_MS // 1000
ALL_TRANSPORTS = ("grpc/system", "grpc/none", "http/system", "http/none")
# TEXT's place in a region: a 4-byte length and asr_light's "n=<samples> rms=<energy>" (about
# 25 bytes); IS_FINAL is one byte after it. Slots are 64-byte aligned so no two share a line.
TEXT_BYTES = 1024
SLOT_ALIGN = 64
_corrids = itertools.count(random.SystemRandom().getrandbits(62) + 1)
_regions = itertools.count()


# --- transports -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Transport:
    protocol: str  # "grpc" | "http"
    shared_memory: str  # "system" | "none"

    @property
    def name(self) -> str:
        return f"{self.protocol}/{self.shared_memory}"

    @property
    def shm(self) -> bool:
        return self.shared_memory == "system"


def parse_transports(text: str) -> list[Transport]:
    out = []
    for part in (p.strip() for p in text.split(",")):
        if part not in ALL_TRANSPORTS:
            raise argparse.ArgumentTypeError(
                f"unknown transport {part!r}: choose from {', '.join(ALL_TRANSPORTS)}"
            )
        proto, mode = part.split("/")
        if Transport(proto, mode) not in out:
            out.append(Transport(proto, mode))
    return out


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a comma-separated list of integers: {text}"
        ) from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"need positive integers: {text}")
    return values


# --- the Triton server ------------------------------------------------------------------------


def free_ports(count: int) -> list[int]:
    socks = []
    try:
        for _ in range(count):  # all bound at once, so the ports differ
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
        return [s.getsockname()[1] for s in socks]
    finally:
        for sock in socks:
            sock.close()


@dataclass
class ServerInfo:
    grpc_url: str | None
    http_url: str | None
    pid: int | None  # for the server's CPU time; None when not known
    started_here: bool
    log: str | None = None


def _script(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SERVER_SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
    )


@contextlib.contextmanager
def own_server(model: str, workdir: Path, shm_prefix: str) -> Iterator[ServerInfo]:
    """``setup`` (a stamp check once built) and ``start`` a server on free ports; always stop it.

    ``start`` returns once the server and the model are ready (the script's own bounded wait),
    and the server runs in its own session, so Ctrl-C here reaches only this process, whose
    ``finally`` stops it.
    """
    done = _script("setup", timeout=900)
    if done.returncode != 0:
        raise SystemExit(f"bench.triton: server setup failed:\n{done.stdout}\n{done.stderr}")
    grpc_port, http_port, metrics_port = free_ports(3)
    pidfile, log = workdir / "tritonserver.pid", workdir / "tritonserver.log"
    try:
        done = _script(
            "start",
            f"--grpc-port={grpc_port}",
            f"--http-port={http_port}",
            f"--metrics-port={metrics_port}",
            f"--pidfile={pidfile}",
            f"--log={log}",
            f"--shm-prefix={shm_prefix}server_",
            f"--models={model}",
            timeout=300,
        )
        if done.returncode != 0:
            raise SystemExit(f"bench.triton: server start failed:\n{done.stdout}\n{done.stderr}")
        yield ServerInfo(
            f"127.0.0.1:{grpc_port}",
            f"127.0.0.1:{http_port}",
            int(pidfile.read_text()),
            True,
            str(log),
        )
    finally:
        if pidfile.exists():
            done = _script("stop", f"--pidfile={pidfile}", timeout=90)
            if done.returncode != 0:
                print(f"bench.triton: server stop failed:\n{done.stdout}\n{done.stderr}")


class TreeCpu:
    """CPU seconds of a process and all its descendants (tritonserver and its backend stubs)."""

    def __init__(self, pid: int | None) -> None:
        self.pid = pid

    def read(self) -> float | None:
        if self.pid is None:
            return None
        try:
            root = psutil.Process(self.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return None
        total = 0.0
        for p in procs:
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                total += t.user + t.system
        return total


def _per_chunk_us(cpu_s: float | None, chunks: int) -> float | None:
    return round(cpu_s * 1e6 / chunks, 1) if cpu_s is not None and chunks else None


# --- direct calls (the floor and the size sweep) ----------------------------------------------


@dataclass
class Job:
    corrid: int
    samples: np.ndarray  # int16, may be empty (an END with no audio)
    start: bool
    end: bool


@dataclass
class Answer:
    text: str = ""
    final: bool = False
    begun_at: float = 0.0  # monotonic: building the request began (input written or packed)
    sent_at: float = 0.0  # the request was issued
    replied_at: float = 0.0  # the reply arrived (gRPC callback, or infer() returned)
    done_at: float = 0.0  # its outputs were read
    error: str | None = None


def _error_text(exc: BaseException) -> str:
    message = exc.message() if hasattr(exc, "message") else str(exc)  # InferenceServerException
    return f"{type(exc).__name__}: {message or exc}"[:160]


class DirectClient:
    """One tritonclient client, as one daemon lane has, and optionally one region in slots.

    Slot ``i`` of the region holds request ``i``'s input, then TEXT's and IS_FINAL's places;
    a request sent alone uses slot 0. An empty input (an END with no audio) goes in the
    request: a region cannot hold 0 bytes.
    """

    def __init__(
        self,
        transport: Transport,
        url: str,
        model: str,
        *,
        slots: int,
        input_bytes: int,
        timeout_s: float,
        region_prefix: str,
    ) -> None:
        self.transport = transport
        self.model = model
        self.timeout_s = timeout_s
        self.grpc = transport.protocol == "grpc"
        self.mod: Any = grpcclient if self.grpc else httpclient
        if self.grpc:
            self.client: Any = grpcclient.InferenceServerClient(url)
        else:
            self.client = httpclient.InferenceServerClient(
                url, connection_timeout=timeout_s, network_timeout=timeout_s
            )
        self.handle: Any = None
        self.region: str | None = None
        self.input_bytes = input_bytes
        self.slot_bytes = -(-(input_bytes + TEXT_BYTES + 1) // SLOT_ALIGN) * SLOT_ALIGN
        self.slots = slots
        try:
            self._batched = self._max_batch_size() > 0
            if transport.shm:
                name = f"{region_prefix}{os.getpid()}_{next(_regions)}"
                size = self.slot_bytes * slots
                self.handle = shm.create_shared_memory_region(name, "/" + name, size)
                self.region = name
                self.client.register_system_shared_memory(name, "/" + name, size, **self._kw())
        except BaseException:
            self.close()
            raise

    def _kw(self) -> dict[str, Any]:
        # gRPC takes a per-call deadline; HTTP's are the client's connection/network timeouts.
        return {"client_timeout": self.timeout_s} if self.grpc else {}

    def _max_batch_size(self) -> int:
        config = self.client.get_model_config(self.model, **self._kw())
        if self.grpc:
            return int(config.config.max_batch_size)
        return int(config.get("max_batch_size", 0))

    def _request(self, job: Job, slot: int) -> dict[str, Any]:
        mod = self.mod
        shape = [1, job.samples.size] if self._batched else [job.samples.size]
        audio = mod.InferInput("AUDIO", shape, "INT16")
        outputs = None
        if self.region is not None:
            base = slot * self.slot_bytes
            if 0 < job.samples.nbytes <= self.input_bytes:
                shm.set_shared_memory_region(self.handle, [job.samples], offset=base)
                audio.set_shared_memory(self.region, job.samples.nbytes, offset=base)
            else:
                audio.set_data_from_numpy(job.samples.reshape(shape))
            text = mod.InferRequestedOutput("TEXT")
            text.set_shared_memory(self.region, TEXT_BYTES, offset=base + self.input_bytes)
            final = mod.InferRequestedOutput("IS_FINAL")
            final.set_shared_memory(self.region, 1, offset=base + self.input_bytes + TEXT_BYTES)
            outputs = [text, final]
        else:
            audio.set_data_from_numpy(job.samples.reshape(shape))
        return {
            "model_name": self.model,
            "inputs": [audio],
            "outputs": outputs,
            "sequence_id": job.corrid,
            "sequence_start": job.start,
            "sequence_end": job.end,
            **self._kw(),
        }

    def _read(self, result: Any, slot: int, answer: Answer) -> None:
        if self.region is None:
            text, final = result.as_numpy("TEXT"), result.as_numpy("IS_FINAL")
        else:
            base = slot * self.slot_bytes + self.input_bytes
            tmeta, fmeta = result.get_output("TEXT"), result.get_output("IS_FINAL")
            if tmeta is None or fmeta is None:
                raise ValueError("answer without TEXT or IS_FINAL")
            tshape = tmeta["shape"] if isinstance(tmeta, dict) else list(tmeta.shape)
            fshape = fmeta["shape"] if isinstance(fmeta, dict) else list(fmeta.shape)
            text = shm.get_contents_as_numpy(self.handle, np.object_, tshape, offset=base)
            final = shm.get_contents_as_numpy(
                self.handle, np.bool_, fshape, offset=base + TEXT_BYTES
            )
        if text is None or final is None or text.size != 1 or final.size != 1:
            raise ValueError("malformed TEXT/IS_FINAL")
        value = text.reshape(-1)[0]
        answer.text = value.decode() if isinstance(value, bytes) else str(value)
        answer.final = bool(final.reshape(-1)[0])  # a copy: the region's memory is reused

    def infer_many(self, jobs: Sequence[Job]) -> list[Answer]:
        """One request per job, all in flight together (gRPC) or in turn (HTTP, or one job)."""
        answers = [Answer() for _ in jobs]
        requests: list[dict[str, Any] | None] = []
        for job, answer in zip(jobs, answers, strict=True):
            answer.begun_at = time.monotonic()
            try:
                requests.append(self._request(job, len(requests)))
            except Exception as exc:
                answer.error = _error_text(exc)
                requests.append(None)
        results: list[Any] = [None] * len(jobs)
        if self.grpc and len(jobs) > 1:
            done = threading.Semaphore(0)

            def callback(i: int, result: Any, error: Any) -> None:  # on a gRPC thread
                answers[i].replied_at = time.monotonic()
                results[i] = error if error is not None else result
                done.release()

            sent = 0
            for i, request in enumerate(requests):
                if request is None:
                    continue
                answers[i].sent_at = time.monotonic()
                try:
                    self.client.async_infer(
                        callback=lambda result, error, i=i: callback(i, result, error), **request
                    )
                    sent += 1
                except Exception as exc:
                    results[i] = exc
            deadline = time.monotonic() + self.timeout_s + 5.0  # the requests' deadline + margin
            for _ in range(sent):
                if not done.acquire(timeout=max(0.0, deadline - time.monotonic())):
                    break
        else:
            for i, request in enumerate(requests):
                if request is None:
                    continue
                answers[i].sent_at = time.monotonic()
                try:
                    results[i] = self.client.infer(**request)
                except Exception as exc:
                    results[i] = exc
                answers[i].replied_at = time.monotonic()
        for i, (result, answer) in enumerate(zip(results, answers, strict=True)):
            if answer.error is not None:
                continue
            if result is None:
                answer.error = "no answer in time"
            elif isinstance(result, BaseException):
                answer.error = _error_text(result)
            else:
                try:
                    self._read(result, i, answer)
                except Exception as exc:
                    answer.error = _error_text(exc)
            answer.done_at = time.monotonic()
        return answers

    def close(self) -> None:
        if self.region is not None:
            with contextlib.suppress(Exception):
                self.client.unregister_system_shared_memory(self.region, **self._kw())
        if self.handle is not None:
            with contextlib.suppress(Exception):
                shm.destroy_shared_memory_region(self.handle)
            self.handle = None
        self.region = None
        with contextlib.suppress(Exception):
            self.client.close()


def _expected_text(samples: int) -> str:
    return f"n={samples} "  # asr_light: "n=<samples> rms=<energy>"


@dataclass
class FloorStream:
    chunks: list[np.ndarray]
    due: float
    position: int = 0
    corrid: int = 0
    started: bool = False


@dataclass
class FloorRaw:
    latency: list[float] = field(default_factory=list)
    call: list[float] = field(default_factory=list)
    wait: list[float] = field(default_factory=list)
    final_call: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    chunks: int = 0
    finals: int = 0


def _account(
    raw: FloorRaw, picked: list[FloorStream], jobs: list[Job], answers: list[Answer]
) -> None:
    for st, job, ans in zip(picked, jobs, answers, strict=True):
        if ans.error is not None:
            raw.errors[ans.error] += 1
            st.started = False  # the sequence may be gone: the next chunk starts a new one
            continue
        if ans.final or not ans.text.startswith(_expected_text(job.samples.size)):
            raw.errors["wrong answer"] += 1
            continue
        raw.chunks += 1
        raw.latency.append(ans.done_at - st.due)
        raw.call.append(ans.replied_at - ans.sent_at)
        raw.wait.append(ans.sent_at - st.due)


def _chunk_job(st: FloorStream) -> Job:
    if not st.started:
        st.corrid = next(_corrids)
    job = Job(st.corrid, st.chunks[st.position % len(st.chunks)], not st.started, False)
    st.started = True
    return job


def _end_all(client: DirectClient, streams: list[FloorStream], batch: int, raw: FloorRaw) -> None:
    """END every open sequence (an open one is an in-flight inference to the server)."""
    open_ = [s for s in streams if s.started]
    empty = np.zeros(0, dtype=np.int16)
    for k in range(0, len(open_), batch):
        group = open_[k : k + batch]
        jobs = [Job(s.corrid, empty, False, True) for s in group]
        for st, ans in zip(group, client.infer_many(jobs), strict=True):
            st.started = False
            if ans.error is not None:
                raw.errors[ans.error] += 1
            elif not ans.final:
                raw.errors["END answered without IS_FINAL"] += 1
            else:
                raw.finals += 1
                raw.final_call.append(ans.replied_at - ans.sent_at)


def run_floor(
    transport: Transport,
    url: str,
    model: str,
    audio: list[list[np.ndarray]],
    streams: int,
    duration_s: float,
    *,
    paced: bool,
    batch: int,
    timeout_s: float,
    region_prefix: str,
    server_cpu: TreeCpu,
) -> dict[str, Any]:
    """N streams through one direct client; paced = real time, else as fast as it answers."""
    batch = batch if transport.protocol == "grpc" else 1
    plans = load.plan_streams(streams, streams, len(audio), CHUNK_MS, None)
    chunk_s = CHUNK_MS / 1000
    raw = FloorRaw()
    client = DirectClient(
        transport,
        url,
        model,
        slots=min(batch, streams),
        input_bytes=max(c.nbytes for a in audio for c in a),
        timeout_s=timeout_s,
        region_prefix=region_prefix,
    )
    fs: list[FloorStream] = []
    try:
        cpu0, scpu0 = time.process_time(), server_cpu.read()
        t0 = time.monotonic() + 0.05
        end_at = t0 + duration_s
        fs = [FloorStream(audio[p.wav], t0 + (p.offset_s if paced else 0.0)) for p in plans]
        turn = 0
        while True:
            now = time.monotonic()
            if now >= end_at:
                break
            if paced:
                due = sorted((s for s in fs if s.due <= now), key=lambda s: s.due)
                if not due:
                    # Pacing: nothing is due before the earliest stream's next chunk.
                    time.sleep(max(0.0, min(min(s.due for s in fs), end_at) - now))
                    continue
                picked = due[:batch]
            else:
                # Closed loop: every stream always has a chunk due; take turns in batch-size
                # groups so each stream gets its share.
                picked = [fs[(turn + k) % len(fs)] for k in range(min(batch, len(fs)))]
                turn += len(picked)
                for s in picked:
                    s.due = now
            jobs = [_chunk_job(s) for s in picked]
            _account(raw, picked, jobs, client.infer_many(jobs))
            for s in picked:
                s.due += chunk_s
                s.position += 1
        wall = time.monotonic() - t0
        _end_all(client, fs, batch, raw)
        cpu, scpu1 = time.process_time() - cpu0, server_cpu.read()
    finally:
        # An interrupted run still ends its sequences and releases its region.
        with contextlib.suppress(Exception):
            _end_all(client, fs, batch, FloorRaw())
        client.close()
    server_s = scpu1 - scpu0 if scpu0 is not None and scpu1 is not None else None
    return {
        "transport": transport.name,
        "protocol": transport.protocol,
        "shared_memory": transport.shared_memory,
        "streams": streams,
        "paced": paced,
        "in_flight_max": min(batch, streams),
        "duration_s": duration_s,
        "wall_s": round(wall, 3),
        "chunks": raw.chunks,
        "finals": raw.finals,
        "chunks_per_s": round(raw.chunks / wall, 1) if wall > 0 else None,
        "latency_ms": load.summarize(raw.latency, 1000),
        "call_ms": load.summarize(raw.call, 1000),
        "wait_ms": load.summarize(raw.wait, 1000),
        "final_call_ms": load.summarize(raw.final_call, 1000),
        "client_cpu_us_per_chunk": _per_chunk_us(cpu, raw.chunks),
        "server_cpu_us_per_chunk": _per_chunk_us(server_s, raw.chunks),
        "errors": dict(raw.errors),
    }


SWEEP_ROUNDS = 5


@dataclass
class _SweepState:
    transport: Transport
    client: DirectClient
    corrid: int = 0
    started: bool = False
    times: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)

    def request(self, chunk: np.ndarray, timed: bool) -> None:
        if not self.started:
            self.corrid = next(_corrids)
        (ans,) = self.client.infer_many([Job(self.corrid, chunk, not self.started, False)])
        self.started = True
        if ans.error is not None:
            self.errors[ans.error] += 1
            self.started = False  # the next request starts a new sequence
        elif not ans.text.startswith(_expected_text(chunk.size)):
            self.errors["wrong answer"] += 1
        elif timed:
            # Input written (region) or packed (request), sent, answered, outputs read: all
            # that a caller waits for.
            self.times.append(ans.done_at - ans.begun_at)


def run_sweep(
    transports: list[Transport],
    url_of: Callable[[Transport], str],
    model: str,
    samples: int,
    requests: int,
    warmup: int,
    timeout_s: float,
    region_prefix: str,
) -> list[dict[str, Any]]:
    """``requests`` requests of ``samples`` each per transport, one at a time, one sequence each.

    The transports take turns in ``SWEEP_ROUNDS`` rounds, so that a change in the machine's
    load during the sweep (a shared machine) touches all of them alike instead of one.
    """
    rng = np.random.default_rng(samples)
    chunk = rng.integers(-8000, 8000, size=samples, dtype=np.int16)
    states: list[_SweepState] = []
    try:
        for t in transports:
            client = DirectClient(
                t,
                url_of(t),
                model,
                slots=1,
                input_bytes=chunk.nbytes,
                timeout_s=timeout_s,
                region_prefix=region_prefix,
            )
            states.append(_SweepState(t, client))
        for st in states:
            for _ in range(warmup):
                st.request(chunk, timed=False)
        rounds = max(1, min(SWEEP_ROUNDS, requests))
        for r in range(rounds):
            count = requests // rounds + (1 if r < requests % rounds else 0)
            for st in states:
                for _ in range(count):
                    st.request(chunk, timed=True)
    finally:
        for st in states:
            if st.started:
                with contextlib.suppress(Exception):
                    st.client.infer_many([Job(st.corrid, chunk[:0], False, True)])
            st.client.close()
    rows = []
    for st in states:
        s = load.summarize(st.times, 1000)
        mean_s = (s["mean"] or 0.0) / 1000
        rows.append(
            {
                "transport": st.transport.name,
                "protocol": st.transport.protocol,
                "shared_memory": st.transport.shared_memory,
                "samples": samples,
                "bytes": chunk.nbytes,
                "requests": len(st.times),
                "call_ms": s,
                "mb_per_s": round(chunk.nbytes / mean_s / 1e6, 1) if mean_s > 0 else None,
                "errors": dict(st.errors),
            }
        )
    return rows


def run_connect_sweep(
    transports: list[Transport],
    url_of: Callable[[Transport], str],
    model: str,
    samples: int,
    requests: int,
    timeout_s: float,
    region_prefix: str,
) -> list[dict[str, Any]]:
    """Sticky against fresh: per transport, ``requests`` whole one-request sequences (start and
    end in one request) on one client kept open, with its region registered once (what each
    daemon lane does), and the same with a new client per request: connect, region created
    and registered, the request, region unregistered and unlinked, client closed. Alternating
    per request, so the machine's drift touches both alike."""
    rng = np.random.default_rng(samples)
    chunk = rng.integers(-8000, 8000, size=samples, dtype=np.int16)
    rows = []
    for t in transports:
        times: dict[str, list[float]] = {"sticky": [], "fresh": []}
        errors: Counter[str] = Counter()
        kw = {
            "slots": 1,
            "input_bytes": chunk.nbytes,
            "timeout_s": timeout_s,
            "region_prefix": region_prefix,
        }
        sticky = DirectClient(t, url_of(t), model, **kw)  # type: ignore[arg-type]
        try:
            for i in range(requests + 2):  # the first of each is a warm-up
                for kind in ("sticky", "fresh"):
                    t0 = time.perf_counter()
                    client = sticky if kind == "sticky" else None
                    try:
                        if client is None:
                            client = DirectClient(t, url_of(t), model, **kw)  # type: ignore[arg-type]
                        (ans,) = client.infer_many([Job(next(_corrids), chunk, True, True)])
                    finally:
                        if kind == "fresh" and client is not None:
                            client.close()
                    elapsed = time.perf_counter() - t0
                    if ans.error is not None:
                        errors[ans.error] += 1
                    elif i >= 2:
                        times[kind].append(elapsed)
        finally:
            sticky.close()
        for kind, values in times.items():
            rows.append(
                {
                    "transport": t.name,
                    "connection": kind,
                    "samples": samples,
                    "requests": len(values),
                    "call_ms": load.summarize(values, 1000),
                    "errors": dict(errors),
                }
            )
    return rows


# --- through the daemon -----------------------------------------------------------------------


def daemon_config(transport: Transport, endpoint: str, model: str, timeout_s: float) -> str:
    return (
        "lanes = 1\n"
        "[backend]\n"
        'kind = "triton"\n'
        "interim_ms = 0\n"  # a Partial after every processed chunk: what the round trip times
        "[backend.triton]\n"
        f'endpoints = ["{endpoint}"]\n'
        f'protocol = "{transport.protocol}"\n'
        f'model = "{model}"\n'
        f'shared_memory = "{transport.shared_memory}"\n'
        f"timeout_s = {timeout_s}\n"
    )


def wait_endpoints_up(control: Path, timeout_s: float) -> str | None:
    """Wait until the daemon says its Triton endpoints are up; the reason if they are not.

    A daemon whose status carries no endpoint states has nothing to wait for.
    """
    deadline = time.monotonic() + timeout_s
    states: list[str] = []
    while True:
        try:
            status = ControlClient.status(control, timeout=2.0)
        except (ClientError, OSError) as exc:
            return f"no status from the daemon: {exc}"
        endpoints = getattr(status, "endpoints", None)
        if not endpoints:
            return None
        states = [f"{e.url} {e.state} ({', '.join(e.lanes)})" for e in endpoints]
        if all(e.state == "up" for e in endpoints):
            return None
        if time.monotonic() >= deadline:
            return f"Triton endpoint not up within {timeout_s:g} s: {'; '.join(states)}"
        time.sleep(0.05)  # polling the control socket, bounded by the deadline


def infer_counters(control: Path, finals: int, timeout_s: float) -> dict[str, int]:
    """The infer workers' counters, summed, once they account for ``finals`` finals.

    The worker publishes its counters after each record it handles; a Final reaches the
    client just before that publication, so wait (bounded) until the count catches up.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        status = ControlClient.status(control, timeout=2.0)
        totals: Counter[str] = Counter()
        for lane in status.lanes:
            for worker in lane.workers:
                if worker.role == "infer":
                    totals.update(worker.counters)
        if totals.get("finals", 0) >= finals or time.monotonic() >= deadline:
            return dict(totals)
        time.sleep(0.02)


def _log_tail(path: Path, lines: int = 12) -> list[str]:
    with contextlib.suppress(OSError):
        return path.read_text(errors="replace").splitlines()[-lines:]
    return []


def run_daemon(
    transport: Transport,
    endpoint: str,
    model: str,
    streams: int,
    args: argparse.Namespace,
    wavs: list[str],
    logdir: Path,
    server_cpu: TreeCpu,
) -> dict[str, Any]:
    row: dict[str, Any] = {
        "transport": transport.name,
        "protocol": transport.protocol,
        "shared_memory": transport.shared_memory,
        "streams": streams,
        "ok": False,
        "error": None,
    }
    log = logdir / f"asrd-{transport.protocol}-{transport.shared_memory}-{streams}.log"
    daemon = DaemonProcess(
        daemon_config(transport, endpoint, model, args.timeout),
        log_path=log,
    )
    try:
        daemon.start(timeout=args.ready_timeout)
        reason = wait_endpoints_up(daemon.control_path, args.ready_timeout)
        if reason is not None:
            row["error"] = reason
            return row
        load_args = load.build_parser().parse_args(
            [
                "--socket", str(daemon.socket_path),
                "--control-socket", str(daemon.control_path),
                "--streams", str(streams),
                "--connections", str(streams),  # independent sources: one connection each
                "--duration", str(args.duration),
                "--chunk-ms", str(CHUNK_MS),
                "--no-vad",  # every chunk reaches the backend
                "--mode", "loop",  # one utterance (one Triton sequence) per stream
                "--daemon-pid", str(daemon.pid),
                "--drain-timeout", str(args.drain_timeout),
                "--no-floor",  # the floor that matters here is the direct Triton call
                *itertools.chain.from_iterable(("--wav", w) for w in wavs),
            ]
        )  # fmt: skip
        scpu0 = server_cpu.read()
        report = load.run_load(load_args)
        scpu1 = server_cpu.read()
        r = report["results"]
        counters = infer_counters(daemon.control_path, r["finals"], 5.0)
        chunks = r["chunks_sent"]
        server_s = scpu1 - scpu0 if scpu0 is not None and scpu1 is not None else None
        errors = dict(r["errors"])
        if counters.get("failures"):
            errors["infer_failures"] = counters["failures"]
        row.update(
            {
                "chunks_sent": chunks,
                "chunks_answered": r["partials_matched"],
                "chunks_per_s": (
                    round(r["partials_matched"] / r["wall_s"], 1) if r["wall_s"] else None
                ),
                "chunk_rtt_ms": r["chunk_rtt_ms"],
                "final_after_finish_ms": r["final_after_finish_ms"],
                "generator_lateness_ms": r["generator_lateness_ms"],
                "streams_started": r["streams_started"],
                "streams_unclosed": r["streams_unclosed"],
                "finals": r["finals"],
                "wall_s": r["wall_s"],
                "errors": errors,
                "daemon_cpu_us_per_chunk": r["daemon_cpu_us_per_chunk"],
                "daemon_cpu_us_per_chunk_by_role": r["daemon_cpu_us_per_chunk_by_role"],
                "server_cpu_us_per_chunk": _per_chunk_us(server_s, chunks),
                # The infer worker's time inside the backend per request (the chunks and the
                # END of each stream): its inference stage, amortised over the batches it sends.
                "infer_stage_us_per_request": (
                    round(counters.get("decode_us", 0) / (chunks + r["finals"]), 1)
                    if chunks
                    else None
                ),
                "infer_counters": counters,
            }
        )
        row["ok"] = (
            not errors
            and r["partials_matched"] > 0
            and r["streams_unclosed"] == 0
            and r["connect_failures"] == 0
        )
        if not row["ok"] and row["error"] is None:
            row["error"] = "errors during the run" if errors else "chunks went unanswered"
    except (TimeoutError, RuntimeError, ClientError, OSError) as exc:
        row["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        try:
            if daemon.proc is not None and daemon.proc.poll() is None:
                row["exit_code"] = daemon.stop()
            elif daemon.proc is not None:
                row["exit_code"] = daemon.wait()
        finally:
            # Whatever happened, nothing of this daemon outlives its row.
            daemon.kill_session()
            daemon.cleanup()
        if not row["ok"]:
            row["log_tail"] = _log_tail(log)
    return row


# --- ratios -----------------------------------------------------------------------------------


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def _pair(
    rows: list[dict[str, Any]], key: Callable[[dict[str, Any]], Any], stat: str
) -> list[dict[str, Any]]:
    """system/none ratios of ``stat``'s p50 and p99 for rows that agree on ``key``."""
    out = []
    for row in rows:
        if row.get("shared_memory") != "system":
            continue
        other = next(
            (
                r
                for r in rows
                if r.get("shared_memory") == "none"
                and r["protocol"] == row["protocol"]
                and key(r) == key(row)
            ),
            None,
        )
        if other is None or row.get(stat) is None or other.get(stat) is None:
            continue
        a, b = row[stat], other[stat]
        p50 = _ratio(a["p50"], b["p50"])
        out.append(
            {
                "protocol": row["protocol"],
                "key": key(row),
                "none_p50_ms": b["p50"],
                "system_p50_ms": a["p50"],
                "p50_ratio": p50,
                "p99_ratio": _ratio(a["p99"], b["p99"]),
                "p50_gain_pct": round((1 - p50) * 100, 1) if p50 is not None else None,
            }
        )
    return out


def compute_ratios(report: dict[str, Any]) -> dict[str, Any]:
    floor = [r for r in report["floor"] if r["paced"]]
    daemon = [r for r in report["daemon"] if r.get("chunk_rtt_ms")]
    over = []
    for d in daemon:
        f = next(
            (x for x in floor if x["transport"] == d["transport"] and x["streams"] == d["streams"]),
            None,
        )
        if f is None:
            continue
        dp50, dp99 = d["chunk_rtt_ms"]["p50"], d["chunk_rtt_ms"]["p99"]
        fp50, fp99 = f["latency_ms"]["p50"], f["latency_ms"]["p99"]
        over.append(
            {
                "transport": d["transport"],
                "streams": d["streams"],
                "floor_p50_ms": fp50,
                "daemon_p50_ms": dp50,
                "added_p50_ms": round(dp50 - fp50, 3) if dp50 is not None and fp50 else None,
                "p50_ratio": _ratio(dp50, fp50),
                "added_p99_ms": round(dp99 - fp99, 3) if dp99 is not None and fp99 else None,
                "p99_ratio": _ratio(dp99, fp99),
            }
        )
    return {
        "sweep_shm_over_none": _pair(report["sweep"], lambda r: r["samples"], "call_ms"),
        "floor_call_shm_over_none": _pair(floor, lambda r: r["streams"], "call_ms"),
        "floor_latency_shm_over_none": _pair(floor, lambda r: r["streams"], "latency_ms"),
        "daemon_rtt_shm_over_none": _pair(daemon, lambda r: r["streams"], "chunk_rtt_ms"),
        "daemon_over_floor": over,
    }


# --- report -----------------------------------------------------------------------------------


def _f(v: Any, nd: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def _errs(errors: dict[str, int]) -> str:
    return str(sum(errors.values())) if errors else "0"


def _table(columns: str, rows: list[list[str]]) -> list[str]:
    """Aligned text table: ``columns`` are the headers separated by ``|``; the first column
    is left-aligned, the others right-aligned."""
    header = columns.split("|")
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = "  ".join(
        h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(header, widths, strict=True))
    )
    out = [line, "-" * len(line)]
    for r in rows:
        out.append(
            "  ".join(
                c.rjust(w) if i else c.ljust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )
    return out


def format_report(report: dict[str, Any]) -> str:
    c = report["config"]
    lines = [
        f"asrd Triton transport benchmark: model {c['model']}, {CHUNK_MS} ms chunks "
        f"({CHUNK_SAMPLES} samples), {c['duration_s']:g} s per row, server "
        f"{'started here' if report['server']['started_here'] else 'given'} "
        f"(gRPC {report['server']['grpc_url']}, HTTP {report['server']['http_url']})",
    ]
    if report["floor"]:
        lines += [
            "",
            f"Floor: direct tritonclient calls, one client for all streams (gRPC: the due chunks "
            f"as concurrent async_infer, at most {c['floor_batch']} in flight; HTTP: one at a "
            "time). latency = chunk due -> answer read; call = request issued -> answer. ms.",
        ]
        rows = []
        for r in report["floor"]:
            if not r["paced"]:
                continue
            cap = next(
                (
                    x
                    for x in report["floor"]
                    if not x["paced"]
                    and x["transport"] == r["transport"]
                    and x["streams"] == r["streams"]
                ),
                None,
            )
            rows.append(
                [
                    r["transport"],
                    str(r["streams"]),
                    str(r["chunks"]),
                    _f(r["chunks_per_s"], 1),
                    _f(r["latency_ms"]["p50"]),
                    _f(r["latency_ms"]["p99"]),
                    _f(r["call_ms"]["p50"]),
                    _f(r["call_ms"]["p99"]),
                    _f(r["client_cpu_us_per_chunk"], 0),
                    _f(r["server_cpu_us_per_chunk"], 0),
                    _errs(r["errors"]),
                    _f(cap["chunks_per_s"], 0) if cap else "-",
                    _f(cap["call_ms"]["p50"]) if cap else "-",
                ]
            )
        lines += _table(
            "transport|streams|chunks|chunk/s|lat p50|lat p99|call p50|call p99|client us/ch"
            "|server us/ch|errors|capacity ch/s|cap call p50",
            rows,
        )
    if report["daemon"]:
        lines += [
            "",
            "Through the daemon: asrd lanes = 1, interim_ms = 0, VAD off, bench.load with one "
            "connection per stream; rtt = Audio sent -> its Partial received; infer us/req = the "
            "infer worker's time in the backend per request, amortised over its batches. ms "
            "unless noted.",
        ]
        rows = []
        for r in report["daemon"]:
            if r.get("chunk_rtt_ms") is None:  # no load ran: the reason is printed at the end
                rows.append([r["transport"], str(r["streams"])] + ["-"] * 8 + ["FAILED"])
                continue
            rows.append(
                [
                    r["transport"],
                    str(r["streams"]),
                    f"{r['chunks_answered']}/{r['chunks_sent']}",
                    _f(r["chunks_per_s"], 1),
                    _f(r["chunk_rtt_ms"]["p50"]),
                    _f(r["chunk_rtt_ms"]["p99"]),
                    _f(r["infer_stage_us_per_request"], 0),
                    _f(r["daemon_cpu_us_per_chunk"], 0),
                    _f(r["server_cpu_us_per_chunk"], 0),
                    _errs(r["errors"]),
                    "ok" if r["ok"] else "FAILED",
                ]
            )
        lines += _table(
            "transport|streams|answered|chunk/s|rtt p50|rtt p99|infer us/req|daemon us/ch"
            "|server us/ch|errors|",
            rows,
        )
    if report["sweep"]:
        lines += [
            "",
            f"Tensor-size sweep: direct calls, one stream, one request at a time, "
            f"{c['sweep_requests']} requests per row (build, send, answer, read outputs). ms.",
        ]
        lines += _table(
            "transport|samples|bytes|p50|p90|p99|MB/s|errors",
            [
                [
                    r["transport"],
                    str(r["samples"]),
                    str(r["bytes"]),
                    _f(r["call_ms"]["p50"], 3),
                    _f(r["call_ms"]["p90"], 3),
                    _f(r["call_ms"]["p99"], 3),
                    _f(r["mb_per_s"], 1),
                    _errs(r["errors"]),
                ]
                for r in report["sweep"]
            ],
        )
    if report.get("connect"):
        lines += [
            "",
            "Sticky against fresh connections: one whole sequence per request; sticky = one "
            "client and region kept, fresh = connect, register, request, unregister, close. ms.",
        ]
        lines += _table(
            "transport|connection|samples|requests|p50|p90|p99|errors",
            [
                [
                    r["transport"],
                    r["connection"],
                    str(r["samples"]),
                    str(r["requests"]),
                    _f(r["call_ms"]["p50"], 3),
                    _f(r["call_ms"]["p90"], 3),
                    _f(r["call_ms"]["p99"], 3),
                    _errs(r["errors"]),
                ]
                for r in report["connect"]
            ],
        )
    ratios = report["ratios"]
    pairs = [
        ("size sweep, per request", "samples", ratios["sweep_shm_over_none"]),
        ("floor call (inference stage)", "streams", ratios["floor_call_shm_over_none"]),
        ("floor latency (due -> answer)", "streams", ratios["floor_latency_shm_over_none"]),
        ("daemon chunk round trip", "streams", ratios["daemon_rtt_shm_over_none"]),
    ]
    rows = [
        [
            what,
            p["protocol"],
            f"{label} {p['key']}",
            _f(p["none_p50_ms"], 3),
            _f(p["system_p50_ms"], 3),
            _f(p["p50_ratio"], 3),
            _f(p["p99_ratio"], 3),
            _f(p["p50_gain_pct"], 1),
        ]
        for what, label, found in pairs
        for p in found
    ]
    if rows:
        lines += [
            "",
            "Shared memory (system) against none: ratio system/none, below 1 = shared memory "
            "faster; gain = 1 - p50 ratio.",
        ]
        lines += _table(
            "measure|protocol|at|none p50|shm p50|p50 ratio|p99 ratio|gain %",
            rows,
        )
    if ratios["daemon_over_floor"]:
        lines += ["", "Daemon over its floor (same transport and streams, same run). ms."]
        lines += _table(
            "transport|streams|floor p50|daemon p50|added p50|x p50|added p99|x p99",
            [
                [
                    o["transport"],
                    str(o["streams"]),
                    _f(o["floor_p50_ms"]),
                    _f(o["daemon_p50_ms"]),
                    _f(o["added_p50_ms"]),
                    _f(o["p50_ratio"]),
                    _f(o["added_p99_ms"]),
                    _f(o["p99_ratio"]),
                ]
                for o in ratios["daemon_over_floor"]
            ],
        )
    m = report["machine"]
    lines += [
        "",
        f"machine: {m['cpu_model']}, {m['cpus_usable']}/{m['cpus_logical']} CPUs, kernel "
        f"{m['kernel']}, Python {m['python']}, tritonclient {m['packages'].get('tritonclient')}; "
        f"load average {m.get('loadavg_start')} at the start, {m.get('loadavg_end')} at the end",
    ]
    for note in report["notes"]:
        lines.append(f"note: {note}")
    return "\n".join(lines)


def failures(report: dict[str, Any]) -> list[str]:
    """What went wrong, one line each (empty: every row ran with no errors)."""
    out = []
    for r in report["floor"]:
        if r["errors"] or not r["chunks"]:
            out.append(f"floor {r['transport']} x{r['streams']}: {r['errors'] or 'no chunks'}")
    for r in report["daemon"]:
        if not r["ok"]:
            out.append(f"daemon {r['transport']} x{r['streams']}: {r['error']}")
    for r in report["sweep"]:
        if r["errors"] or not r["requests"]:
            out.append(f"sweep {r['transport']} {r['samples']}: {r['errors'] or 'no requests'}")
    return out


# --- orchestration ----------------------------------------------------------------------------


def default_wavs() -> list[str]:
    """The 16 kHz files among bench.load's defaults: the floor does no resampling."""
    return load.wavs_at(RATE)


def load_audio(wavs: list[str]) -> list[list[np.ndarray]]:
    out = []
    for path in wavs:
        wav = load_wav(path)
        if wav.sample_rate != RATE:
            raise SystemExit(f"bench.triton: {path} is {wav.sample_rate} Hz; give 16 kHz WAVs")
        pcm = np.frombuffer(wav.pcm, dtype="<i2")
        out.append([pcm[i : i + CHUNK_SAMPLES] for i in range(0, pcm.size, CHUNK_SAMPLES)])
    return out


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # unwinds through every finally: servers, daemons, regions


def run(args: argparse.Namespace, server: ServerInfo, workdir: Path) -> dict[str, Any]:
    wavs = args.wav or default_wavs()
    if not wavs:
        raise SystemExit("bench.triton: no 16 kHz WAV files: give --wav FILE")
    audio = load_audio(wavs)
    server_cpu = TreeCpu(server.pid)
    notes: list[str] = []
    report: dict[str, Any] = {
        "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "config": {
            "model": args.model,
            "transports": [t.name for t in args.transports],
            "streams": args.streams,
            "duration_s": args.duration,
            "capacity_s": args.capacity,
            "sizes": args.sizes,
            "sweep_requests": args.sweep_requests,
            "floor_batch": args.floor_batch,
            "timeout_s": args.timeout,
            "chunk_ms": CHUNK_MS,
            "wavs": wavs,
            "smoke": args.smoke,
        },
        "server": {
            "grpc_url": server.grpc_url,
            "http_url": server.http_url,
            "pid": server.pid,
            "started_here": server.started_here,
        },
        "machine": load.machine_facts(),
        "floor": [],
        "daemon": [],
        "sweep": [],
        "notes": notes,
    }
    for pkg in ("tritonclient", "grpcio", "geventhttpclient"):
        try:
            report["machine"]["packages"][pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            report["machine"]["packages"][pkg] = None
    # Other work on the machine moves these figures (most at 64 streams): say how busy it was.
    report["machine"]["loadavg_start"] = [round(x, 2) for x in os.getloadavg()]
    if server.pid is None:
        notes.append("server CPU not measured (give --triton-pid for a server not started here)")

    urls = {"grpc": server.grpc_url, "http": server.http_url}
    transports = []
    for t in args.transports:
        if urls[t.protocol] is None:
            notes.append(f"{t.name} skipped: no {t.protocol} URL")
        else:
            transports.append(t)

    def url_of(t: Transport) -> str:
        url = urls[t.protocol]
        assert url is not None  # transports without one were dropped above
        return url

    def progress(text: str) -> None:
        print(f"[bench.triton] {text}", file=sys.stderr, flush=True)

    # Stream count outer, transport inner: the rows that are compared with each other (shm
    # and none, gRPC and HTTP, at one stream count) run close together in time.
    if not args.no_floor:
        common: dict[str, Any] = {
            "batch": args.floor_batch,
            "timeout_s": args.timeout,
            "region_prefix": args.shm_prefix,
            "server_cpu": server_cpu,
        }
        for n in args.streams:
            for t in transports:
                progress(f"floor {t.name} x{n}")
                url = url_of(t)
                report["floor"].append(
                    run_floor(t, url, args.model, audio, n, args.duration, paced=True, **common)
                )
                if args.capacity > 0:
                    report["floor"].append(
                        run_floor(
                            t, url, args.model, audio, n, args.capacity, paced=False, **common
                        )
                    )
    if not args.no_daemon:
        for n in args.streams:
            for t in transports:
                progress(f"daemon {t.name} x{n}")
                report["daemon"].append(
                    run_daemon(t, url_of(t), args.model, n, args, wavs, workdir, server_cpu)
                )
    if not args.no_sweep:
        for size in args.sizes:
            progress(f"sweep {size} samples: {', '.join(t.name for t in transports)}")
            report["sweep"] += run_sweep(
                transports,
                url_of,
                args.model,
                size,
                args.sweep_requests,
                args.sweep_warmup,
                args.timeout,
                args.shm_prefix,
            )
    if args.connect_requests > 0:
        progress(f"sticky against fresh connections: {', '.join(t.name for t in transports)}")
        report["connect"] = run_connect_sweep(
            transports,
            url_of,
            args.model,
            args.sizes[0],
            args.connect_requests,
            args.timeout,
            args.shm_prefix,
        )
    report["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    report["ratios"] = compute_ratios(report)
    return report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.triton",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(__doc__ or "").split("\n\n")[0],
        epilog=(
            "Parts: the floor (direct tritonclient calls, real-time streams, then capacity), the "
            "daemon (asrd run + bench.load per transport and stream count), the tensor-size "
            "sweep. Transports: " + ", ".join(ALL_TRANSPORTS) + ".\n\n"
            "examples:\n"
            "  python -m bench.triton                        # everything, about 6 minutes\n"
            "  python -m bench.triton --smoke                # seconds: does it all work?\n"
            "  python -m bench.triton --no-daemon --sizes 1600,16000,160000,800000\n"
            "  python -m bench.triton --grpc-url 127.0.0.1:8001 --http-url 127.0.0.1:8000 \\\n"
            "      --triton-pid $(cat .venv-triton/tritonserver.pid)"
        ),
    )
    g = p.add_argument_group("server")
    g.add_argument(
        "--grpc-url",
        metavar="HOST:PORT",
        help="a running server's gRPC address (with --http-url or alone: no server is started; "
        "shared memory needs the server on this host)",
    )
    g.add_argument("--http-url", metavar="HOST:PORT", help="a running server's HTTP address")
    g.add_argument(
        "--triton-pid", type=int, metavar="PID", help="a running server's pid, for its CPU time"
    )
    g.add_argument("--model", default="asr_light", help="model (asr_light)")
    g = p.add_argument_group("what to run")
    g.add_argument(
        "--transports",
        type=parse_transports,
        default=parse_transports(",".join(ALL_TRANSPORTS)),
        metavar="LIST",
        help="comma-separated protocol/shared_memory pairs (all four)",
    )
    g.add_argument(
        "--streams",
        type=_int_list,
        default=[1, 16, 64],
        metavar="LIST",
        help="concurrent stream counts (1,16,64)",
    )
    g.add_argument(
        "--duration",
        type=load._pos_float,
        default=10.0,
        metavar="S",
        help="seconds of real-time streams per floor and daemon row (10)",
    )
    g.add_argument(
        "--capacity",
        type=float,
        default=2.0,
        metavar="S",
        help="seconds of unpaced direct calls per floor row, for capacity; 0 = skip (2)",
    )
    g.add_argument(
        "--sizes",
        type=_int_list,
        default=[1600, 16000, 160000],
        metavar="LIST",
        help="samples per request in the size sweep (1600,16000,160000)",
    )
    g.add_argument(
        "--sweep-requests",
        type=load._pos_int,
        default=500,
        metavar="N",
        help="timed requests per sweep row (500)",
    )
    g.add_argument(
        "--sweep-warmup", type=int, default=20, metavar="N", help="untimed first requests (20)"
    )
    g.add_argument(
        "--connect-requests",
        type=int,
        default=100,
        metavar="N",
        help="requests on a sticky client and on a fresh client each (first size); 0 = skip (100)",
    )
    g.add_argument("--no-floor", action="store_true", help="skip the direct-call floor")
    g.add_argument("--no-daemon", action="store_true", help="skip the runs through the daemon")
    g.add_argument("--no-sweep", action="store_true", help="skip the tensor-size sweep")
    g.add_argument(
        "--smoke",
        action="store_true",
        help="tiny run for tests: streams 1,2; 1 s rows; 0.3 s capacity; size 1600; "
        "20 sweep requests",
    )
    g = p.add_argument_group("details")
    g.add_argument(
        "--floor-batch",
        type=load._pos_int,
        default=16,
        metavar="N",
        help="gRPC requests the floor's client keeps in flight at most, as the daemon's "
        "backend batches (16)",
    )
    g.add_argument(
        "--timeout",
        type=load._pos_float,
        default=5.0,
        metavar="S",
        help="per-request deadline, direct calls and the daemon's timeout_s (5)",
    )
    g.add_argument(
        "--ready-timeout",
        type=load._pos_float,
        default=30.0,
        metavar="S",
        help="wait at most S for a daemon to be ready and its endpoint up (30)",
    )
    g.add_argument(
        "--drain-timeout",
        type=load._pos_float,
        default=10.0,
        metavar="S",
        help="bench.load's wait for the last finals (10)",
    )
    g.add_argument(
        "--wav",
        action="append",
        metavar="FILE",
        help="16 kHz 16-bit WAV the streams play (repeatable; default the 16 kHz samples/*.wav)",
    )
    g.add_argument(
        "--shm-prefix",
        default=f"asrd_bench_{os.getpid()}_",
        metavar="NAME",
        help="prefix of the /dev/shm regions this benchmark (and its server) creates",
    )
    g.add_argument(
        "--log-dir",
        type=Path,
        metavar="DIR",
        help="keep the server's and daemons' logs here (default: a temporary directory)",
    )
    g.add_argument(
        "--json", metavar="PATH", help="report file (default bench/results/triton-<timestamp>.json)"
    )
    return p


def apply_smoke(args: argparse.Namespace) -> None:
    args.streams = [1, 2]
    args.duration = 1.0
    args.capacity = 0.3
    args.sizes = [1600]
    args.sweep_requests = 20
    args.sweep_warmup = 5
    args.connect_requests = min(args.connect_requests, 5)
    args.drain_timeout = 5.0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.smoke:
        apply_smoke(args)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        with contextlib.ExitStack() as stack:
            if args.log_dir is not None:
                args.log_dir.mkdir(parents=True, exist_ok=True)
                workdir = args.log_dir
            else:
                workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="asrd-bt-")))
            if args.grpc_url or args.http_url:
                server = ServerInfo(args.grpc_url, args.http_url, args.triton_pid, False)
            else:
                print("[bench.triton] starting a Triton server", file=sys.stderr, flush=True)
                server = stack.enter_context(own_server(args.model, workdir, args.shm_prefix))
            report = run(args, server, workdir)
    except KeyboardInterrupt:
        print("bench.triton: interrupted; servers and daemons stopped", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    report["failures"] = failures(report)
    if args.json is not None:
        path = Path(args.json)
    else:
        path = load.RESULTS_DIR / f"triton-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    path = load.write_report(report, path)
    print(format_report(report))
    for line in report["failures"]:
        print(f"FAILED: {line}")
    print(f"report: {path}")
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
