"""``asrd doctor``: what asrd sees on this machine, what it would do, and what to fix.

Runs the platform probe (daemon/platform.py) and the placement plan (daemon/placement.py) for a
config, without starting anything, and prints them: kernel, CPUs, NUMA nodes, virtualization,
container hints, io_uring, SIMD, ``/dev/shm``; then the plan (profile, lanes and their CPUs and
nodes, pinning, NUMA, io backend, each with the reason), and warnings. ``--json`` prints one
JSON object ``{"platform": ..., "plan": ..., "warnings": [...], "error": null}``.

Exit status: 0 when the config can start here (warnings or not), 78 when it cannot (an ``on``
that cannot work: the error names the field).
"""

from __future__ import annotations

from typing import Any

import msgspec

from daemon.config import Config
from daemon.errors import ConfigError
from daemon.placement import Plan, plan
from daemon.platform import Platform, format_cpulist, probe, shm_bytes_needed


class Report(msgspec.Struct, kw_only=True):
    platform: Platform
    plan: Plan | None
    warnings: list[str]
    error: str | None


def diagnose(config: Config, platform: Platform | None = None) -> Report:
    platform = platform if platform is not None else probe()
    try:
        placement = plan(config, platform)
    except ConfigError as exc:
        return Report(
            platform=platform, plan=None, warnings=list(platform.warnings), error=str(exc)
        )
    warnings = list(dict.fromkeys([*platform.warnings, *placement.warnings]))
    return Report(platform=platform, plan=placement, warnings=warnings, error=None)


def _mib(n: int | None) -> str:
    return "?" if n is None else f"{n / (1 << 20):,.0f} MiB"


def format_report(report: Report, config: Config) -> str:
    p = report.platform
    lines = [f"platform ({p.system}{'' if p.supported else ': ' + p.unsupported_reason})"]
    rows: list[tuple[str, str, str]] = [
        ("kernel", p.kernel.release, p.kernel.source),
        (
            "cpus",
            f"usable {format_cpulist(p.cpus.allowed)} of online {format_cpulist(p.cpus.online)}"
            + (f", offline {format_cpulist(p.cpus.offline)}" if p.cpus.offline else "")
            + (f", isolated {format_cpulist(p.cpus.isolated)}" if p.cpus.isolated else ""),
            "sched_getaffinity, /sys/devices/system/cpu",
        ),
        (
            "smt",
            " ".join(format_cpulist(g) for g in p.cpus.smt_siblings if len(g) > 1) or "none",
            "cpuN/topology/thread_siblings_list",
        ),
    ]
    for node in p.numa_nodes:
        rows.append(
            (
                f"numa node {node.id}",
                f"cpus {format_cpulist(node.cpus) or '-'}, memory {_mib(node.memory_total_bytes)}"
                f" ({_mib(node.memory_free_bytes)} free)",
                node.source,
            )
        )
    v = p.virtualization
    rows += [
        (
            "virtualization",
            f"{v.vendor}{' (cloud)' if v.cloud else ''}, hypervisor flag "
            f"{'set' if v.hypervisor_flag else 'not set'}",
            "; ".join(v.evidence) or v.source,
        ),
        (
            "container",
            "yes" if p.container.detected else "no",
            "; ".join(p.container.hints) or "-",
        ),
        ("io_uring", p.io_uring.state, p.io_uring.detail),
        (
            "simd",
            ", ".join(p.simd.cpu_flags) or "-",
            f"numpy baseline {', '.join(p.simd.numpy_baseline) or '-'}, dispatch "
            f"{', '.join(p.simd.numpy_dispatch) or '-'}",
        ),
        (
            "/dev/shm",
            f"{_mib(p.shm.free_bytes)} free of {_mib(p.shm.total_bytes)}",
            p.shm.source,
        ),
    ]
    lines += _table(rows)
    lines.append("")
    if report.plan is None:
        lines += [
            "plan: this config cannot start here:",
            *("  " + e for e in (report.error or "").splitlines()),
        ]
    else:
        pl = report.plan
        lines.append(f"plan: {pl.summary()}")
        plan_rows = [
            ("profile", pl.profile, pl.profile_reason),
            ("pinning", "on" if pl.pinning else "off", pl.pinning_reason),
            ("numa", "on" if pl.numa else "off", pl.numa_reason),
            ("io backend", pl.io_backend, pl.io_reason),
            ("client loop", pl.client_loop, pl.client_loop_reason),
            (
                "shared memory",
                _mib(shm_bytes_needed(config, len(pl.lanes))),
                f"{len(pl.lanes)} lanes: rings, heartbeat table and Triton regions",
            ),
        ]
        for lane in pl.lanes:
            where = f"CPU {format_cpulist(lane.cpus)}" if lane.cpus else "any CPU (not pinned)"
            on_node = f", node {lane.node}" if lane.node is not None else ""
            plan_rows.append((f"lane {lane.lane}", where + on_node, "ingress + infer worker"))
        lines += _table(plan_rows)
    lines.append("")
    if report.warnings:
        lines.append("warnings:")
        lines += [f"  - {w}" for w in report.warnings]
    else:
        lines.append("warnings: none")
    return "\n".join(lines)


def _table(rows: list[tuple[str, str, str]]) -> list[str]:
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    return [f"  {a:<{w0}}  {b:<{w1}}  {c}".rstrip() for a, b, c in rows]


def to_json(report: Report) -> Any:
    return msgspec.to_builtins(report)
