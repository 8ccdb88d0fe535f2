"""Compare two benchmark reports by their figures relative to each report's own floor.

Absolute times move with the machine and with whatever else runs on it, so each key figure is
first divided by the floor figure its report measured in the same run (``metrics[name].floor``
names a key of the report's ``floor`` section, in µs; see :mod:`bench.suite`):

- a *lower is better* figure (a latency, a cost) becomes ``value / floor``: e.g. the chunk round
  trip through asrd in units of the reference pipeline's round trip on the same machine;
- a *higher is better* figure (a capacity) becomes ``value x floor``: a machine whose floor is
  twice as slow is expected to carry half as much;
- a figure without a floor (memory, word error rate, counts) is compared as it is.

For each metric found in both files (``--metric`` narrows them down, shell-style patterns), the
*change* is ``new / old`` of those normalised figures for lower-is-better metrics and
``old / new`` for higher-is-better ones, so a change above 1 is always worse. A change above
the threshold (``--threshold``, default 1.25; per metric with ``--threshold-for
PATTERN=X``) is a regression; one below ``1 / threshold`` an improvement. A table of old ratio,
new ratio, change and verdict goes to stdout.

Exit status: 0 when no metric regressed, 1 when any did, 2 when the input is unusable (a file
missing or not a JSON report, the two reports of different benchmarks, or no metric that can be
compared). Reports written before the suite (``bench/results/triton-*.json`` and the like) are
read through the suite's extractors where it has one.

    python -m bench.compare OLD.json NEW.json [--threshold 1.25] [--metric 'rtt_p99*']
"""

from __future__ import annotations

import argparse
import fnmatch
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

UNIT_TO_US = {"ns": 1e-3, "us": 1.0, "µs": 1.0, "ms": 1e3, "s": 1e6}
DEFAULT_THRESHOLD = 1.25


class Unusable(Exception):
    """The input cannot be compared (exit status 2)."""


@dataclass
class Row:
    name: str
    floor: str | None
    better: str
    old: float | None = None  # normalised figures
    new: float | None = None
    change: float | None = None
    threshold: float = DEFAULT_THRESHOLD
    verdict: str = ""


def load(path: Path) -> tuple[str | None, dict[str, Any], dict[str, float]]:
    """(benchmark name, metrics, floor) of one report file."""
    from bench.suite import benchmark_of, key_figures

    try:
        data = msgspec.json.decode(path.read_bytes())
    except OSError as exc:
        raise Unusable(f"{path}: {exc.strerror or exc}") from None
    except msgspec.DecodeError as exc:
        raise Unusable(f"{path}: not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise Unusable(f"{path}: not a benchmark report (a JSON object)")
    metrics, floor = key_figures(data, path)
    if not metrics:
        raise Unusable(f"{path}: no key figures (no 'metrics', and no extractor for it)")
    return benchmark_of(data, path), metrics, floor


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    f = float(v)
    return f if math.isfinite(f) else None


def normalise(m: dict[str, Any], floor: dict[str, float], raw: bool) -> tuple[float | None, str]:
    """(normalised figure, why not) of one metric entry against its report's floor."""
    value = _number(m.get("value"))
    if value is None:
        return None, "no value"
    key = m.get("floor")
    if raw or not key:
        return value, ""
    f = _number(floor.get(key))
    if f is None or f <= 0:
        return None, f"no floor {key}"
    if m.get("better", "lower") == "higher":
        return value * f, ""
    unit = m.get("unit", "us")
    if unit not in UNIT_TO_US:
        return value / f, ""  # not a time: a plain ratio still compares like with like
    return value * UNIT_TO_US[unit] / f, ""


def threshold_for(name: str, default: float, per: list[tuple[str, float]]) -> float:
    for pattern, value in per:
        if fnmatch.fnmatchcase(name, pattern):
            return value
    return default


def compare(
    old: tuple[dict[str, Any], dict[str, float]],
    new: tuple[dict[str, Any], dict[str, float]],
    *,
    threshold: float = DEFAULT_THRESHOLD,
    per_metric: list[tuple[str, float]] | None = None,
    patterns: list[str] | None = None,
    raw: bool = False,
) -> list[Row]:
    (om, of), (nm, nf) = old, new
    names = [n for n in om if n in nm]
    if patterns:
        names = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    rows = []
    for name in names:
        a, b = om[name], nm[name]
        if not isinstance(a, dict) or not isinstance(b, dict):
            continue
        row = Row(
            name,
            None if raw else b.get("floor"),
            b.get("better", "lower"),
            threshold=threshold_for(name, threshold, per_metric or []),
        )
        row.old, why_old = normalise(a, of, raw)
        row.new, why_new = normalise(b, nf, raw)
        if row.old is None or row.new is None:
            row.verdict = f"skipped: {why_old or why_new}"
        elif row.old == row.new:
            row.change, row.verdict = 1.0, "same"
        elif row.old == 0 or row.new == 0:
            # A zero (no errors, no capacity) cannot be divided by: any move away from it is
            # a change in one direction or the other.
            worse = (row.new > row.old) == (row.better == "lower")
            row.change = math.inf if worse else 0.0
            row.verdict = "REGRESSION" if worse else "better"
        else:
            ratio = row.new / row.old
            row.change = ratio if row.better == "lower" else 1 / ratio
            if row.change > row.threshold:
                row.verdict = "REGRESSION"
            elif row.change < 1 / row.threshold:
                row.verdict = "better"
            else:
                row.verdict = "ok"
        rows.append(row)
    return rows


def _g(v: float | None) -> str:
    if v is None:
        return "-"
    if math.isinf(v):
        return "inf"
    return f"{v:.4g}"


def format_table(rows: list[Row]) -> str:
    wn = max([len("metric"), *(len(r.name) for r in rows)])
    wf = max([len("floor"), *(len(r.floor or "(raw)") for r in rows)])
    lines = [
        f"{'metric':<{wn}}  {'floor':<{wf}}  {'old ratio':>10}  {'new ratio':>10}  "
        f"{'change':>8}  {'limit':>6}  verdict"
    ]
    for r in rows:
        lines.append(
            f"{r.name:<{wn}}  {(r.floor or '(raw)'):<{wf}}  {_g(r.old):>10}  {_g(r.new):>10}  "
            f"{_g(r.change):>8}  {r.threshold:>6.3g}  {r.verdict}"
        )
    return "\n".join(lines)


def _per_metric(text: str) -> tuple[str, float]:
    pattern, sep, value = text.rpartition("=")
    try:
        x = float(value)
    except ValueError:
        x = 0.0
    if not sep or not pattern or x <= 1.0:
        raise argparse.ArgumentTypeError(f"need PATTERN=X with X above 1: {text}")
    return pattern, x


def _threshold(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        x = 0.0
    if not x > 1.0:
        raise argparse.ArgumentTypeError(f"a threshold is a ratio above 1: {text}")
    return x


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.compare",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(__doc__ or "").split("\n\n")[0],
        epilog="exit status: 0 no regression, 1 a regression, 2 unusable input",
    )
    p.add_argument("old", type=Path, help="the baseline report")
    p.add_argument("new", type=Path, help="the report to judge")
    p.add_argument(
        "--threshold",
        type=_threshold,
        default=DEFAULT_THRESHOLD,
        help=f"largest tolerated change of a ratio ({DEFAULT_THRESHOLD})",
    )
    p.add_argument(
        "--threshold-for",
        type=_per_metric,
        action="append",
        default=[],
        metavar="PATTERN=X",
        help="threshold for the metrics matching PATTERN (repeatable; first match wins)",
    )
    p.add_argument(
        "--metric",
        action="append",
        metavar="PATTERN",
        help="compare only these metrics (shell-style pattern, repeatable)",
    )
    p.add_argument(
        "--raw", action="store_true", help="compare the figures as they are, ignoring the floors"
    )
    p.add_argument(
        "--allow-different", action="store_true", help="compare reports of different benchmarks"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        return 0 if exc.code == 0 else 2
    try:
        old_name, om, of = load(args.old)
        new_name, nm, nf = load(args.new)
        if old_name != new_name and not args.allow_different:
            raise Unusable(f"different benchmarks: {old_name} and {new_name}")
        rows = compare(
            (om, of),
            (nm, nf),
            threshold=args.threshold,
            per_metric=args.threshold_for,
            patterns=args.metric,
            raw=args.raw,
        )
        if not rows:
            raise Unusable("no metric in common" + (" matching --metric" if args.metric else ""))
        if all(r.change is None for r in rows):
            raise Unusable(
                "no metric could be compared (--raw compares the figures as they are):\n"
                + format_table(rows)
            )
    except Unusable as exc:
        print(f"bench.compare: {exc}", file=sys.stderr)
        return 2
    print(f"{old_name}: {args.old} -> {args.new} (ratios to each report's own floor)")
    print(format_table(rows))
    bad = [r for r in rows if r.verdict == "REGRESSION"]
    skipped = [r for r in rows if r.change is None]
    print(
        f"{len(rows) - len(skipped)} compared, {len(skipped)} skipped, {len(bad)} regressed"
        + (": " + ", ".join(r.name for r in bad) if bad else "")
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
