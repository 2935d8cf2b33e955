"""Containers as kvmpod-oci knows them: one directory per container ID under the runtime root
(`--root`, default /run/kvmpod-oci), holding `container.json` and the staged file mounts.

A container is one kvmpod pod: `container.json` names the pod's directory and the pid (with its start
time) of the pod's kvmpod process, which is the container's init as far as conmon or the shim can
tell. The status the runtime spec asks for is read off that process and the pod's own state.json, so it
is the guest's truth, not a copy: the pod process gone means `stopped`, whatever any file says.

Every command that changes a container holds its directory's lock (flock on `lock`), so two commands
on one ID never interleave; `create` of an existing ID fails, and a half-made directory is removed.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from kvmpod.errors import KvmpodError, UsageError
from kvmpod.fsutil import write_atomically
from kvmpod.pod.poddir import process_start_time
from kvmpod.pod.registry import PodInfo

# runc's --root; KVMPOD_OCI_ROOT changes the default (for a runtime wrapper: conmon passes no environment on)
DEFAULT_ROOT = Path(os.environ.get("KVMPOD_OCI_ROOT") or "/run/kvmpod-oci")
RECORD = "container.json"
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+\-]{0,1023}$")
OCI_VERSION = "1.0.2"   # the runtime-spec version kvmpod-oci implements (state.json's ociVersion)


class ContainerNotFound(KvmpodError):
    exit_code = 1


class ContainerStateError(KvmpodError):
    """The container is in a state the command cannot act on (start of a running one...)."""
    exit_code = 1


def check_id(container_id: str) -> str:
    if not _ID.match(container_id):
        raise UsageError(f"container ID {container_id!r}: use letters, digits and _.+- (not starting with one of those)")
    return container_id


@dataclass
class Container:
    id: str
    directory: Path
    record: dict[str, Any] = field(default_factory=dict)

    @property
    def bundle(self) -> str:
        return str(self.record.get("bundle", ""))

    @property
    def pid(self) -> int:
        pid = self.record.get("pid")
        return pid if isinstance(pid, int) else 0

    @property
    def alive(self) -> bool:
        """Is the container's init (the pod's kvmpod process) still there? Known by pid and start time."""
        start = self.record.get("pid_start")
        return self.pid > 0 and isinstance(start, int) and process_start_time(self.pid) == start

    @property
    def pod(self) -> PodInfo | None:
        """The pod, while its directory exists."""
        path = self.record.get("pod_dir")
        if not isinstance(path, str) or not Path(path, "state.json").is_file():
            return None
        try:
            state = json.loads(Path(path, "state.json").read_text())
        except (OSError, ValueError):
            state = {}
        return PodInfo(Path(path).name, Path(path), state if isinstance(state, dict) else {})

    @property
    def status(self) -> str:
        """creating | created | running | paused | stopped (runtime-spec runtime.md)."""
        if not self.alive:
            return "creating" if self.record.get("creating") and self.pid == 0 else "stopped"
        pod = self.pod
        state = pod.state.get("state") if pod else None
        if state == "created":
            return "created"
        if state == "running":
            return "paused" if pod and pod.state.get("paused") else "running"
        if state in ("exited", "failed"):
            return "stopped"
        return "creating"

    def state(self) -> dict[str, Any]:
        """The runtime spec's state of the container."""
        status = self.status
        out: dict[str, Any] = {"ociVersion": OCI_VERSION, "id": self.id, "status": status,
                               "pid": self.pid if status not in ("stopped", "creating") else 0,
                               "bundle": self.bundle, "rootfs": self.record.get("rootfs", ""),
                               "created": self.record.get("created_rfc3339", ""),
                               "annotations": self.record.get("annotations", {})}
        if self.record.get("pod_uuid"):
            out["annotations"] = {**out["annotations"], "io.kvmpod.pod": self.record["pod_uuid"]}
        return out

    def save(self) -> None:
        write_atomically(self.directory / RECORD, json.dumps(self.record).encode(), mode=0o600)

    def file(self, name: str) -> Path:
        return self.directory / name


class Records:
    """The containers under one runtime root."""

    def __init__(self, root: Path | None = None):
        self.root = root or DEFAULT_ROOT

    def directory(self, container_id: str) -> Path:
        return self.root / check_id(container_id)

    def new(self, container_id: str, record: dict[str, Any]) -> Container:
        """The directory of a new container; ContainerStateError if the ID is taken."""
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        directory = self.directory(container_id)
        try:
            directory.mkdir(mode=0o700)
        except FileExistsError as e:
            raise ContainerStateError(f"container {container_id} exists already") from e
        container = Container(container_id, directory, {**record, "creating": True})
        container.save()
        return container

    def get(self, container_id: str) -> Container:
        directory = self.directory(container_id)
        try:
            record = json.loads((directory / RECORD).read_text())
        except FileNotFoundError as cause:
            raise ContainerNotFound(f"container {container_id} does not exist") from cause
        except (OSError, ValueError) as e:
            raise KvmpodError(f"{directory / RECORD}: unreadable: {e}") from e
        return Container(container_id, directory, record if isinstance(record, dict) else {})

    def all(self) -> list[Container]:
        if not self.root.is_dir():
            return []
        out = []
        for entry in sorted(self.root.iterdir()):
            with contextlib.suppress(KvmpodError):
                out.append(self.get(entry.name))
        return out

    @contextlib.contextmanager
    def locked(self, container_id: str) -> Iterator[None]:
        """This container's lock for the length of a command (the directory must exist)."""
        directory = self.directory(container_id)
        try:
            fd = os.open(directory / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except FileNotFoundError as e:
            raise ContainerNotFound(f"container {container_id} does not exist") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def remove(self, container: Container) -> None:
        shutil.rmtree(container.directory, ignore_errors=True)


def rfc3339(when: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(when)) + f".{int(when % 1 * 1e9):09d}Z"
