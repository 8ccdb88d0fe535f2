#!/usr/bin/env bash
# Regenerate samples/: short synthetic English utterances for `make demo` and tests.
#
#   scripts/make_samples.sh           write samples/*.wav and samples/*.txt
#   scripts/make_samples.sh --check   also transcribe each file the way the daemon does and
#                                     compare with its .txt (exit status 1 on any difference)
#
# Needs espeak-ng and sox (Debian: apt-get install -y espeak-ng sox); --check needs the
# project's virtualenv (.venv, or $PYTHON). Output is deterministic for a given espeak-ng and
# sox version: sox runs with -R (fixed seeds) and -D (no dither), and no step adds timestamps.
# Generated with espeak-ng 1.51 and SoX 14.4.2 (Debian bookworm).
#
# Voice en-us+f5 at 165 words per minute, default pitch and word gap. The daemon's recognizer
# decodes in streaming mode (live cepstral mean from the configured cmn_init, no second pass,
# 100 ms blocks), which is much harder on synthetic speech than pocketsphinx's batch mode. Of
# the voices tried (en-us, en-us+f1..f5, en-us+m1..m8, en-gb, en-gb-x-rp, en-us-nyc; 120-170
# wpm; pitch 35-65; word gap 0 and 4) on 40 everyday sentences, en-us+f5 at 150-165 wpm had the
# fewest errors. Each sentence here is transcribed exactly at 160, 165 and 170 wpm and with
# +-2 LSB of noise added, so it does not hang on one lucky rendering. 8 kHz is much harder:
# of about 260 8 kHz renderings of 4-7-word sentences none came out exact; the one here, from
# a round of shorter ones, is exact after every soxr chunking tried (that matters: soxr's
# 8->16 kHz int16 stream output is dithered, and differs by a few LSB between streams).
set -euo pipefail

cd "$(dirname "$0")/.."
OUT=samples
VOICE=en-us+f5
SPEED=165

for tool in espeak-ng sox; do
    command -v "$tool" >/dev/null || { echo "make_samples: $tool not found" >&2; exit 1; }
done

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
mkdir -p "$OUT"

# speak NAME TEXT: espeak-ng's 22.05 kHz output. Its own few milliseconds of leading and
# trailing silence are kept: trimming them with sox's silence effect clipped word edges enough
# to cost recognition.
speak() {
    espeak-ng -v "$VOICE" -s "$SPEED" -w "$TMP/$1.wav" "$2"
}

# finish NAME RATE INPUT...: concatenate, convert to mono s16le at RATE, pad 0.5 s of silence
# before and after.
finish() {
    local name=$1 rate=$2
    shift 2
    sox -R -D "$@" -r "$rate" -c 1 -b 16 -e signed-integer "$OUT/$name.wav" pad 0.5 0.5
}

# One utterance per file, 16 kHz.
speak how_are_you "how are you doing today"
finish how_are_you 16000 "$TMP/how_are_you.wav"
echo "how are you doing today" >"$OUT/how_are_you.txt"

speak coffee "i would like a cup of coffee"
finish coffee 16000 "$TMP/coffee.wav"
echo "i would like a cup of coffee" >"$OUT/coffee.txt"

# 8 kHz, telephone rate: the daemon resamples it to what the recognizer needs.
speak way_home "i am on my way home"
finish way_home_8k 8000 "$TMP/way_home.wav"
echo "i am on my way home" >"$OUT/way_home_8k.txt"

# Two utterances separated by 1 s of silence: VAD should end the first and start the second.
speak beach "we are going to the beach"
speak back "we will be back in five minutes"
sox -R -D -n -r 22050 -c 1 -b 16 -e signed-integer "$TMP/gap.wav" trim 0 1.0
finish two_utterances 16000 "$TMP/beach.wav" "$TMP/gap.wav" "$TMP/back.wav"
printf '%s\n' "we are going to the beach" "we will be back in five minutes" \
    >"$OUT/two_utterances.txt"

ls -l "$OUT"/*.wav

if [[ "${1:-}" == "--check" ]]; then
    PY=${PYTHON:-.venv/bin/python}
    "$PY" - "$OUT" <<'EOF'
# What the daemon gives for each file, with its default config: audio at other rates through a
# soxr stream to 16 kHz (as the ingress worker resamples), cut into utterances by the default
# StreamVad, each utterance decoded by transcribe_direct (the embedded backend's reference: a
# fresh decoder with the configured options, fed in 100 ms blocks).
import sys
import wave
from pathlib import Path

import numpy as np
import soxr

from daemon.config import EmbeddedConfig, VadConfig
from workers.backends.embedded import transcribe_direct
from workers.vad import SpeechAudio, StreamVad


def utterances(pcm: bytes) -> list[bytes]:
    vad = StreamVad(VadConfig(), 16000)
    parts: dict[int, bytearray] = {}
    for ev in vad.process(pcm) + vad.flush():
        if isinstance(ev, SpeechAudio):
            parts.setdefault(ev.utterance, bytearray()).extend(ev.pcm)
    return [bytes(parts[k]) for k in sorted(parts)]


failed = 0
for wav in sorted(Path(sys.argv[1]).glob("*.wav")):
    with wave.open(str(wav)) as w:
        rate = w.getframerate()
        pcm = w.readframes(w.getnframes())
    if rate != 16000:
        stream = soxr.ResampleStream(rate, 16000, 1, dtype="int16")
        head = stream.resample_chunk(np.frombuffer(pcm, dtype=np.int16))
        tail = stream.resample_chunk(np.zeros(0, dtype=np.int16), last=True)
        pcm = np.concatenate([head, tail]).tobytes()
    expected = wav.with_suffix(".txt").read_text().splitlines()
    got = [transcribe_direct(u, EmbeddedConfig()) for u in utterances(pcm)]
    print(f"{wav.name} ({rate} Hz, {len(pcm) / 32000:.2f} s, {len(got)} utterances)")
    for i in range(max(len(expected), len(got))):
        want = expected[i] if i < len(expected) else "(none)"
        have = got[i] if i < len(got) else "(none)"
        ok = want == have
        failed += not ok
        print(f"  {'ok  ' if ok else 'DIFF'} expected: {want}")
        print(f"       daemon:   {have}")
sys.exit(1 if failed else 0)
EOF
fi
