"""Control-socket messages between admin tools (``asrctl status``) and the supervisor.

Same framing as the client protocol (4-byte big-endian length + msgpack), on a separate Unix
socket in the runtime directory.
"""

from __future__ import annotations

import msgspec


class _Ctl(msgspec.Struct, tag_field="type", kw_only=True, omit_defaults=True):
    pass


class StatusRequest(_Ctl, tag="status_request"):
    pass


class WorkerStatus(msgspec.Struct, kw_only=True):
    role: str  # "ingress" | "infer"
    lane: int
    pid: int
    state: str  # "starting" | "running" | "restarting" | "stopped"
    restarts: int
    heartbeat_age_s: float | None
    cpus: list[int]
    rss_bytes: int | None = None
    counters: dict[str, int] = msgspec.field(default_factory=dict)


class LaneStatus(msgspec.Struct, kw_only=True):
    lane: int
    workers: list[WorkerStatus]
    audio_ring: dict[str, int] = msgspec.field(default_factory=dict)
    result_ring: dict[str, int] = msgspec.field(default_factory=dict)
    failed: str = ""  # why the lane was stopped (a crash loop); "" while it serves


class EndpointStatus(msgspec.Struct, kw_only=True):
    url: str
    # Its circuit breaker in each lane's infer worker: "closed" (serving), "half_open"
    # (probing), "open" (down: utterances go elsewhere), "unknown" (worker not reporting).
    lanes: list[str]
    state: str  # "up" (closed in every lane), "down" (open in every lane), or "degraded"


class Status(_Ctl, tag="status"):
    version: str
    instance: str
    pid: int
    uptime_s: float
    state: str  # "starting" | "serving" | "draining"
    backend: str
    socket: str
    lanes: list[LaneStatus]
    totals: dict[str, int] = msgspec.field(default_factory=dict)
    endpoints: list[EndpointStatus] = msgspec.field(default_factory=list)  # backend "triton"
    metrics: str = ""  # the Prometheus endpoint's URL (metrics.listen), "" when off


class ControlError(_Ctl, tag="control_error"):
    message: str


ControlRequest = StatusRequest
ControlReply = Status | ControlError
