"""Infer worker: drains its lane's audio ring, runs the recognizer, pushes partials and finals.

Threading model: one loop thread. It sleeps in ``poll()`` on the audio ring's wake-up
descriptor (and, while the result ring is full, on the result ring's space wake-up), with a
timeout of ``heartbeat_interval_s`` so that it beats even when idle. Two ways to decode:

* passes (Triton, null, an embedded backend with one thread): the audio of a batch of records
  goes to ``Backend.feed_many`` at once; the backend may spread it over threads of its own
  (Triton's concurrent requests) and the loop waits for the batch, and for each ``end``;
* pipelined (a backend with ``parallel_streams`` of 2 or more: the embedded backend's decoding
  threads): every recognizer call but ``begin`` is a job on :mod:`workers.decoding`'s threads,
  one stream's in order, as its audio arrives; the loop also polls their eventfd and turns
  finished jobs into partials and finals. Each utterance then has a backend key of its own, so
  a stream's next utterance can begin while its last one's end is still queued.

Liveness: the heartbeat (one monotonic timestamp) is written after every recognizer call on
the loop's thread and every poll, and is never newer than the start of the oldest running
decoding job, so a beat older than ``heartbeat_timeout_s`` means one recognizer call has been
stuck that long (the supervisor then kills and replaces the worker); the counters are published
every ``PUBLISH_INTERVAL_S`` while busy and at the latest that long after the loop went idle
(under load the loop sleeps between records: publishing at each sleep cost more than the
counters are worth). A record of 100 ms of audio costs about 15-35 ms of pocketsphinx.

Limits: records are handled in batches of at most ``BATCH`` so partials and heartbeats are not
starved by a deep ring; utterances beyond the backend's decoder bound wait (their audio is
kept) until a decoder frees up. SIGTERM ends the loop after the current batch; pipelined, calls
still queued then are dropped (the supervisor stops an infer worker after its lane's ingress
has drained its streams).
"""

from __future__ import annotations

import logging
import select
import signal
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

import msgspec

from ipc import records as rec
from ipc.heartbeat import BACKEND_COUNTERS, INFER_COUNTERS, WorkerState
from ipc.protocol import ErrorCode
from ipc.ring import Record
from ipc.shm import is_stale_segment, triton_region_name
from workers.backends import create_backend
from workers.backends.base import Backend, BackendBusy, BackendUnavailable, Transcript
from workers.common import LaneWorker, parent_alive, read_live_config, setup_process
from workers.decoding import CANCEL, END, FEED, PARTIAL, Finished, Job, Jobs
from workers.faults import FaultInjector
from workers.spec import WorkerSpec, load_spec

BATCH = 64
AUDIO_KINDS = (rec.AUDIO, rec.AUDIO_BATCH)
PUBLISH_INTERVAL_S = 0.05  # counters for status and metrics: fresher than anyone reads them

log = logging.getLogger("asrd.infer")


@dataclass(slots=True, eq=False)
class Utterance:
    key: int
    number: int
    interim_ms: int
    bkey: int = -1  # the backend's key: the stream's, or (pipelined) the utterance's own
    started: bool = False  # holds a decoder
    ended: bool = False  # END seen while still waiting for a decoder
    dropped: bool = False  # cancelled or failed: results of its queued jobs are not sent
    audio_seq: int = -1
    last_partial_at: float = 0.0
    last_partial: str = ""
    waiting_audio: list[bytes] = field(default_factory=list)


class InferWorker(LaneWorker):
    def __init__(self, spec: WorkerSpec, backend: Backend | None = None) -> None:
        super().__init__(spec)
        cfg = spec.config
        self.heartbeat_interval = cfg.heartbeat_interval_s
        self.utterances: dict[int, Utterance] = {}
        self.waiting: deque[Utterance] = deque()
        # Utterances fed since their last partial (only those that want partials), by key: the
        # partial pass visits these, not every open utterance.
        self.due: dict[int, Utterance] = {}
        # Audio of started utterances from the current batch of records, fed at its end.
        self.feeds: dict[int, list[bytes]] = {}
        self.stopping = False
        self.reload_requested = False
        self.published_at = 0.0
        self.counters = dict.fromkeys(INFER_COUNTERS, 0)
        self.faults = FaultInjector(cfg.faults, "infer", spec.lane, spec.generation)
        if backend is None:
            backend = create_backend(
                cfg.backend,
                region_name=lambda i: triton_region_name(
                    cfg.instance, spec.supervisor_pid, spec.lane, i
                ),
                max_pending_audio_s=cfg.limits.max_pending_audio_s,
                is_stale_region=lambda name: is_stale_segment(name, cfg.instance),
                label=f"lane {spec.lane}: ",
                on_progress=self.beat,
            )
        self.backend = backend
        self.jobs: Jobs[Utterance] | None = None
        if backend.parallel_streams >= 2:
            self.jobs = Jobs(self.run_job, backend.parallel_streams)
        self._next_bkey = 0
        self._enc = msgspec.msgpack.Encoder()
        self._begin_dec = msgspec.msgpack.Decoder(rec.UtteranceBegin)
        self._results_pushed = False

    # --- main loop ------------------------------------------------------------------------------
    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_sigterm)
        signal.signal(signal.SIGHUP, self._on_sighup)
        self.push_result(rec.HELLO, 0, self.spec.generation, b"")
        self.flush_signal()
        self.slot.set_state(WorkerState.RUNNING)
        self.publish()
        log.info("serving with the %s backend", self.backend.name)
        poller = select.poll()
        poller.register(self.audio_data.fileno(), select.POLLIN)
        if self.jobs is not None:
            poller.register(self.jobs.fileno(), select.POLLIN)
        last_parent_check = time.monotonic()
        timeout_ms = int(self.heartbeat_interval * 1000)
        while not self.stopping:
            records = self.audio.pop_many(BATCH)
            if self.reload_requested:
                self.reload()
            self.backend.maintain()
            if self.jobs is not None:
                self.collect_jobs()
            if not records:
                self.emit_partials()
                self.flush_signal()
                wait_ms = timeout_ms if not self.due else 10
                unpublished = PUBLISH_INTERVAL_S - (time.monotonic() - self.published_at)
                if unpublished <= 0:
                    self.publish()
                else:  # published moments ago, under load: again once the interval is up
                    self.beat()
                    wait_ms = min(wait_ms, 1 + int(unpublished * 1000))
                if self.audio.prepare_sleep():
                    woken = poller.poll(wait_ms)
                    self.audio.end_sleep()
                    if woken:
                        self.audio_data.drain()
            else:
                if self.audio.take_space_request():
                    self.audio_space.signal()
                for r in records:
                    self.handle(r)
                    if r.kind not in AUDIO_KINDS:  # audio is only gathered here (flush_feeds)
                        self.beat()
                self.flush_feeds()
                self.emit_partials()
                self.flush_signal()
                if time.monotonic() - self.published_at >= PUBLISH_INTERVAL_S:
                    self.publish()
                else:
                    self.beat()
            now = time.monotonic()
            if now - last_parent_check > 0.5:
                last_parent_check = now
                if not parent_alive(self.spec):
                    log.error("supervisor died; exiting")
                    break
        self.slot.set_state(WorkerState.STOPPED)
        self.publish()
        self.close()
        return 0

    def _on_sigterm(self, signum: int, frame: object) -> None:
        self.stopping = True

    def _on_sighup(self, signum: int, frame: object) -> None:
        self.reload_requested = True

    def reload(self) -> None:
        """The supervisor reloaded the config: breaker settings and the log level apply now
        (anything else that concerns this worker comes with a new worker)."""
        self.reload_requested = False
        cfg = read_live_config(self.spec)
        if cfg is not None and hasattr(self.backend, "set_breaker_config"):
            self.backend.set_breaker_config(cfg.backend.triton.breaker)
            log.info("config reloaded: breaker settings applied")

    def beat(self) -> None:
        """Proof of progress: cheap enough for every record."""
        self.slot.beat(self._progress())

    def _progress(self) -> float:
        now = time.monotonic()
        if self.jobs is not None:
            oldest = self.jobs.oldest_start()
            if oldest is not None and oldest < now:
                return oldest
        return now

    def publish(self) -> None:
        """The heartbeat and every counter."""
        self.published_at = time.monotonic()
        self.slot.beat(self._progress())
        c = self.counters
        c["active_utterances"] = self.backend.active()
        c["waiting_utterances"] = len(self.waiting)
        stats = self.backend.stats()
        for name in BACKEND_COUNTERS:
            c[name] = stats.get(name, 0)
        self.slot.publish(list(c.values()))

    def close(self) -> None:
        if self.jobs is not None and not self.jobs.close():
            # A recognizer call is still running: freeing its decoder under it could crash the
            # process on its way out, so leave the decoders to the exit.
            log.error("a decoding call did not return within 5 s of shutdown")
            self.close_lane()
            return
        self.backend.close()
        self.close_lane()

    # --- records --------------------------------------------------------------------------------
    def handle(self, r: Record) -> None:
        c = self.counters
        c["records"] += 1
        if self.faults.enabled:
            self.faults.record()
        kind = r.kind
        if kind == rec.AUDIO:
            self.audio_chunks(((r.key, r.seq, r.payload),))
            return
        if kind == rec.AUDIO_BATCH:
            try:
                chunks = rec.unpack_audio_batch(r.payload)
            except rec.CorruptBatch as exc:
                log.error("corrupt audio batch record: %s; its audio is lost", exc)
                c["dropped_records"] += 1
                return
            if self.faults.enabled:  # the harness counts chunks, as before batching
                for _ in range(len(chunks) - 1):
                    self.faults.record()
            self.audio_chunks(chunks)
            return
        if self.feeds:
            self.flush_feeds()  # audio goes in before anything else happens to its utterance
        if kind == rec.BEGIN:
            try:
                begin = self._begin_dec.decode(r.payload)
            except msgspec.DecodeError as exc:
                # A corrupt record must not take the lane down; the client hears about it.
                log.error("corrupt BEGIN record for stream %x: %s", r.key, exc)
                c["dropped_records"] += 1
                payload = self._enc.encode(
                    rec.UtteranceError(
                        ErrorCode.INFERENCE_FAILED, f"corrupt utterance record: {exc}"
                    )
                )
                self.push_result(rec.FAILED, r.key, r.seq, payload)
                return
            old = self.utterances.pop(r.key, None)
            if old is not None:
                self.drop(old)
            started = Utterance(r.key, r.seq, begin.interim_ms, self.backend_key(r.key))
            self.utterances[r.key] = started
            c["utterances"] += 1
            self.try_start(started)
        elif kind == rec.END:
            u = self.utterances.get(r.key)
            if u is None or u.number != r.seq:
                c["dropped_records"] += 1
                return
            if u.started:
                self.finish(u)
            else:
                u.ended = True
        elif kind == rec.CANCEL:
            u = self.utterances.get(r.key)
            if u is not None and u.number == r.seq:
                self.drop(self.utterances.pop(r.key))
        elif kind == rec.RESET:
            # A new ingress worker: every utterance of the previous one has no owner any more.
            for u in list(self.utterances.values()):
                self.drop(u)
            self.utterances.clear()
            log.info("ingress generation %d started; abandoned utterances cleared", r.key)
        else:
            c["dropped_records"] += 1

    def audio_chunks(self, chunks: Iterable[tuple[int, int, bytes]]) -> None:
        """Gather audio for flush_feeds (or, before its utterance has a decoder, keep it)."""
        c = self.counters
        utterances = self.utterances
        feeds = self.feeds
        jobs = self.jobs
        for key, seq, pcm in chunks:
            u = utterances.get(key)
            if u is None:
                c["dropped_records"] += 1
                continue
            c["audio_bytes"] += len(pcm)
            u.audio_seq = seq
            if u.started:
                if jobs is not None:
                    jobs.submit(key, Job(FEED, u, [pcm], seq))
                else:
                    feeds.setdefault(key, []).append(pcm)
            else:
                u.waiting_audio.append(pcm)

    def flush_feeds(self) -> None:
        """Feed the audio gathered from this batch of records: one chunk per stream (its
        records joined), all streams in one call so a backend can overlap them."""
        if not self.feeds:
            return
        feeds, self.feeds = self.feeds, {}
        items = [
            (key, chunks[0] if len(chunks) == 1 else b"".join(chunks))
            for key, chunks in feeds.items()
        ]
        if self.faults.enabled:
            self.faults.recognizer_call()
        t0 = time.perf_counter()
        errors = self.backend.feed_many(items)
        self.counters["decode_us"] += int((time.perf_counter() - t0) * 1e6)
        for key, _ in items:
            u = self.utterances.get(key)
            if u is None:
                continue
            error = errors.get(key)
            if error is not None:  # a recognizer failure ends this utterance only
                self.fail(u, error)
            elif u.interim_ms >= 0:
                self.due[key] = u

    def backend_key(self, key: int) -> int:
        """The stream's key; pipelined, one per utterance (its last may not have ended yet)."""
        if self.jobs is None:
            return key
        self._next_bkey += 1
        return self._next_bkey

    def try_start(self, u: Utterance) -> bool:
        try:
            self.backend.begin(u.bkey)
        except BackendBusy:
            if u not in self.waiting:
                self.waiting.append(u)
            return False
        except Exception as exc:
            self.fail(u, exc)
            return False
        u.started = True
        if u.waiting_audio and self.jobs is not None:
            audio, u.waiting_audio = u.waiting_audio, []
            self.jobs.submit(u.key, Job(FEED, u, audio, u.audio_seq))
        elif u.waiting_audio:
            audio, u.waiting_audio = u.waiting_audio, []
            try:
                for pcm in audio:
                    self.backend.feed(u.bkey, pcm)
            except Exception as exc:
                self.fail(u, exc)
                return False
            if u.interim_ms >= 0:
                self.due[u.key] = u
        if u.ended:
            self.finish(u)
        return True

    def start_waiting(self) -> None:
        while self.waiting:
            u = self.waiting[0]
            if self.utterances.get(u.key) is not u:
                self.waiting.popleft()
                continue
            if not self.try_start(u) and u in self.waiting:
                return
            if self.waiting and self.waiting[0] is u:
                self.waiting.popleft()

    def finish(self, u: Utterance) -> None:
        if self.jobs is not None:  # its final comes from collect_jobs
            self._forget(u)
            self.jobs.submit(u.key, Job(END, u))
            return
        t0 = time.perf_counter()
        try:
            transcript: Transcript = self.backend.end(u.bkey)
        except Exception as exc:
            self.fail(u, exc)
            return
        self.counters["decode_us"] += int((time.perf_counter() - t0) * 1e6)
        self._forget(u)
        self.push_final(u, transcript)
        self.start_waiting()

    def push_final(self, u: Utterance, transcript: Transcript) -> None:
        words = (
            [rec.WordResult(w.word, w.start_ms, w.end_ms, w.confidence) for w in transcript.words]
            if transcript.words is not None
            else None
        )
        payload = self._enc.encode(rec.FinalResult(transcript.text, words, transcript.confidence))
        self.push_result(rec.FINAL, u.key, u.number, payload)
        self.counters["finals"] += 1

    def _forget(self, u: Utterance) -> None:
        if self.utterances.get(u.key) is u:  # not a later utterance of the stream
            del self.utterances[u.key]

    def drop(self, u: Utterance) -> None:
        u.dropped = True
        self._forget(u)
        if u.started and self.jobs is not None:
            # Its queued audio is not decoded; its decoder is released when the cancel has run.
            self.jobs.discard(u.key, u)
            self.jobs.submit(u.key, Job(CANCEL, u))
            return
        if u.started:
            try:
                self.backend.cancel(u.bkey)
            except Exception:
                log.exception("cancel of stream %x failed", u.key)
        elif u in self.waiting:
            self.waiting.remove(u)
        self.start_waiting()

    def fail(self, u: Utterance, exc: Exception) -> None:
        self.counters["failures"] += 1
        self.drop(u)
        if isinstance(exc, BackendUnavailable):
            log.warning("stream %x utterance %d: %s", u.key, u.number, exc)
            error = rec.UtteranceError(
                ErrorCode.INFERENCE_UNAVAILABLE,
                str(exc),
                retry_after_ms=max(1, round(exc.retry_after_s * 1000)),
            )
        else:
            log.error("recognizer failed on stream %x utterance %d: %s", u.key, u.number, exc)
            error = rec.UtteranceError(ErrorCode.INFERENCE_FAILED, f"recognizer failed: {exc}")
        payload = self._enc.encode(error)
        self.push_result(rec.FAILED, u.key, u.number, payload)

    # --- pipelined decoding ---------------------------------------------------------------------
    def run_job(self, job: Job[Utterance]) -> str | Transcript | None:
        """On a decoding thread: one recognizer call of ``job``'s utterance. A feed returns the
        partial when the utterance wants one now (None when it is throttled)."""
        if self.faults.enabled:
            self.faults.recognizer_call()
        u = job.target
        backend = self.backend
        kind = job.kind
        if kind == FEED:
            chunks = job.chunks
            backend.feed(u.bkey, chunks[0] if len(chunks) == 1 else b"".join(chunks))
            if u.interim_ms < 0 or time.monotonic() - u.last_partial_at < u.interim_ms / 1000:
                return None
            return backend.partial(u.bkey)
        if kind == PARTIAL:
            return backend.partial(u.bkey)
        if kind == END:
            return backend.end(u.bkey)
        backend.cancel(u.bkey)
        return None

    def collect_jobs(self) -> None:
        """Finished decoding jobs become partials, finals and failures."""
        assert self.jobs is not None
        finished = self.jobs.collect()
        if not finished:
            return
        c = self.counters
        batch: list[rec.BatchedPartial] = []
        for f in finished:
            c["decode_us"] += int(f.seconds * 1e6)
            kind = f.job.kind
            if kind in (END, CANCEL):
                self._ended(f)
                continue
            u = f.job.target
            if u.dropped:
                continue
            if f.error is not None:  # a recognizer failure ends this utterance only
                self.fail(u, f.error)
                continue
            if self.utterances.get(u.key) is not u:
                continue  # ended: its final follows
            text = f.result
            if text is None:  # throttled: emit_partials asks again when it is due
                self.due[u.key] = u
                continue
            self.due.pop(u.key, None)
            u.last_partial_at = time.monotonic()
            if text == u.last_partial and u.interim_ms > 0:
                continue
            u.last_partial = text
            batch.append(rec.BatchedPartial(u.key, u.number, text, f.job.seq))
        if batch:
            self.push_partials(batch)
            c["partials"] += len(batch)
        self.beat()

    def _ended(self, f: Finished[Utterance]) -> None:
        u = f.job.target
        if f.job.kind == CANCEL:
            if f.error is not None:
                log.error("cancel of stream %x failed: %s", u.key, f.error)
        elif u.dropped:
            pass
        elif f.error is not None:
            self.fail(u, f.error)
        else:
            self.push_final(u, f.result)
        self.start_waiting()  # a decoder came free

    # --- partials -------------------------------------------------------------------------------
    def emit_partials(self) -> None:
        if not self.due:
            return
        now = time.monotonic()
        utterances = self.utterances
        batch: list[rec.BatchedPartial] = []
        for key, u in list(self.due.items()):
            if utterances.get(key) is not u:
                del self.due[key]  # finished or dropped since it was fed
                continue
            if now - u.last_partial_at < u.interim_ms / 1000.0:
                continue
            del self.due[key]
            if self.jobs is not None:  # the decoder may be busy: ask on the stream's thread
                self.jobs.submit(key, Job(PARTIAL, u, seq=u.audio_seq))
                continue
            u.last_partial_at = now
            try:
                text = self.backend.partial(u.bkey)
            except Exception as exc:
                log.warning("partial of stream %x failed: %s", u.key, exc)
                continue
            if text == u.last_partial and u.interim_ms > 0:
                continue
            u.last_partial = text
            batch.append(rec.BatchedPartial(key, u.number, text, u.audio_seq))
        if batch:
            self.push_partials(batch)
            self.counters["partials"] += len(batch)

    def push_partials(self, batch: list[rec.BatchedPartial]) -> None:
        """One PARTIALS record (one PARTIAL for a single partial), split to fit the ring."""
        if len(batch) == 1:
            p = batch[0]
            payload = self._enc.encode(rec.PartialResult(p.text, p.audio_seq))
            self.push_result(rec.PARTIAL, p.key, p.utterance, payload)
            return
        payload = self._enc.encode(batch)
        if len(payload) > self.results.max_payload:
            half = len(batch) // 2
            self.push_partials(batch[:half])
            self.push_partials(batch[half:])
            return
        self.push_result(rec.PARTIALS, 0, 0, payload)

    # --- result ring ----------------------------------------------------------------------------
    def push_result(self, kind: int, key: int, seq: int, payload: bytes) -> None:
        if self.faults.enabled:
            payload = self.faults.payload(payload)
        while not self.results.try_push(kind, key, seq, payload):
            # Full: the ingress worker is behind. Wake it, then wait for space (never drop).
            self.result_data.signal()
            if self.results.wait_for_space():
                continue
            self.beat()
            self.result_space.wait(self.heartbeat_interval)
            self.result_space.drain()
            if not parent_alive(self.spec):
                raise SystemExit(0)
        self._results_pushed = True

    def flush_signal(self) -> None:
        if self._results_pushed:
            self._results_pushed = False
            if self.results.consumer_sleeping():
                self.result_data.signal()


def main() -> int:
    spec = load_spec()
    setup_process(spec)
    try:
        worker = InferWorker(spec)
    except Exception:
        log.exception("infer worker failed to start")
        return 70
    return worker.run()


if __name__ == "__main__":
    raise SystemExit(main())
