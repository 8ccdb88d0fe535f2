#!/usr/bin/env bash
# Regenerate samples/: short synthetic English utterances for `make demo` and tests.
#
#   scripts/make_samples.sh           write samples/*.wav and samples/*.txt
#   scripts/make_samples.sh --check   also decode each file with pocketsphinx and print the result
#
# Needs espeak-ng and sox (Debian: apt-get install -y espeak-ng sox); --check needs the
# project's virtualenv (.venv, or $PYTHON). Output is deterministic for a given espeak-ng and
# sox version: sox runs with -R (fixed seeds) and -D (no dither), and no step adds timestamps.
# Generated with espeak-ng 1.51 and SoX 14.4.2 (Debian bookworm).
#
# Voice en-us+f2 at 150 words per minute: of the voices and speeds tried (en-us, en, en-gb-x-rp,
# en-us+m3, en-us+f1..f5 at 120-165 wpm, about 20 sentences), it is the one pocketsphinx 5.1.1's
# default en-us model transcribes best. The sentences are ones it transcribes exactly with it;
# the 8 kHz one is one of the few that survive band-limiting to 4 kHz (the model is trained on
# 16 kHz speech) and upsampling back with soxr.
set -euo pipefail

cd "$(dirname "$0")/.."
OUT=samples
VOICE=en-us+f2
SPEED=150

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

speak new_job "she has a new job in new york"
finish new_job 16000 "$TMP/new_job.wav"
echo "she has a new job in new york" >"$OUT/new_job.txt"

# 8 kHz, telephone rate: the daemon resamples it to what the recognizer needs.
speak rain "it is going to rain tomorrow"
finish rain_8k 8000 "$TMP/rain.wav"
echo "it is going to rain tomorrow" >"$OUT/rain_8k.txt"

# Two utterances separated by 1 s of silence: VAD should end the first and start the second.
speak back "we will be back in five minutes"
speak weather "the weather is nice today"
sox -R -D -n -r 22050 -c 1 -b 16 -e signed-integer "$TMP/gap.wav" trim 0 1.0
finish two_utterances 16000 "$TMP/back.wav" "$TMP/gap.wav" "$TMP/weather.wav"
printf '%s\n' "we will be back in five minutes" "the weather is nice today" \
    >"$OUT/two_utterances.txt"

ls -l "$OUT"/*.wav

if [[ "${1:-}" == "--check" ]]; then
    PY=${PYTHON:-.venv/bin/python}
    "$PY" - "$OUT" <<'EOF'
# Decode each sample with a fresh pocketsphinx decoder (default en-us model, 16 kHz). Files at
# other rates are resampled with soxr first, as the daemon does. Files with several utterances
# are decoded whole and per utterance (split at runs of >= 0.5 s of digital silence).
import sys
import wave
from pathlib import Path

import numpy as np
import soxr
from pocketsphinx import Decoder


def decode(pcm: np.ndarray) -> str:
    d = Decoder(samprate=16000, loglevel="FATAL")
    d.start_utt()
    d.process_raw(pcm.astype(np.int16).tobytes(), full_utt=True)
    d.end_utt()
    return d.hyp().hypstr if d.hyp() else ""


def utterances(pcm: np.ndarray, rate: int) -> list[np.ndarray]:
    voiced = np.flatnonzero(pcm != 0)
    gaps = np.flatnonzero(np.diff(voiced) > rate // 2)
    bounds = np.split(voiced, gaps + 1)
    pad = rate // 4
    return [pcm[max(0, b[0] - pad) : b[-1] + pad] for b in bounds if len(b)]


for wav in sorted(Path(sys.argv[1]).glob("*.wav")):
    with wave.open(str(wav)) as w:
        rate = w.getframerate()
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16)
    if rate != 16000:
        pcm = soxr.resample(pcm, rate, 16000)
    expected = wav.with_suffix(".txt").read_text().split("\n")[:-1]
    got = [decode(pcm)]
    if len(expected) > 1:
        got += [decode(u) for u in utterances(pcm, 16000)]
    print(f"{wav.name} ({rate} Hz, {len(pcm) / 16000:.2f} s)")
    print(f"  text:        {' | '.join(expected)}")
    print(f"  pocketsphinx: {got[0]}")
    if len(got) > 1:
        print(f"  per utterance: {' | '.join(got[1:])}")
EOF
fi
