"""The embedded recognizer's own floor: pocketsphinx alone, k real-time streams, no asrd.

Each stream is a process of its own with one decoder (the daemon's options, through the same
``SphinxDecoder``), fed a WAV in 100 ms chunks on a real-time schedule, with a hypothesis after
every chunk, as the daemon does with ``interim_ms = 0`` and VAD off. A chunk's latency is from
its scheduled arrival to its hypothesis; streams start spread over the chunk period, as the
``fleet`` generator's connections do. No sockets, rings or workers: only the decoders and the
kernel's scheduler. So the most streams this sustains under a p99 target is what the recognizer
allows on this machine, the ceiling for ``bench capacity``'s embedded figure, in the same way
``floor`` is for the null backend.

It also measures the single-stream real-time factor (CPU per chunk / chunk length, with k = 1)
and reports ``cores / rtf`` and 90 % of it.

    python -m bench.recognizer_floor --max 8 --duration 15 --target-p99-ms 300
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
import wave
from typing import Any

from bench.load import summarize, wavs_at

CHUNK_S = 0.1
CHUNK_BYTES = 3200


def _stream(
    index: int, k: int, duration: float, wav: str, ready: Any, start: Any, out: Any
) -> None:
    from daemon.config import EmbeddedConfig
    from workers.backends.embedded import decoder_options
    from workers.backends.sphinx import SphinxDecoder

    with wave.open(wav) as w:
        pcm = w.readframes(w.getnframes())
    chunks = [pcm[i : i + CHUNK_BYTES] for i in range(0, len(pcm) - CHUNK_BYTES + 1, CHUNK_BYTES)]
    decoder = SphinxDecoder(decoder_options(EmbeddedConfig()))
    decoder.reinit_feat()
    decoder.start_utt()
    latencies: list[float] = []
    ready.release()
    start.wait()
    t0 = time.monotonic() + CHUNK_S * index / k
    cpu0 = time.thread_time()
    n = i = 0
    while n * CHUNK_S < duration:
        due = t0 + n * CHUNK_S
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        decoder.process_raw(chunks[i])
        decoder.hyp()
        latencies.append(time.monotonic() - due)
        n += 1
        i += 1
        if i == len(chunks):  # the file again, as a new utterance
            decoder.end_utt()
            decoder.reinit_feat()
            decoder.start_utt()
            i = 0
    out.put((latencies, time.thread_time() - cpu0, n))


def measure(k: int, duration: float) -> dict[str, Any]:
    """k streams for ``duration`` s: chunk latency (ms) and CPU per chunk (ms)."""
    wavs = wavs_at(16000)
    if not wavs:
        raise RuntimeError("no 16 kHz WAV in samples/")
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Semaphore(0)
    start = ctx.Event()
    out = ctx.Queue()
    procs = [
        ctx.Process(target=_stream, args=(i, k, duration, wavs[i % len(wavs)], ready, start, out))
        for i in range(k)
    ]
    for p in procs:
        p.start()
    # every decoder loaded (0.25-0.5 s of CPU each) before the clock starts
    deadline = time.monotonic() + 60 + k
    loaded = 0
    while loaded < k:
        if ready.acquire(timeout=0.5):
            loaded += 1
            continue
        dead = sum(p.exitcode is not None for p in procs)
        if dead or time.monotonic() > deadline:
            for p in procs:
                p.kill()
            why = f"{dead} stream processes exited" if dead else f"not within {60 + k} s"
            raise RuntimeError(f"pocketsphinx alone: {loaded} of {k} decoders loaded, {why}")
    start.set()
    results = []
    deadline = time.monotonic() + duration * 10 + 60
    for _ in procs:
        results.append(out.get(timeout=max(1.0, deadline - time.monotonic())))
    for p in procs:
        p.join(10)
    latencies = [x for r in results for x in r[0]]
    chunks = sum(r[2] for r in results)
    cpu = sum(r[1] for r in results)
    return {
        "streams": k,
        "duration_s": duration,
        "chunks": chunks,
        "latency_ms": summarize(latencies, 1000),
        "cpu_ms_per_chunk": round(cpu * 1000 / chunks, 2) if chunks else None,
    }


def sweep(start: int, limit: int, duration: float, target_ms: float) -> dict[str, Any]:
    """1 stream (the real-time factor), then ``start``, ``start + 1``, ... until a step's p99
    exceeds ``target_ms`` or ``limit`` is reached."""
    steps = []
    one = measure(1, duration)
    cores = len(os.sched_getaffinity(0))
    rtf = one["cpu_ms_per_chunk"] / (CHUNK_S * 1000) if one["cpu_ms_per_chunk"] else None
    good = 0
    for k in [1, *range(max(2, start), limit + 1)]:
        row = one if k == 1 else measure(k, duration)
        row["held"] = row["latency_ms"]["p99"] is not None and row["latency_ms"]["p99"] <= target_ms
        print(
            f"[bench recognizer_floor] {k} streams: p99 {row['latency_ms']['p99']} ms, "
            f"{row['cpu_ms_per_chunk']} ms CPU per chunk: {'held' if row['held'] else 'failed'}",
            file=sys.stderr,
            flush=True,
        )
        steps.append(row)
        if not row["held"]:
            break
        good = k
    ideal = cores / rtf if rtf else None
    return {
        "capacity_streams": good,
        "target_p99_ms": target_ms,
        "cores": cores,
        "single_stream_rtf": round(rtf, 3) if rtf else None,
        "cores_over_rtf": round(ideal, 2) if ideal else None,
        "ninety_percent": round(0.9 * ideal, 2) if ideal else None,
        "steps": steps,
    }


def table(floor: dict[str, Any]) -> str:
    lines = [
        "pocketsphinx alone (one process per stream, no asrd): chunk latency (ms)",
        f"{'streams':>8}{'p50':>10}{'p99':>10}{'max':>10}{'CPU/chunk':>11}  verdict",
    ]
    for r in floor["steps"]:
        s = r["latency_ms"]
        lines.append(
            f"{r['streams']:>8}{s['p50']:>10.1f}{s['p99']:>10.1f}{s['max']:>10.1f}"
            f"{r['cpu_ms_per_chunk']:>11.2f}  {'held' if r['held'] else 'failed'}"
        )
    lines.append(
        f"sustained: {floor['capacity_streams']} streams with p99 <= {floor['target_p99_ms']:g} ms;"
        f" single-stream RTF {floor['single_stream_rtf']}, {floor['cores']} cores: "
        f"cores/RTF {floor['cores_over_rtf']}, 90 % of it {floor['ninety_percent']}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.recognizer_floor",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    p.add_argument("--start", type=int, default=2, help="first step after 1 stream (2)")
    p.add_argument("--max", type=int, default=16, help="highest step (16)")
    p.add_argument("--duration", type=float, default=15.0, help="seconds per step (15)")
    p.add_argument("--target-p99-ms", type=float, default=300.0, help="p99 limit (300 ms)")
    args = p.parse_args(argv)
    floor = sweep(args.start, args.max, args.duration, args.target_p99_ms)
    print(table(floor))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
