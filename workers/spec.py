"""What the supervisor hands a worker process: passed as JSON in ``$ASRD_WORKER_SPEC``.

The worker is a fresh interpreter (fork + exec), so it inherits nothing but the file
descriptors named here and this description; the config travels resolved, so a worker never
reads a file the operator may be editing.
"""

from __future__ import annotations

import os

import msgspec

from daemon.config import Config

ENV_VAR = "ASRD_WORKER_SPEC"


class LaneFds(msgspec.Struct, kw_only=True):
    """Wake-up descriptors of one lane: (read fd, write fd) pairs, as ipc.wakeup.Wakeup.fds()."""

    audio_data: tuple[int, int]  # ingress -> infer: records in the audio ring
    audio_space: tuple[int, int]  # infer -> ingress: space in the audio ring
    result_data: tuple[int, int]  # infer -> ingress: records in the result ring
    result_space: tuple[int, int]  # ingress -> infer: space in the result ring

    def all(self) -> list[int]:
        return sorted(
            {
                fd
                for pair in (self.audio_data, self.audio_space, self.result_data, self.result_space)
                for fd in pair
            }
        )


class WorkerSpec(msgspec.Struct, kw_only=True):
    role: str  # "ingress" | "infer"
    lane: int
    lanes: int
    generation: int  # how many times this slot has been spawned, from 1
    supervisor_pid: int
    heartbeat: str  # heartbeat segment name
    slot: int
    audio_ring: str
    result_ring: str
    fds: LaneFds
    listen_fd: int = -1  # ingress only
    cpus: list[int] = msgspec.field(default_factory=list)
    config: Config = msgspec.field(default_factory=Config)

    def encode(self) -> str:
        return msgspec.json.encode(self).decode()


def load_spec() -> WorkerSpec:
    raw = os.environ.pop(ENV_VAR, None)
    if raw is None:
        raise SystemExit(f"this is an asrd worker: the supervisor starts it (no ${ENV_VAR})")
    return msgspec.json.decode(raw, type=WorkerSpec)


def slot_index(role: str, lane: int) -> int:
    return lane * 2 + (0 if role == "ingress" else 1)
