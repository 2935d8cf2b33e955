"""The pod directory: everything one pod has on the host while it runs (docs/layout.md).

    <runtime>/pods/<uuid>/
        pod-manifest     the resolved appc PodManifest
        state.json       state, pids, apps and their exit statuses (rewritten atomically)
        console.log      the guest's serial console
        qemu.log         QEMU's stderr
        control.sock     the pod's control socket: enter, stop, logs --follow (docs/control.md)
        logs/<app>.log   --detach: each app's output
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid as uuidlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvmpod import paths
from kvmpod.errors import KvmpodError
from kvmpod.fsutil import write_atomically


def process_start_time(pid: int) -> int | None:
    """When `pid` started (clock ticks since boot, /proc/PID/stat field 22), or None once it has
    ended (gone or a zombie). With the pid it names one process for good: unlike the command line
    it survives exec (the idle relay, docs/relay.md), and a reused pid has another start time."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()
    if not fields or fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


@dataclass
class PodDir:
    uuid: str
    path: Path
    state: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def create(cls, root: Path | None = None, uuid: str | None = None) -> "PodDir":
        """A new pod directory, for a new UUID or the one given (rkt's stage0 chooses it)."""
        pods = (root or paths.runtime_dir()) / "pods"
        pods.mkdir(parents=True, exist_ok=True, mode=0o700)
        pod_uuid = uuid or str(uuidlib.uuid4())
        path = pods / pod_uuid
        try:
            path.mkdir(mode=0o700)
        except FileExistsError as e:
            raise KvmpodError(f"{path}: a pod with UUID {pod_uuid} exists already") from e
        pod = cls(pod_uuid, path, {"uuid": pod_uuid, "state": "preparing", "created": time.time(),
                                   "kvmpod_pid": os.getpid(), "kvmpod_start": process_start_time(os.getpid())})
        pod.save()
        return pod

    def file(self, name: str) -> Path:
        return self.path / name

    def write_json(self, name: str, data: Any) -> None:
        write_atomically(self.file(name), (json.dumps(data, indent=2) + "\n").encode(), mode=0o600)

    def update(self, **changes: Any) -> None:
        self.state.update(changes)
        self.save()

    def save(self) -> None:
        self.write_json("state.json", self.state)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
