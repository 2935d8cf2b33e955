"""The pods on this host, as their directories tell: listing, lookup by UUID prefix, and gc.

A pod belongs to the `kvmpod run` process that made it (state.json's kvmpod_pid and kvmpod_start). While that
process lives, nothing here touches the pod. Once it is gone — a normal exit with --keep, or a
SIGKILL that gave it no chance to clean up — the pod is `exited`/`failed`, or `abandoned` if it
died mid-run, and `kvmpod gc` may remove it, killing a stray QEMU first.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvmpod import paths
from kvmpod.boot import snapshot
from kvmpod.errors import KvmpodError, UsageError
from kvmpod.net import bridge
from kvmpod.net.attach import release
from kvmpod.pod.poddir import PodDir, process_start_time
from kvmpod.vm import cgroup
from kvmpod.vm.cgroup import Cgroup
from kvmpod.vm.cid import remove_stale
from kvmpod.vm.virtiofs import remove_pidfiles

FINISHED = ("exited", "failed")


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@dataclass(frozen=True)
class PodInfo:
    uuid: str
    path: Path
    state: dict[str, Any]

    @property
    def owner_alive(self) -> bool:
        """Is the kvmpod process that runs this pod still there? Its start time tells it from a process
        that reused the pid, and holds across its execs into kvmpod-relay and back, when its command
        line changes (and is briefly empty). State files without one: it must still be a kvmpod."""
        pid, start = self.state.get("kvmpod_pid"), self.state.get("kvmpod_start")
        if not isinstance(pid, int):
            return False
        if isinstance(start, int):
            return process_start_time(pid) == start
        return "kvmpod" in _cmdline(pid)

    @property
    def qemu_pid(self) -> int | None:
        """The pod's QEMU, if it still runs (checked by the VM name on its command line)."""
        pid = self.state.get("qemu_pid")
        return pid if isinstance(pid, int) and f"kvmpod-{self.uuid}" in _cmdline(pid) else None

    @property
    def virtiofsd_pids(self) -> list[int]:
        """The pod's virtiofsd daemons still running (checked by their socket in this pod's directory)."""
        pids = self.state.get("virtiofsd_pids")
        if not isinstance(pids, list):
            return []
        return [pid for pid in pids if isinstance(pid, int) and "virtiofsd" in _cmdline(pid)
                and str(self.path) in _cmdline(pid)]

    @property
    def app_names(self) -> list[str]:
        """The pod's apps, in order, from its pod-manifest ([] if it has none yet)."""
        try:
            manifest = json.loads((self.path / "pod-manifest").read_text())
            return [a["name"] for a in manifest["apps"] if isinstance(a.get("name"), str)]
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return []

    def reloaded(self) -> "PodInfo":
        """The same pod with its state.json read again."""
        return PodInfo(self.uuid, self.path, _read_state(self.path))

    @property
    def status(self) -> str:
        recorded = self.state.get("state", "unknown")
        if recorded in FINISHED or self.owner_alive:
            return recorded
        return "abandoned"

    def summary(self) -> dict[str, Any]:
        summary = {"uuid": self.uuid, "state": self.status, "created": self.state.get("created"),
                   "apps": self.state.get("apps", []), "qemu_pid": self.qemu_pid, "path": str(self.path)}
        if self.state.get("networks"):
            summary["networks"] = self.state["networks"]
        summary["backend"] = self.state.get("backend", "qemu")
        if self.state.get("domain"):   # a libvirt pod's domain and connection (docs/libvirt.md)
            summary["domain"], summary["libvirt_uri"] = self.state["domain"], self.state.get("libvirt_uri")
        if isinstance(self.state.get("cgroup"), dict):   # QEMU's cgroup and its limits (docs/layout.md)
            summary["cgroup"] = self.state["cgroup"]
        if self.state.get("error"):
            summary["error"] = self.state["error"]
        return summary


def _read_state(path: Path) -> dict[str, Any]:
    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, ValueError):
        return {}  # being created or half-removed: listed as unknown/abandoned, gc-able
    return state if isinstance(state, dict) else {}


def list_pods() -> list[PodInfo]:
    root = paths.pods_dir()
    pods = [PodInfo(path.name, path, _read_state(path)) for path in (sorted(root.iterdir()) if root.is_dir() else [])]
    return sorted(pods, key=lambda p: p.state.get("created", 0))


def find_pod(prefix: str) -> PodInfo:
    matches = [p for p in list_pods() if p.uuid.startswith(prefix)]
    if not matches:
        raise UsageError(f"no pod with UUID {prefix!r}")
    if len(matches) > 1:
        raise UsageError(f"UUID prefix {prefix!r} is ambiguous: {', '.join(p.uuid for p in matches)}")
    return matches[0]


def gc(grace_period: float = 0.0) -> list[str]:
    """Remove pods whose kvmpod process is gone and that ended at least `grace_period` seconds ago."""
    removed = []
    now = time.time()
    for pod in list_pods():
        if pod.owner_alive:
            continue
        try:
            changed = (pod.path / "state.json").stat().st_mtime
        except OSError:
            changed = 0.0
        if now - changed < grace_period:
            continue
        try:
            remove(pod)
        except UsageError:
            continue  # its kvmpod (a new one with a recycled pid?) runs after all
        except KvmpodError as e:  # a network that cannot be released: say so, keep the pod, go on
            print(f"kvmpod: error: pod {pod.uuid}: {e}", file=sys.stderr, flush=True)
            continue
        removed.append(pod.uuid)
    remove_stale()   # vsock CID lock files no live pod holds (docs/vsock.md)
    snapshot.sweep_makers()   # what a boot snapshot maker killed mid-way left: its stage, its work directory
    sweep_cgroups()
    if os.geteuid() == 0:   # port forwards a killed kvmpod made but had not recorded yet
        try:
            bridge.sweep()
        except KvmpodError as e:
            print(f"kvmpod: error: {e}", file=sys.stderr, flush=True)
    return removed


def sweep_cgroups() -> list[str]:
    """The empty cgroups of pods whose directory is gone (a kvmpod killed before it could remove them),
    and of boot snapshot makers that are over (kvmpod/vm/cgroup.py); those of other runtime dirs once
    they are an hour old."""
    pods = paths.pods_dir()

    def in_use(leaf: str) -> bool:
        maker = cgroup.snapshot_maker_alive(leaf)
        return maker if maker is not None else (pods / leaf).exists()

    return cgroup.sweep(in_use) + cgroup.sweep_other_parents()


def kill_stray_qemu(pod: PodInfo) -> None:
    """SIGKILL a QEMU of this pod that outlived its kvmpod (found by its VM name, never by pid alone)."""
    for pid in [p for p in (pod.qemu_pid,) if p is not None] + pod.virtiofsd_pids:  # and its virtiofsd
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def destroy_stray_domain(pod: PodInfo) -> None:
    """A libvirt pod's domain that outlived its kvmpod: destroyed through libvirt, found by kvmpod's
    metadata in it (this pod's UUID and directory), never by its name alone. A daemon that cannot be
    reached keeps the pod for a later gc (KvmpodError)."""
    uri = pod.state.get("libvirt_uri")
    if pod.state.get("backend") != "libvirt" or not isinstance(uri, str):
        return
    from kvmpod.vm.libvirt_vm import destroy_pod_domains  # lazy: libvirt-python is optional

    for name in destroy_pod_domains(uri, pod.uuid, pod.path):
        print(f"kvmpod: pod {pod.uuid}: destroyed its libvirt domain {name}", file=sys.stderr, flush=True)


def remove(pod: PodInfo) -> None:
    """Remove a pod whose kvmpod process is gone: its stray QEMU, if any, then its directory."""
    if pod.owner_alive:
        raise UsageError(f"pod {pod.uuid} is {pod.status}: stop it first (kvmpod stop {pod.uuid})")
    kill_stray_qemu(pod)
    destroy_stray_domain(pod)
    release(pod.path)   # its leases, port forwards, CNI namespaces (its taps died with QEMU); raises if stuck
    if (pod_cgroup := Cgroup.from_record(pod.state.get("cgroup"))) is not None:
        pod_cgroup.remove()   # empty once the strays killed above have exited; else the next gc's sweep
    remove_pidfiles(pod.path)   # of virtiofsd daemons that died with the pod's kvmpod
    PodDir(pod.uuid, pod.path).remove()
