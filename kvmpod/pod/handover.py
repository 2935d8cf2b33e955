"""The hand-over record: what a pod's kvmpod process leaves for the next image of itself when it
execs kvmpod-relay (relay.py), and how the next one reads it back (resume.py, run.py). docs/relay.md.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass, field

from kvmpod.agent.session import ExitStatus, Hello
from kvmpod.net.attach import PodNetwork
from kvmpod.pod.options import RunOptions
from kvmpod.pod.poddir import PodDir
from kvmpod.pod.spec import ResolvedApp
from kvmpod.pod.volumes import PodVolumes
from kvmpod.vm.qemu import QemuHandover


@dataclass
class AppProcess:
    """One app's process as the next kvmpod process adopts it."""
    stream: int
    pid: int
    status: ExitStatus | None   # it has ended already
    stdout_fd: int
    stderr_fd: int
    log: bool                     # --detach: both streams go to the app's log file


@dataclass
class RelayState:
    """The runner as the next kvmpod process rebuilds it (kvmpod/pod/resume.py)."""
    pod: PodDir
    apps: list[ResolvedApp]
    options: RunOptions
    timings: dict[str, float]
    hostname: str
    volumes: PodVolumes
    network: PodNetwork | None
    qemu: QemuHandover
    hello: Hello
    next_stream: int
    finished: set[int]
    processes: list[AppProcess]
    agent_fd: int
    control_fd: int
    claim_fds: tuple[int, ...]
    broken: set[int] = field(default_factory=set)   # output fds that failed: their output is dropped
    handovers: int = 1


def memfd(name: str, data: bytes) -> int:
    fd = os.memfd_create(name, 0)
    try:
        os.set_inheritable(fd, True)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


def encode_state(state: RelayState) -> bytes:
    return pickle.dumps(state)


def read_state(fd: int) -> RelayState:
    with os.fdopen(fd, "rb") as f:
        state = pickle.load(f)  # written by this same process before its exec (a memfd nobody else has)
    if not isinstance(state, RelayState):
        raise TypeError("the relay state is not a RelayState")
    return state
