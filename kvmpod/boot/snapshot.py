"""Boot snapshots: a pod VM booted once to an idle agent, saved, and restored for each later pod.

A cold boot spends most of its time in the guest kernel's start-up (and, under TCG, in translating
it); a VM restored from a snapshot starts where the agent waits for its pod. A snapshot is made per
*shape* (QEMU, kernel, initrd, command line, machine, memory, vCPUs and image disks: everything the
saved state depends on), so it is as much a cache as the rootfs ISO and the initrd are, and is made
the first time a shape is needed. What makes each restored VM its pod's own (hostname, a reseeded
guest random generator, the clock) is the agent's THAW message. docs/snapshot.md has the design, and
what snapshots will not do.

Files, under <cache>/snapshots/ (KVMPOD_SNAPSHOT_DIR; docs/layout.md):
  <key>/memory     guest RAM, written through while the snapshot VM ran; restored VMs map it private
  <key>/state      QEMU's device state (a migration stream without RAM: x-ignore-shared)
  <key>/shape.json what the key was computed from, for people
  <key>.lock       exclusive while the snapshot is made or removed, shared while a pod starts from it
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from kvmpod import config as settings
from kvmpod import faults, paths
from kvmpod.errors import ConfigError, KvmpodError, VMError, printable
from kvmpod.fsutil import pid_alive
from kvmpod.vm.config import Nic, VMConfig

log = logging.getLogger(__name__)

FORMAT = 4                # bump when what a snapshot holds changes meaning
DEFAULT_KEEP = 8          # snapshots kept ([run] snapshots-kept); the least recently used go first
BOOT_CHOICES = ("snapshot", "cold")
MAKER_CPU_WEIGHT = 10     # the snapshot maker's cgroup cpu.weight: a tenth of a pod's 100 (see _make)


def boot_setting() -> str:
    """`[run] boot` in kvmpod.toml: "snapshot" (the default: from a boot snapshot where the pod allows) or "cold"."""
    found = settings.lookup("boot", "run")
    if found is None:
        return "snapshot"
    if found.value not in BOOT_CHOICES:
        raise ConfigError(f"{found.describe('[run] boot')}: {found.value!r} is not one of {', '.join(BOOT_CHOICES)}")
    return found.value


def unfit(config: VMConfig) -> str | None:
    """Why a VM like `config` cannot start from a boot snapshot, or None if it can."""
    if config.agent_transport != "serial":
        # QEMU 7.2 refuses to save vhost-user-vsock; kernel vhost-vsock would need the CID re-read
        return f"the agent transport {config.agent_transport} cannot be saved (the serial one can)"
    if config.filesystems:
        return "virtio-fs volumes (vhost-user) cannot be saved"
    # 9p volumes can: QEMU 7.2 blocks migration only once the guest has attached a 9p export (Tattach, at
    # mount), and the snapshot VM mounts none; a restored VM gets the pod's directories on the same fsdevs
    return None


def device_macs(count: int) -> list[str]:
    """The MACs of a snapshot's virtio-net devices (by index), which every VM restored from it has
    until its agent sets the pod's own (NET_INTERFACE's DEVICE_MAC; docs/snapshot.md). Locally
    administered, and never one of kvmpod/net's pod MACs (02:…)."""
    return [f"06:6b:70:00:00:{i:02x}" for i in range(count)]


def _file_identity(path: Path) -> list:
    st = path.stat()
    return [str(path), st.st_size, st.st_mtime_ns]


@dataclass(frozen=True)
class SnapshotShape:
    """Everything a saved VM depends on; two pods with equal shapes can start from one snapshot."""

    qemu: list            # the binary's path, size and mtime: another QEMU may not read the state
    kernel: list
    initrd: list
    firmware: list | None
    cmdline: str          # without per-pod words (the hostname goes in THAW)
    machine: str
    machine_options: list[str]
    accel: str
    memory_mib: int
    cpus: int
    disks: list[list[str]]   # [path, serial]: image disks are content-addressed, so the path names the content
    # virtio-net devices, by count: their model follows the machine and their bus places the argv's order;
    # their backends (tap, slirp) are not saved, and their MACs are device_macs()'s in every snapshot
    nics: int
    format: int = FORMAT
    # the mount tags of the 9p devices (by volume index: the guest reads a tag once, when it probes the device);
    # their directories, read-only flags and security models are the fsdev's, not saved: each pod gives its own
    shares_9p: list[str] = dataclasses.field(default_factory=list)

    @classmethod
    def of(cls, config: VMConfig, qemu_binary: Path) -> "SnapshotShape":
        return cls(qemu=_file_identity(qemu_binary), kernel=_file_identity(config.kernel),
                   initrd=_file_identity(config.initrd),
                   firmware=_file_identity(config.firmware) if config.firmware else None,
                   cmdline=config.cmdline, machine=config.machine, machine_options=list(config.machine_options),
                   accel=config.accel, memory_mib=config.memory_mib, cpus=config.cpus,
                   disks=[[str(d.path), d.serial] for d in config.disks], nics=len(config.nics),
                   shares_9p=[share.tag for share in config.shares_9p])

    @property
    def key(self) -> str:
        text = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class BootSnapshot:
    path: Path

    @property
    def memory(self) -> Path:
        return self.path / "memory"

    @property
    def state(self) -> Path:
        return self.path / "state"

    @property
    def key(self) -> str:
        return self.path.name

    def restore_config(self, config: VMConfig) -> VMConfig:
        """`config` (a pod's VM, of this snapshot's shape) set to start from the snapshot: its NICs on the
        pod's backends, with the snapshot's MACs (the device state carries them; the agent sets the pod's)."""
        nics = [dataclasses.replace(nic, mac=mac) for nic, mac in zip(config.nics, device_macs(len(config.nics)))]
        return dataclasses.replace(config, memory_file=self.memory, memory_file_shared=False, incoming=True,
                                   nics=nics)


def snapshots_dir() -> Path:
    return paths.snapshots_dir()


def _lock_fd(key: str) -> int:
    root = snapshots_dir()
    root.mkdir(parents=True, exist_ok=True)
    return os.open(root / f"{key}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)


class SnapshotUse:
    """A shared claim on a snapshot while a pod's QEMU starts from it (eviction skips it)."""

    def __init__(self, snapshot: BootSnapshot, fd: int):
        self.snapshot = snapshot
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def discard(self) -> None:
        """The snapshot failed to restore: remove it (once nobody else starts from it), so the next pod
        makes a new one."""
        self.release()
        with contextlib.suppress(OSError):
            _remove(self.snapshot.key, wait=False)


def _complete(path: Path) -> bool:
    return (path / "state").is_file() and (path / "memory").is_file()


def find(config: VMConfig, qemu_binary: Path) -> SnapshotUse | None:
    """A claim on the snapshot for `config`'s shape if it exists and nobody is making it; None otherwise
    (the pod then boots cold, and make_missing makes it alongside). No event loop needed: `kvmpod run` looks before it has
    one, so that QEMU can start at once."""
    key = SnapshotShape.of(config, qemu_binary).key
    final = snapshots_dir() / key
    fd = _lock_fd(key)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:  # being made or removed
        os.close(fd)
        return None
    if not _complete(final):
        os.close(fd)
        return None
    with contextlib.suppress(OSError):
        os.utime(final)  # "recently used", for eviction
    return SnapshotUse(BootSnapshot(final), fd)


async def make_missing(config: VMConfig, qemu_binary: Path, *, timeout: float) -> float | None:
    """Make the snapshot for `config`'s shape unless it exists or another process is making it: the
    seconds making it took, 0.0 when it was there, None when someone else holds it (making or removing
    it). `kvmpod run` calls it alongside the first pod of a shape, which boots cold meanwhile
    (docs/snapshot.md, "The first pod"); nobody waits for it but that pod's process before it exits.
    Raises VMError (and leaves nothing behind) when it cannot be made."""
    shape = SnapshotShape.of(config, qemu_binary)
    key = shape.key
    final = snapshots_dir() / key
    fd = _lock_fd(key)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # another first pod's process makes it (or it is being removed)
            return None
        if _complete(final):
            return 0.0
        started = time.monotonic()
        await _make(config, shape, final, timeout)
        took = time.monotonic() - started
    finally:
        os.close(fd)
    evict(settings.int_setting("snapshots-kept", "run", DEFAULT_KEEP), keep_key=key)
    return took


async def _make(config: VMConfig, shape: SnapshotShape, final: Path, timeout: float) -> None:
    """Boot a VM of `shape`, let the agent mount the image disks, save it into `final`. The VM's
    sockets and logs go to a private directory of the runtime dir, removed afterwards."""
    # asyncio, qemu.qmp and the agent session only when a snapshot is made: pod.launch imports this
    # module, and it runs before any event loop (docs/architecture.md, "The run path")
    import asyncio

    from kvmpod.agent.session import AgentSession
    from kvmpod.vm import cgroup
    from kvmpod.vm.qemu import QemuVM

    stage = final.with_name(f"{final.name}.new-{os.getpid()}")
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(mode=0o700)
    paths.runtime_dir().mkdir(parents=True, exist_ok=True)
    # the maker's pid in the name: `kvmpod gc` removes the work directory of a maker that was killed
    work = Path(tempfile.mkdtemp(prefix=f"snapshot-{os.getpid()}-", dir=paths.runtime_dir()))
    vm = None
    own = None
    try:
        # its own cgroup, with a pod's limits for its size: its guest mounts the images' disks, no more
        # trusted than a pod's; and not the pod's, which would be charged the memory file's pages for good.
        # Not KVMPOD_CGROUP_MEMORY_MAX's: that is for a pod's QEMU (a maker below its RAM would crawl,
        # its RAM being a file's page cache that is written back rather than OOM-killed)
        # and a tenth of a pod's share of contended CPU: the maker runs alongside the first pod, which a
        # user waits for, and on a busy host it took the CPU that pod's app (and its metadata service's
        # answers) needed; uncontended, it runs at full speed all the same
        limits = dataclasses.replace(cgroup.limits_for(config.memory_mib, config.cpus, tcg=config.accel == "tcg"),
                                     cpu_weight=MAKER_CPU_WEIGHT)
        own, why = cgroup.for_vm(cgroup.snapshot_leaf(final.name), limits)
        if why:   # the pod has said so for its own cgroup
            log.debug("boot snapshot: %s", why)
        # its 9p devices export an empty directory of its own: the guest never mounts them, and the snapshot
        # VM has no business with the first pod's volumes
        empty = work / "9p-empty"
        if config.shares_9p:
            empty.mkdir(mode=0o500)
        vm_config = dataclasses.replace(
            config, name=f"kvmpod-snapshot-{final.name[:12]}", console_log=work / "console.log",
            memory_file=stage / "memory", memory_file_shared=True, incoming=False,
            # its NICs on no backend: a hub port's peer has no vnet header, so the device offers (and the guest
            # takes) the fewest features, a subset of every backend's, and saves no slirp state a tap lacks
            nics=[Nic(mac, placeholder=True) for mac in device_macs(len(config.nics))],
            shares_9p=[dataclasses.replace(share, path=empty, read_only=True) for share in config.shares_9p])
        vm = QemuVM(vm_config, work / "qemu.log", connect_timeout=timeout, cgroup=own)
        marks = [("start", time.monotonic())]
        try:
            channel = await vm.start()
            session = AgentSession(*channel)
            await asyncio.wait_for(session.handshake(), timeout)
            marks.append(("boot to agent", time.monotonic()))
            await asyncio.wait_for(session.prepare_snapshot([d.serial for d in config.disks]), timeout)
            marks.append(("prepare", time.monotonic()))
            faults.at("snapshot", vm.pid)
            await asyncio.wait_for(vm.save_snapshot(stage / "state"), timeout)
            marks.append(("save", time.monotonic()))
        except asyncio.TimeoutError as cause:
            raise VMError(f"making a boot snapshot took longer than {timeout:.0f} s") from cause
        except KvmpodError as e:
            raise VMError(f"making a boot snapshot failed: {e}{_console_hint(work)}") from e
        await vm.stop(grace=0)
        marks.append(("stop", time.monotonic()))
        (stage / "shape.json").write_text(json.dumps(dataclasses.asdict(shape), indent=1) + "\n")
        for name in ("memory", "state", "shape.json"):
            with open(stage / name, "rb") as f:
                os.fsync(f.fileno())
        marks.append(("fsync", time.monotonic()))
        log.debug("boot snapshot: %s", ", ".join(f"{what} {t - marks[i][1]:.3f} s"
                                                 for i, (what, t) in enumerate(marks[1:])))
        if final.exists():  # an incomplete one left by a crash
            shutil.rmtree(final)
        stage.rename(final)
    finally:
        if vm is not None and vm.pid is not None:
            with contextlib.suppress(KvmpodError):
                await vm.stop(grace=0)
        if own is not None:
            own.remove()
        shutil.rmtree(stage, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


def _console_hint(work: Path) -> str:
    try:
        lines = (work / "console.log").read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return f" (guest console: {printable(lines[-1])})" if lines else ""   # the guest wrote it


def _remove(key: str, wait: bool) -> bool:
    """Remove snapshot `key` under its exclusive lock; False if a pod holds it and not `wait`."""
    fd = _lock_fd(key)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            return False
        shutil.rmtree(snapshots_dir() / key, ignore_errors=True)
        return True  # the lock file stays: unlinking it would let two makers lock different files
    finally:
        os.close(fd)


def entries_named(root: Path, part: str) -> list[os.DirEntry]:
    return [e for e in os.scandir(root) if part in e.name and e.name.rsplit("-", 1)[-1].isdigit()]


def evict(keep: int, keep_key: str | None = None) -> list[str]:
    """Remove the least recently used snapshots beyond `keep` (never `keep_key`, nor one in use).
    Returns the keys removed."""
    root = snapshots_dir()
    try:
        entries = [e for e in os.scandir(root) if e.is_dir() and "." not in e.name]
    except FileNotFoundError:
        return []
    sweep_makers()
    entries.sort(key=lambda e: e.stat().st_mtime, reverse=True)
    removed = []
    for entry in entries[keep:]:
        if entry.name != keep_key and _remove(entry.name, wait=False):
            removed.append(entry.name)
    return removed


def sweep_makers() -> list[str]:
    """What boot snapshot makers that were killed left: their stages (<key>.new-<pid>, a guest's RAM each)
    and their work directories in the runtime dir (snapshot-<pid>-*). Returns the paths removed; those of
    a maker still running stay (`kvmpod gc` and every eviction call this)."""
    removed = []
    candidates: list[tuple[os.DirEntry, int]] = []
    with contextlib.suppress(FileNotFoundError):
        candidates += [(e, int(e.name.rsplit("-", 1)[1])) for e in entries_named(snapshots_dir(), ".new-")]
    with contextlib.suppress(FileNotFoundError):
        for e in os.scandir(paths.runtime_dir()):
            word = e.name.split("-")[1] if e.name.startswith("snapshot-") and e.name.count("-") >= 2 else ""
            if word.isdigit() and e.is_dir(follow_symlinks=False):
                candidates.append((e, int(word)))
    for entry, pid in candidates:
        if not pid_alive(pid):
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(entry.path)
    return removed


def remove_all() -> int:
    """Remove every snapshot nobody is starting from; returns how many. (No command calls it yet: deleting
    <cache>/snapshots/ by hand is as safe, docs/snapshot.md.)"""
    return len(evict(0))
