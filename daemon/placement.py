"""Where lanes run: the placement plan from the config and the platform probe.

Profiles (``placement.profile``):

* ``bare-metal``: lanes are spread over the NUMA nodes (lane ``i`` on node ``i mod nodes``, in
  the order of the nodes' usable CPUs), each lane gets one CPU and both of its workers are pinned
  to it (a lane's ingress and infer worker on one core: a cross-core wake-up costs more than the
  work it hands over, docs/performance.md). CPUs are taken one physical core at a time, so SMT
  siblings go to different lanes only when there are more lanes than cores (a warning says so).
  A worker pins itself before it attaches its rings, and the rings' data pages are first written
  by the lane's producer, so with Linux's first-touch policy they land on the lane's node.
* ``cloud``: no pinning, lanes by CPU count: vCPUs float on the host, and pinning a vCPU that
  the hypervisor deschedules stalls the lane (steal time), so the kernel's scheduler is left to
  place the workers.
* ``auto``: ``cloud`` on a virtual machine (a cloud vendor, or any hypervisor), else
  ``bare-metal``; the reason is logged and shown by ``asrd doctor``.

``placement.pinning`` and ``placement.numa`` (``auto | on | off``) override the profile.
``on`` where it cannot work (no Linux affinity, one NUMA node, more lanes than usable CPUs)
is a :class:`~daemon.errors.ConfigError` at start naming the field, what was found and what to
do; ``auto`` falls back and says why.

``io.backend`` (``auto | epoll | io_uring``): ``auto`` is ``epoll`` (asyncio), the measured
faster path (docs/platform.md); ``io_uring`` is refused at start unless the probe says usable.

``io.client_loop`` (``auto | asyncio | uvloop``): the ingress workers' event loop; ``auto`` is
uvloop where it can be imported, else asyncio's; ``uvloop`` is refused at start where it cannot.

Lanes: ``lanes = "auto"`` is one lane per usable physical core with the bare-metal profile, one
per usable CPU otherwise (usable: ``os.sched_getaffinity``, so a cgroup cpuset or ``taskset``
narrower than the machine is honoured; isolated CPUs are not used unless they are all there is).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Collection, Iterator
from typing import Literal

import msgspec

from daemon.config import Config
from daemon.errors import ConfigError
from daemon.platform import NumaNode, Platform, format_cpulist, shm_bytes_needed


class LanePlan(msgspec.Struct, kw_only=True):
    lane: int
    cpus: list[int]  # both workers' affinity; [] = not pinned
    node: int | None  # NUMA node of those CPUs, when pinned on a multi-node machine


class Plan(msgspec.Struct, kw_only=True):
    profile: Literal["bare-metal", "cloud"]
    profile_reason: str
    pinning: bool
    pinning_reason: str
    numa: bool
    numa_reason: str
    io_backend: Literal["epoll", "io_uring"]
    io_reason: str
    lanes: list[LanePlan]
    client_loop: Literal["asyncio", "uvloop"]
    client_loop_reason: str
    warnings: list[str] = msgspec.field(default_factory=list)

    def summary(self) -> str:
        pin = "pinned" if self.pinning else "not pinned"
        numa = ", NUMA-aware" if self.numa else ""
        return (
            f"{self.profile} profile ({self.profile_reason}); {len(self.lanes)} lanes {pin}"
            f"{numa}; io {self.io_backend}; client loop {self.client_loop}"
        )


def usable_cpus(platform: Platform) -> list[int]:
    """CPUs this process may run on that are online, leaving isolated ones out unless they are
    all there is (``isolcpus`` reserves them for work placed there explicitly)."""
    cpus = platform.cpus
    allowed = sorted(set(cpus.allowed) & set(cpus.online)) or sorted(cpus.allowed)
    normal = [c for c in allowed if c not in set(cpus.isolated)]
    return normal or allowed


def _choose_profile(config: Config, platform: Platform) -> tuple[str, str]:
    requested = config.placement.profile
    if requested != "auto":
        return requested, f"placement.profile = {requested!r}"
    virt = platform.virtualization
    if virt.cloud:
        return "cloud", f"cloud VM detected ({virt.vendor}): pinning off"
    if virt.hypervisor_flag or virt.vendor not in ("none", "unknown"):
        return "cloud", f"virtual machine detected ({virt.vendor}): pinning off"
    return "bare-metal", "no hypervisor detected"


def _cores(cpus: list[int], siblings: list[list[int]]) -> set[int]:
    """The physical cores (as the first CPU of each sibling group) that ``cpus`` run on."""
    core_of = {c: min(group) for group in siblings for c in group}
    return {core_of.get(c, c) for c in cpus}


def _cores_first(cpus: list[int], siblings: list[list[int]]) -> list[int]:
    """``cpus`` ordered one hardware thread per core first, then the second threads, ..."""
    group_of: dict[int, int] = {}
    for i, group in enumerate(siblings):
        for c in group:
            group_of[c] = i
    rank: dict[int, int] = {}
    seen: dict[int, int] = {}
    for c in cpus:
        g = group_of.get(c, -1 - c)  # a CPU with no topology info is its own core
        rank[c] = seen.get(g, 0)
        seen[g] = rank[c] + 1
    return sorted(cpus, key=lambda c: (rank[c], c))


def uvloop_available() -> bool:
    return importlib.util.find_spec("uvloop") is not None


def choose_client_loop(
    config: Config, problems: list[str]
) -> tuple[Literal["asyncio", "uvloop"], str]:
    """The ingress workers' event loop and why; an impossible choice goes to ``problems``."""
    want = config.io.client_loop
    if want == "asyncio":
        return "asyncio", "io.client_loop = 'asyncio'"
    if want == "uvloop":
        if not uvloop_available():
            problems.append(
                "io.client_loop = 'uvloop': uvloop is not installed in this Python "
                "(pip install uvloop); use 'auto' or 'asyncio'"
            )
        return "uvloop", "io.client_loop = 'uvloop'"
    if uvloop_available():
        return "uvloop", "auto: uvloop measured cheaper per chunk (docs/performance.md)"
    return "asyncio", "auto: uvloop is not installed"


def plan(config: Config, platform: Platform) -> Plan:
    """The placement for ``config`` on ``platform``; ConfigError when an ``on`` cannot work."""
    problems: list[str] = []
    warnings: list[str] = []
    cpus = usable_cpus(platform)
    profile, profile_reason = _choose_profile(config, platform)
    linux = platform.supported
    if config.lanes != "auto":
        lanes = config.lanes
    elif profile == "bare-metal" and config.placement.pinning != "off":
        # One lane per physical core: a lane's two workers share its core, and a lane on
        # each SMT thread of one core would compete for its execution units.
        lanes = max(1, len(_cores(cpus, platform.cpus.smt_siblings)))
    else:
        lanes = max(1, len(cpus))

    # Pinning.
    want_pin = config.placement.pinning
    if want_pin == "on":
        if not linux:
            problems.append(
                f"placement.pinning = 'on': not possible here ({platform.unsupported_reason}); "
                "use 'auto' or 'off'"
            )
        pinning, pinning_reason = True, "placement.pinning = 'on'"
    elif want_pin == "off":
        pinning, pinning_reason = False, "placement.pinning = 'off'"
    elif not linux:
        pinning, pinning_reason = False, "not Linux: no CPU affinity"
    elif profile == "cloud":
        pinning, pinning_reason = False, "cloud profile: vCPUs float on the host"
    else:
        pinning, pinning_reason = True, "bare-metal profile"
    if pinning and lanes > len(cpus):
        message = (
            f"{lanes} lanes on {len(cpus)} usable CPUs ({format_cpulist(cpus)}): lanes would "
            "share CPUs"
        )
        if want_pin == "on":
            warnings.append(message + "; each lane still gets one CPU, shared round-robin")
        else:
            pinning, pinning_reason = False, message + ": pinning off"

    # NUMA.
    nodes = [n for n in platform.numa_nodes if set(n.cpus) & set(cpus)]
    want_numa = config.placement.numa
    if want_numa == "on":
        if len(nodes) < 2:
            problems.append(
                f"placement.numa = 'on': this machine has {len(nodes)} NUMA node(s) with usable "
                "CPUs, NUMA placement needs at least 2; use 'auto' or 'off'"
            )
        if not pinning:
            problems.append(
                f"placement.numa = 'on' needs pinning, which is off ({pinning_reason}); set "
                "placement.pinning = 'on' or use placement.numa = 'auto'"
            )
        numa, numa_reason = True, "placement.numa = 'on'"
    elif want_numa == "off":
        numa, numa_reason = False, "placement.numa = 'off'"
    elif not pinning:
        numa, numa_reason = False, "no pinning"
    elif len(nodes) < 2:
        numa, numa_reason = False, f"{len(nodes)} NUMA node with usable CPUs"
    else:
        numa, numa_reason = True, f"{len(nodes)} NUMA nodes: lanes spread over them"

    # I/O backend.
    want_io = config.io.backend
    io_state = platform.io_uring.state
    io_backend: Literal["epoll", "io_uring"]
    if want_io == "io_uring":
        if io_state != "usable":
            problems.append(
                f"io.backend = 'io_uring': io_uring is {io_state} here "
                f"({platform.io_uring.detail}); use 'auto' or 'epoll'"
            )
        io_backend, io_reason = "io_uring", "io.backend = 'io_uring'"
    elif want_io == "epoll":
        io_backend, io_reason = "epoll", "io.backend = 'epoll'"
    else:
        io_backend, io_reason = "epoll", "auto: epoll measured faster (docs/platform.md)"
        if io_state != "usable":
            io_reason += f"; io_uring is {io_state}"

    client_loop, client_loop_reason = choose_client_loop(config, problems)

    if problems:
        raise ConfigError("\n".join(problems))

    lane_plans = _assign(lanes, cpus, platform, pinning, numa, nodes, warnings)
    if platform.shm.free_bytes is not None:
        need = shm_bytes_needed(config, lanes)
        if need > platform.shm.free_bytes:
            warnings.append(
                f"{platform.shm.path} has {platform.shm.free_bytes >> 20} MiB free; this config "
                f"needs {need >> 20} MiB of shared memory ({lanes} lanes): lower lanes or "
                "ring sizes, or enlarge /dev/shm"
            )
    if io_state != "usable" and io_state != "unsupported platform":
        warnings.append(f"io_uring is {io_state}: {platform.io_uring.detail}")
    if profile == "cloud" and config.placement.profile == "auto":
        warnings.append(f"{profile_reason}")
    return Plan(
        profile=profile,  # type: ignore[arg-type]
        profile_reason=profile_reason,
        pinning=pinning,
        pinning_reason=pinning_reason,
        numa=numa,
        numa_reason=numa_reason,
        io_backend=io_backend,
        io_reason=io_reason,
        lanes=lane_plans,
        client_loop=client_loop,
        client_loop_reason=client_loop_reason,
        warnings=warnings,
    )


def _assign(
    lanes: int,
    cpus: list[int],
    platform: Platform,
    pinning: bool,
    numa: bool,
    nodes: list[NumaNode],
    warnings: list[str],
) -> list[LanePlan]:
    if not pinning or not cpus:
        return [LanePlan(lane=i, cpus=[], node=None) for i in range(lanes)]
    siblings = platform.cpus.smt_siblings
    usable = set(cpus)
    if numa:
        per_node: list[tuple[int | None, list[int]]] = [
            (n.id, _cores_first([c for c in n.cpus if c in usable], siblings)) for n in nodes
        ]
    else:
        per_node = [(None, _cores_first(cpus, siblings))]
    node_of = {c: nid for nid, node_cpus in per_node for c in node_cpus}
    taken: dict[int, int] = {}  # next index per node
    plans = []
    for i in range(lanes):
        _, node_cpus = per_node[i % len(per_node)]
        k = taken.get(i % len(per_node), 0)
        taken[i % len(per_node)] = k + 1
        cpu = node_cpus[k % len(node_cpus)]
        plans.append(LanePlan(lane=i, cpus=[cpu], node=node_of.get(cpu) if numa else None))
    # Two lanes on the two threads of one core share its execution units.
    core_of = {c: i for i, group in enumerate(siblings) for c in group}
    cores: dict[int, list[int]] = {}
    for p in plans:
        core = core_of.get(p.cpus[0])
        if core is not None:
            cores.setdefault(core, []).append(p.lane)
    split = [f"lanes {', '.join(map(str, ls))}" for ls in cores.values() if len(ls) > 1]
    if split:
        warnings.append(
            "SMT siblings split across lanes (more lanes than cores): "
            + "; ".join(split)
            + " share a core"
        )
    return plans


@contextlib.contextmanager
def running_on(cpus: Collection[int] | None) -> Iterator[None]:
    """Run the block (and every process started in it) on ``cpus``, then restore the affinity
    this process had; None or empty: leave it alone."""
    if not cpus:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)
