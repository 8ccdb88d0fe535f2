"""A streaming recognizer on one NVIDIA Triton Inference Server endpoint (gRPC or HTTP).

One utterance is one Triton *sequence* (docs/triton.md, "The models"): its correlation id comes
from a counter that starts at a random 62-bit base, so the ids of two workers (or two backends)
talking to one server do not collide. ``begin`` only records the utterance; the first request
carries START, every ``feed`` is one request whose ``TEXT`` answer becomes the partial, and
``end`` sends the END request (with an empty chunk: the model accepts ``[1, 0]``) whose
``TEXT`` is the final (``IS_FINAL`` must be true). ``cancel`` ends a started sequence on the
server, ignoring errors, so that it holds no decoder and does not block unloads; ``forget``
drops it locally (the endpoint is down) and ends it on the server after the next good probe.

Batching across streams: with gRPC, ``feed_many`` sends the chunks of up to ``max_batch``
streams as concurrent requests (``async_infer`` callbacks) and then waits for all of them, so
requests of different sequences reach the server together and its sequence batcher can give
them to the model in one ``execute()``. With HTTP they go one after the other: tritonclient's
gevent-based ``async_infer`` took about 10x longer than sequential calls here (docs/triton.md).

Transport: with ``shm_name`` (``/asrd-<instance>-<pid>-triton<n>``, the DESIGN.md scheme) the
backend creates one system shared-memory region of ``shm_bytes``, split into ``max_batch``
slots (fewer when the region is small); request ``i`` of a batch writes its chunk into slot ``i``
and asks for ``TEXT`` and ``IS_FINAL`` at fixed offsets at the end of that slot. A request sent
alone uses the whole region for its input. A chunk larger than its input space goes in the
request. The region is registered before the first request, again after any endpoint failure
(the server may have restarted), and once more when a request fails because the server lost the
registration (restart, or unregistered behind our back). With ``shm_name=None`` every tensor
travels in the request. ``close()`` ends open sequences, unregisters the region, unlinks it
(ignoring errors when the server is gone) and closes the client.

Errors: :class:`EndpointError` is the endpoint's fault (unreachable, timed out, overloaded):
the caller counts it against the endpoint's circuit breaker and moves the utterance.
:class:`SequenceLost` means the server does not know the sequence (restarted, or evicted it
after its idle timeout): the caller replays the utterance from its start. Any other
:class:`BackendError` is the model's (an error it raised, a malformed answer): that utterance
fails, the endpoint is fine.

Threading model: synchronous and single-threaded; one instance per infer-worker thread (the
client and its connection are sticky to this instance). gRPC callbacks run on gRPC's threads and
only store their result. Every request has a deadline of ``timeout_s`` (gRPC ``client_timeout``;
HTTP connection and network timeouts); ``feed_many`` waits at most that plus
``TRITON_WAIT_MARGIN_S``, and ``on_progress`` runs after each step (the worker's heartbeat). The
model's configuration (``max_batch_size``, hence the input shape) is read on first use, so
constructing the backend needs no reachable server."""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException

from daemon.config import TRITON_WAIT_MARGIN_S
from workers.backends.base import Backend, BackendError, Transcript

INPUT, TEXT, IS_FINAL = "AUDIO", "TEXT", "IS_FINAL"
TEXT_BYTES_MAX = 8 * 1024  # TEXT's slot: a 4-byte length and the UTF-8 text
SLOT_BYTES_MIN = 32 * 1024
MAX_BATCH = 16
_ID_MASK = (1 << 64) - 1
_INT32_MAX = 2**31 - 1
# gRPC codes that say the endpoint, not the request, failed.
_ENDPOINT_CODES = frozenset(
    {
        "StatusCode.UNAVAILABLE",
        "StatusCode.DEADLINE_EXCEEDED",
        "StatusCode.RESOURCE_EXHAUSTED",
        "StatusCode.CANCELLED",
        "StatusCode.ABORTED",
    }
)
_HTTP_ENDPOINT_CODES = frozenset({"408", "429", "502", "503", "504"})
_PROBE_SAMPLES = 160  # 10 ms of silence
UNREGISTER_ATTEMPTS = 4
UNREGISTER_PAUSE_S = 0.5
_ORPHANS_MAX = 1024

Protocol = Literal["grpc", "http"]

log = logging.getLogger("asrd.triton")


class EndpointError(BackendError):
    """The endpoint failed (unreachable, timed out, overloaded): count it, move the utterance."""


class SequenceLost(BackendError):
    """The server does not know the sequence (it restarted or evicted it): replay it."""


def _message(exc: BaseException) -> str:
    if isinstance(exc, InferenceServerException):
        return str(exc.message() or exc)
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _classify(exc: BaseException, what: str) -> BackendError:
    """The BackendError subclass that says whose fault ``exc`` is."""
    if isinstance(exc, BackendError):
        return exc
    text = f"{what}: {_message(exc)}"
    if isinstance(exc, InferenceServerException):
        status = str(exc.status() or "")
        message = str(exc.message() or "")
        if "START flag" in message or "restart it with START" in message:
            return SequenceLost(text)
        if status in _ENDPOINT_CODES or status in _HTTP_ENDPOINT_CODES:
            return EndpointError(text)
        if "failed to connect" in message.lower() or "socket closed" in message.lower():
            return EndpointError(text)
        return BackendError(text)
    # HTTP transport errors (refused, reset, timed out) are OS errors or gevent timeouts.
    return EndpointError(text)


def _transport_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [InferenceServerException, OSError]
    with contextlib.suppress(ImportError):
        import gevent

        errors.append(gevent.Timeout)
    return tuple(errors)


class _Sequence:
    __slots__ = ("corrid", "started", "text")

    def __init__(self, corrid: int) -> None:
        self.corrid = corrid
        self.started = False  # the server has seen its START
        self.text = ""


class _Layout:
    """Where request ``i`` of ``n`` concurrent ones puts its input and finds its outputs."""

    __slots__ = ("final_off", "in_cap", "in_off", "text_bytes", "text_off")

    def __init__(self, start: int, size: int, text_bytes: int) -> None:
        self.in_off = start
        self.final_off = start + size - 1
        self.text_off = self.final_off - text_bytes
        self.text_bytes = text_bytes
        self.in_cap = self.text_off - start


class TritonBackend(Backend):
    name = "triton"

    def __init__(
        self,
        url: str,
        model: str = "asr_streaming",
        *,
        protocol: Protocol = "grpc",
        shm_name: str | None = None,
        shm_bytes: int = 1 << 20,
        timeout_s: float = 5.0,
        max_batch: int = MAX_BATCH,
        on_progress: Callable[[], None] | None = None,
    ) -> None:
        self.url = url
        # Called after every request (batch): the infer worker beats its heartbeat there, so
        # a long series of requests (a replay, orphan ENDs) is progress, not a hang.
        self.on_progress = on_progress
        self._model = model
        self._protocol = protocol
        self._timeout_s = timeout_s
        self._max_batch = max(1, max_batch)
        self._next_id = random.SystemRandom().getrandbits(62) + 1
        self._open: dict[int, _Sequence] = {}
        self._orphans: deque[int] = deque(maxlen=_ORPHANS_MAX)
        self._batched: bool | None = None  # model's max_batch_size > 0; read on first use
        self._closed = False
        self._errors = _transport_errors()
        self._counters = dict.fromkeys(
            (
                "requests",
                "batches",
                "errors",
                "ended",
                "cancelled",
                "audio_bytes",
                "reregistered",
                "reconnects",
            ),
            0,
        )
        self._client: Any
        self._connect()
        # Shared memory: `slots` equal slots, each [input | TEXT slot | IS_FINAL byte].
        self._region: str | None = None
        self._handle: Any = None
        self._registered = False
        self._shm_bytes = shm_bytes
        self._layouts: list[_Layout] = []
        self._whole: _Layout | None = None
        if shm_name is not None:
            key = "/" + shm_name.lstrip("/")
            slots = max(1, min(self._max_batch, shm_bytes // SLOT_BYTES_MIN))
            slot_bytes = shm_bytes // slots
            text_bytes = min(TEXT_BYTES_MAX, slot_bytes // 4)
            if text_bytes < 8 or slot_bytes - text_bytes - 1 < 2:
                self._client.close()
                raise BackendError(f"shm_bytes {shm_bytes} is too small for a region")
            self._layouts = [_Layout(i * slot_bytes, slot_bytes, text_bytes) for i in range(slots)]
            self._whole = _Layout(0, shm_bytes, text_bytes)
            try:
                self._handle = shm.create_shared_memory_region(key[1:], key, shm_bytes)
            except shm.SharedMemoryException as exc:
                self._client.close()
                raise BackendError(f"cannot create shared memory {key}: {exc}") from exc
            self._region = key[1:]
            self._shm_key = key

    def __enter__(self) -> TritonBackend:
        return self

    # --- connection ---------------------------------------------------------------------------

    def _connect(self) -> None:
        try:
            if self._protocol == "grpc":
                # Short reconnect backoff: after a server restart gRPC would otherwise wait up
                # to two minutes before trying the address again. Large messages: a replayed
                # utterance without shared memory can exceed the 4 MB default.
                self._client = grpcclient.InferenceServerClient(
                    self.url,
                    channel_args=[
                        ("grpc.max_send_message_length", _INT32_MAX),
                        ("grpc.max_receive_message_length", _INT32_MAX),
                        ("grpc.initial_reconnect_backoff_ms", 100),
                        ("grpc.min_reconnect_backoff_ms", 100),
                        ("grpc.max_reconnect_backoff_ms", 1000),
                    ],
                )
                self._mod: Any = grpcclient
            else:
                import tritonclient.http as httpclient

                self._client = httpclient.InferenceServerClient(
                    self.url,
                    connection_timeout=self._timeout_s,
                    network_timeout=self._timeout_s,
                )
                self._mod = httpclient
        except (InferenceServerException, ValueError) as exc:
            raise BackendError(f"triton client for {self.url}: {_message(exc)}") from exc

    def reconnect(self) -> None:
        """A fresh client and connection, and registration again on next use: after an
        endpoint failure the server may be a new process."""
        with contextlib.suppress(Exception):
            self._client.close()
        self._connect()
        self._registered = False
        self._counters["reconnects"] += 1

    def _timeout(self) -> dict[str, Any]:
        return {"client_timeout": self._timeout_s} if self._protocol == "grpc" else {}

    # --- utterances ---------------------------------------------------------------------------

    def begin(self, key: int) -> None:
        if self._closed:
            raise BackendError("backend is closed")
        if key in self._open:
            raise BackendError(f"stream {key} already has an open utterance")
        self._open[key] = _Sequence(self._next_id)
        self._next_id = (self._next_id + 1) & _ID_MASK or 1  # 0 means "no sequence"

    def feed(self, key: int, pcm: bytes) -> None:
        error = self.feed_many([(key, pcm)]).get(key)
        if error is not None:
            raise error

    def feed_many(self, items: Sequence[tuple[int, bytes]]) -> dict[int, Exception]:
        """Feed several streams at once (one chunk each): concurrent requests, answered
        together. Returns the error of each key that failed; the others were fed."""
        errors: dict[int, Exception] = {}
        jobs: list[tuple[int, _Sequence, bytes]] = []
        for key, pcm in items:
            try:
                seq = self._get(key)
            except BackendError as exc:
                errors[key] = exc
                continue
            if len(pcm) % 2:
                errors[key] = BackendError(
                    f"stream {key}: odd number of bytes ({len(pcm)}) in s16le audio"
                )
            elif pcm:
                jobs.append((key, seq, pcm))
        step = len(self._layouts) if self._layouts else self._max_batch
        for i in range(0, len(jobs), step):
            group = jobs[i : i + step]
            if any(isinstance(e, EndpointError) for e in errors.values()):
                # The endpoint just failed: don't spend a timeout per group on it.
                for key, _, _ in group:
                    errors[key] = EndpointError(f"triton {self.url}: skipped after a failure")
                continue
            answers = self._run([(seq, pcm, False) for _, seq, pcm in group])
            for (key, seq, pcm), answer in zip(group, answers, strict=True):
                if isinstance(answer, BackendError):
                    errors[key] = answer
                    continue
                seq.started = True
                seq.text = answer[0]
                self._counters["audio_bytes"] += len(pcm)
        return errors

    def partial(self, key: int) -> str:
        return self._get(key).text

    def end(self, key: int) -> Transcript:
        seq = self._get(key)
        del self._open[key]
        answer = self._run([(seq, b"", True)])[0]
        if isinstance(answer, BackendError):
            raise answer
        text, final = answer
        if not final:
            self._counters["errors"] += 1
            raise BackendError(f"stream {key}: the END answer of {self._model} is not final")
        self._counters["ended"] += 1
        return Transcript(text, None, None)

    def cancel(self, key: int) -> None:
        seq = self._open.pop(key, None)
        if seq is None:
            return
        self._counters["cancelled"] += 1
        if seq.started:
            self._run([(seq, b"", True)])  # errors ignored: the sequence is dropped either way

    def forget(self, key: int) -> None:
        """Drop ``key``'s utterance without a request (the endpoint is down); its sequence is
        ended on the server after the next successful :meth:`probe`."""
        seq = self._open.pop(key, None)
        if seq is not None and seq.started:
            self._orphans.append(seq.corrid)

    def active(self) -> int:
        return len(self._open)

    def stats(self) -> dict[str, int]:
        return {**self._counters, "active": len(self._open)}

    def close(self) -> None:
        if self._closed:
            return
        for key in list(self._open):
            self.cancel(key)
        self._closed = True
        if self._handle is not None:
            self._unregister_for_good()
            with contextlib.suppress(shm.SharedMemoryException, OSError):
                shm.destroy_shared_memory_region(self._handle)
            self._handle = None
            self._registered = False
        with contextlib.suppress(Exception):
            self._client.close()

    def _unregister_for_good(self) -> None:
        """Unregister the region at exit (whether or not this client registered it: after a
        reconnect the server may still hold an earlier registration). The server refuses
        while requests that use it wait (timed-out ones it has not run yet): retry briefly."""
        error: BaseException | None = None
        for attempt in range(UNREGISTER_ATTEMPTS):
            if attempt:
                time.sleep(UNREGISTER_PAUSE_S)
            try:
                self._client.unregister_system_shared_memory(self._region, **self._timeout())
                return
            except self._errors as exc:
                if isinstance(_classify(exc, ""), EndpointError):
                    return  # the server is gone, and its registrations with it
                error = exc
        log.warning(
            "triton %s: region %s may stay registered on the server: %s",
            self.url,
            self._region,
            _message(error) if error is not None else "unknown",
        )

    # --- health -------------------------------------------------------------------------------

    def probe(self) -> None:
        """Is the endpoint serving? The model must be ready and answer a one-request sequence
        (registering the region first). Raises :class:`EndpointError` or BackendError.
        On success, sequences dropped by :meth:`forget` are ended on the server."""
        if self._closed:
            raise BackendError("backend is closed")
        what = f"triton {self.url} {self._model}"
        try:
            ready = self._client.is_model_ready(self._model, **self._timeout())
        except self._errors as exc:
            raise _classify(exc, what) from exc
        finally:
            self._progress()
        if not ready:
            raise EndpointError(f"{what}: the model is not ready")
        seq = _Sequence(self._next_id)
        self._next_id = (self._next_id + 1) & _ID_MASK or 1
        answer = self._run([(seq, bytes(2 * _PROBE_SAMPLES), True)])[0]
        if isinstance(answer, BackendError):
            raise answer
        if not answer[1]:
            raise BackendError(f"{what}: the probe's END answer is not final")
        while self._orphans:
            orphan = _Sequence(self._orphans.popleft())
            orphan.started = True
            self._run([(orphan, b"", True)])  # most are gone already (restart, idle timeout)

    def sweep_regions(self, is_stale: Callable[[str], bool]) -> list[str]:
        """Unregister the server's regions for which ``is_stale(name)`` (left registered by a
        worker that died); returns their names. Errors: :class:`EndpointError`."""
        what = f"triton {self.url}"
        try:
            if self._protocol == "grpc":
                status = self._client.get_system_shared_memory_status(
                    as_json=True, **self._timeout()
                )
                names = list(status.get("regions", {})) if status else []
            else:
                names = [r["name"] for r in self._client.get_system_shared_memory_status()]
            stale = [n for n in names if n != self._region and is_stale(n)]
            for name in stale:
                self._client.unregister_system_shared_memory(name, **self._timeout())
        except self._errors as exc:
            raise _classify(exc, what) from exc
        return stale

    # --- requests -----------------------------------------------------------------------------

    def _progress(self) -> None:
        if self.on_progress is not None:
            self.on_progress()

    def _get(self, key: int) -> _Sequence:
        if self._closed:
            raise BackendError("backend is closed")
        seq = self._open.get(key)
        if seq is None:
            raise BackendError(f"stream {key} has no open utterance")
        return seq

    def _prepare(self) -> None:
        """Read the model's batching and register the region, once (and after failures)."""
        if self._batched is None:
            if self._protocol == "grpc":
                config = self._client.get_model_config(
                    self._model, as_json=True, **self._timeout()
                )["config"]
            else:
                config = self._client.get_model_config(self._model)
            self._batched = int(config.get("max_batch_size", 0)) > 0
        if self._handle is not None and not self._registered:
            self._register()

    def _register(self) -> None:
        assert self._region is not None
        with contextlib.suppress(InferenceServerException):  # a stale one of ours
            self._client.unregister_system_shared_memory(self._region, **self._timeout())
        try:
            self._client.register_system_shared_memory(
                self._region, self._shm_key, self._shm_bytes, **self._timeout()
            )
        except InferenceServerException as exc:
            # The server refuses to unregister a region that requests still use (timed-out
            # ones it has not run yet): it is this worker's own, still valid, registration.
            if "already in manager" not in str(exc.message() or ""):
                raise
        self._registered = True

    def _region_lost(self) -> bool:
        """True when the server no longer lists our region (it restarted, or someone
        unregistered it); False when it does or when the server cannot say."""
        try:
            if self._protocol == "grpc":
                status = self._client.get_system_shared_memory_status(
                    as_json=True, **self._timeout()
                )
                names = set(status.get("regions", {})) if status else set()
            else:
                names = {r["name"] for r in self._client.get_system_shared_memory_status()}
        except self._errors:
            return False
        return self._region not in names

    def _run(
        self, jobs: list[tuple[_Sequence, bytes, bool]]
    ) -> list[tuple[str, bool] | BackendError]:
        """Send one request per job (concurrently when several) and read the answers."""
        what = f"triton {self.url} {self._model}"
        self._counters["requests"] += len(jobs)
        if len(jobs) > 1:
            self._counters["batches"] += 1
        try:
            self._prepare()
        except self._errors as exc:
            self._counters["errors"] += len(jobs)
            error = _classify(exc, what)
            return [error] * len(jobs)
        finally:
            self._progress()
        answers = self._send(jobs)
        self._progress()
        in_shm = self._handle is not None
        lost = in_shm and any(isinstance(a, InferenceServerException) for a in answers)
        if lost and self._region_lost():
            try:
                self._register()
            except self._errors as exc:
                self._counters["errors"] += len(jobs)
                return [_classify(exc, what)] * len(jobs)
            self._counters["reregistered"] += 1
            retry = [i for i, a in enumerate(answers) if isinstance(a, BaseException)]
            again = self._send([jobs[i] for i in retry])
            for i, answer in zip(retry, again, strict=True):
                answers[i] = answer
        out: list[tuple[str, bool] | BackendError] = []
        for (seq, _, _), answer in zip(jobs, answers, strict=True):
            if isinstance(answer, BaseException):
                self._counters["errors"] += 1
                out.append(_classify(answer, f"{what} sequence {seq.corrid}"))
            else:
                out.append(answer)
        return out

    def _send(
        self, jobs: list[tuple[_Sequence, bytes, bool]]
    ) -> list[tuple[str, bool] | BaseException]:
        """Requests for ``jobs``; each answer is ``(text, is_final)`` or the exception."""
        layouts: list[_Layout | None]
        if self._handle is None:
            layouts = [None] * len(jobs)
        elif len(jobs) == 1:
            layouts = [self._whole]
        else:
            layouts = list(self._layouts[: len(jobs)])
        requests = [
            self._request(seq, pcm, end, layout)
            for (seq, pcm, end), layout in zip(jobs, layouts, strict=True)
        ]
        if len(jobs) > 1 and self._protocol == "grpc":
            results = self._send_grpc_async(requests)
        else:
            results = []
            for request in requests:
                try:
                    results.append(self._client.infer(**request))
                except self._errors as exc:
                    results.append(exc)
        answers: list[tuple[str, bool] | BaseException] = []
        for result, layout in zip(results, layouts, strict=True):
            if isinstance(result, BaseException):
                answers.append(result)
                continue
            try:
                answers.append(self._read(result, layout))
            except BackendError as exc:
                answers.append(exc)
        return answers

    def _send_grpc_async(self, requests: list[dict[str, Any]]) -> list[Any]:
        results: list[Any] = [None] * len(requests)
        done = threading.Semaphore(0)

        def callback(i: int, result: Any, error: Any) -> None:  # on a gRPC thread
            results[i] = error if error is not None else result
            done.release()

        sent = 0
        for i, request in enumerate(requests):
            try:
                # tritonclient calls it with keywords: result=, error=.
                self._client.async_infer(
                    callback=lambda result, error, i=i: callback(i, result, error), **request
                )
                sent += 1
            except self._errors as exc:
                results[i] = exc
        for _ in range(sent):
            if not done.acquire(timeout=self._timeout_s + TRITON_WAIT_MARGIN_S):
                break
        return [
            r if r is not None else EndpointError(f"triton {self.url}: no answer in time")
            for r in results
        ]

    def _request(
        self, seq: _Sequence, pcm: bytes, end: bool, layout: _Layout | None
    ) -> dict[str, Any]:
        samples = np.frombuffer(pcm, dtype="<i2")
        shape = [1, len(samples)] if self._batched else [len(samples)]
        mod = self._mod
        audio = mod.InferInput(INPUT, shape, "INT16")
        outputs = None
        if layout is not None and 0 < samples.nbytes <= layout.in_cap:
            shm.set_shared_memory_region(self._handle, [samples], offset=layout.in_off)
            audio.set_shared_memory(self._region, samples.nbytes, offset=layout.in_off)
        else:  # no region, an empty chunk (a region can't hold 0 bytes) or too big for it
            audio.set_data_from_numpy(samples.reshape(shape))
        if layout is not None:
            text_out = mod.InferRequestedOutput(TEXT)
            text_out.set_shared_memory(self._region, layout.text_bytes, offset=layout.text_off)
            final_out = mod.InferRequestedOutput(IS_FINAL)
            final_out.set_shared_memory(self._region, 1, offset=layout.final_off)
            outputs = [text_out, final_out]
        started = seq.started
        seq.started = True  # a START that fails is repeated only by a replay (new sequence)
        return {
            "model_name": self._model,
            "inputs": [audio],
            "outputs": outputs,
            "sequence_id": seq.corrid,
            "sequence_start": not started,
            "sequence_end": end,
            **self._timeout(),
        }

    def _read(self, result: Any, layout: _Layout | None) -> tuple[str, bool]:
        if layout is not None:
            text_meta, final_meta = result.get_output(TEXT), result.get_output(IS_FINAL)
            if text_meta is None or final_meta is None:
                raise BackendError(f"{self._model} answered without {TEXT} or {IS_FINAL}")
            if isinstance(text_meta, dict):  # HTTP
                text_shape, final_shape = text_meta["shape"], final_meta["shape"]
            else:
                text_shape, final_shape = list(text_meta.shape), list(final_meta.shape)
            text = shm.get_contents_as_numpy(
                self._handle, np.object_, text_shape, offset=layout.text_off
            )
            final = shm.get_contents_as_numpy(
                self._handle, np.bool_, final_shape, offset=layout.final_off
            )
        else:
            text, final = result.as_numpy(TEXT), result.as_numpy(IS_FINAL)
        if text is None or final is None or text.size != 1 or final.size != 1:
            raise BackendError(f"{self._model} answered a malformed {TEXT}/{IS_FINAL}")
        value = text.reshape(-1)[0]
        if isinstance(value, bytes):
            value = value.decode("utf-8", errors="replace")
        return str(value), bool(final.reshape(-1)[0])
