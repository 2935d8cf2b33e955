"""A cgroup per pod with hard limits: QEMU and its helpers (virtiofsd) in `kvmpod/<pod uuid>`, without
systemd (docs/security.md, "cgroups").

Where: cgroup v2 for each controller the host's v2 tree has, the v1 hierarchy of the controller where
that is what the host has (a hybrid host has both: each controller is looked up on its own). Under the
highest directory between the hierarchy's root and kvmpod's own cgroup that kvmpod may write: the
machine's root for root, the top of a delegated subtree for a user (none: one notice, no cgroup).

What: memory (guest RAM + the measured overhead of QEMU beyond it, no swap), pids (QEMU's and
virtiofsd's threads, with room) and cpu (the apps' resource/cpu limit, else the vCPU count): the
limits are computed by `limits_for()` alone, from the pod's VM size (kvmpod/pod/resources.py).

How processes get in: the child writes its own pid into each hierarchy's cgroup.procs before it execs
(`join`, from a preexec function): nothing QEMU allocates is charged outside the limits. The kvmpod
process itself stays where it is: it supervises the pod and reports the OOM kill, so the VM's cap must
not be able to take it down (and its own memory is not the VM's).

The cgroup's identity is in the pod's state.json (`Cgroup.record()`), so the process that ends the pod
(after the idle relay, or `kvmpod gc`) removes it without anything handed over.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
import time
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, Callable

from kvmpod import config as settings
from kvmpod import paths
from kvmpod.errors import ConfigError
from kvmpod.vm.config import TCG_CACHE_MIB

log = logging.getLogger(__name__)

MIB = 1 << 20
CONTROLLERS = ("memory", "pids", "cpu")
CPU_PERIOD_US = 100_000

# Memory QEMU holds beyond guest RAM, measured under TCG on the 2-core test machine (docs/security.md
# has the figures): TCG's translation cache, bounded by tb-size (TCG_CACHE_MIB; KVM has none), then
# QEMU's heap and other anonymous memory (~18 MiB), the kernel's memory for it (page tables, slab:
# ~3 MiB), and the page cache of its binary, libraries and the guest kernel it maps (~30 MiB: charged
# to the first cgroup that reads them, reclaimable, but a limit that left none would thrash). Peak
# memory.max_usage_in_bytes beyond what the guest touched, busybox pod filling its RAM: 55-58 MiB at 256
# MiB/1 vCPU and at 1 GiB/2 vCPUs; the translation cache was 32 MiB of it.
OVERHEAD_BASE_MIB = 64          # QEMU without the translation cache: heap, kernel memory, mapped files
OVERHEAD_PER_GIB_MIB = 8        # page tables (2 MiB per GiB of guest RAM) and QEMU's per-RAM bitmaps
OVERHEAD_PER_VCPU_MIB = 8       # a vCPU thread's stack and its softmmu TLBs
OVERHEAD_PER_VIRTIOFSD_MIB = 64  # a virtiofsd: binary, heap, and a request buffer per pool thread

# Tasks (threads count): QEMU's main loop, RCU and signal threads, one thread per vCPU and a block-I/O
# thread pool of up to 64 workers (QEMU's thread-pool max_threads); the C virtiofsd of QEMU 7.2 its
# sandbox monitor, main and virtqueue threads and a pool of up to 64 (--thread-pool-size).
QEMU_TASKS = 64 + 16
VIRTIOFSD_TASKS = 64 + 16
TASK_HEADROOM = 32              # spare: a limit QEMU meets aborts it, so it must not meet it in earnest

MEMORY_OVERRIDE_ENV = "KVMPOD_CGROUP_MEMORY_MAX"   # tests only: a pod's memory limit as given


@dataclass(frozen=True)
class CgroupLimits:
    memory_bytes: int               # memory.max / memory.limit_in_bytes
    pids: int                       # pids.max
    cpu_quota_us: int | None        # cpu.max's quota per period (None: no CPU limit)
    cpu_period_us: int = CPU_PERIOD_US
    swap_bytes: int = 0             # memory.swap.max (v1: memory.memsw.limit_in_bytes = memory + swap)
    # a share of contended CPU, as v2's cpu.weight (1-10000, the kernel's default 100); v1: cpu.shares
    # (default 1024) scaled alike. None: the kernel's default
    cpu_weight: int | None = None

    @property
    def cpus(self) -> Decimal | None:
        return None if self.cpu_quota_us is None else Decimal(self.cpu_quota_us) / self.cpu_period_us

    def describe(self) -> str:
        cpu = "no CPU limit" if self.cpus is None else f"cpu {self.cpus.normalize():f} CPUs ({self.cpu_quota_us}/{self.cpu_period_us} us)"
        weight = "" if self.cpu_weight is None else f", cpu weight {self.cpu_weight}"
        return f"memory {self.memory_bytes // MIB} MiB, swap {self.swap_bytes // MIB} MiB, pids {self.pids}, {cpu}{weight}"

    def record(self) -> dict[str, Any]:
        return {"memory_bytes": self.memory_bytes, "swap_bytes": self.swap_bytes, "pids": self.pids,
                "cpu_quota_us": self.cpu_quota_us, "cpu_period_us": self.cpu_period_us, "cpu_weight": self.cpu_weight}


def overhead_mib(memory_mib: int, vcpus: int, virtiofsd: int = 0, tcg: bool = True) -> int:
    """What QEMU (and each virtiofsd) may hold beyond guest RAM (see OVERHEAD_BASE_MIB)."""
    return ((TCG_CACHE_MIB if tcg else 0) + OVERHEAD_BASE_MIB + -(-memory_mib * OVERHEAD_PER_GIB_MIB // 1024)
            + vcpus * OVERHEAD_PER_VCPU_MIB + virtiofsd * OVERHEAD_PER_VIRTIOFSD_MIB)


def limits_for(memory_mib: int, vcpus: int, cpu_limit: Decimal | None = None, virtiofsd: int = 0,
               memory_override: int | None = None, tcg: bool = True) -> CgroupLimits:
    """The hard limits of a VM's cgroup, from its size (kvmpod/pod/resources.py: size_vm): guest RAM
    plus the overhead, no swap; QEMU's and each virtiofsd's tasks with headroom; `cpu_limit` CPUs of
    CPU time (the apps' resource/cpu limits, or --cpus), else `vcpus`: a guest cannot use more than its
    vCPUs anyway, and QEMU's other threads (emulated I/O) get no more than that either. `tcg`: the
    accelerator is TCG, whose translation cache counts.
    `memory_override` (tests only: KVMPOD_CGROUP_MEMORY_MAX) replaces the memory limit."""
    memory = (memory_mib + overhead_mib(memory_mib, vcpus, virtiofsd, tcg)) * MIB
    if memory_override is not None:
        memory = memory_override
    cpus = cpu_limit if cpu_limit is not None else Decimal(vcpus)
    quota = max(1000, int(cpus * CPU_PERIOD_US))  # the kernel's least quota is 1 ms
    return CgroupLimits(memory_bytes=memory, pids=QEMU_TASKS + vcpus + virtiofsd * VIRTIOFSD_TASKS + TASK_HEADROOM,
                        cpu_quota_us=quota)


def memory_override() -> int | None:
    """KVMPOD_CGROUP_MEMORY_MAX (a size: 64M, 1G, bytes): for tests that force QEMU over its limit."""
    text = os.environ.get(MEMORY_OVERRIDE_ENV)
    if not text:
        return None
    try:
        size = settings.parse_size(text)
    except ValueError as e:
        raise ConfigError(f"{MEMORY_OVERRIDE_ENV}: {e}") from e
    if size < MIB:
        raise ConfigError(f"{MEMORY_OVERRIDE_ENV}: {text!r} is below 1 MiB")
    return size


def switched_off() -> str | None:
    """`[security] cgroup = false` in kvmpod.toml (for measuring only): where it is said, else None (on,
    the default)."""
    if settings.bool_setting("cgroup", "security", True):
        return None
    found = settings.lookup("cgroup", "security")
    return found.describe("[security] cgroup = false") if found else "[security] cgroup = false"


# -- the host's layout: which hierarchies, which controllers, and kvmpod's own cgroup ----------------

@dataclass(frozen=True)
class Hierarchy:
    version: int                # 1 or 2
    mount: Path                 # where it is mounted
    root: str                   # the cgroup mounted there ("/", or a subtree a container is given)
    controllers: frozenset[str]  # v1: the mount's; v2: the root's cgroup.controllers
    own: str | None = None      # kvmpod's own cgroup in it (from /proc/self/cgroup)

    def directory(self, cgroup: str) -> Path | None:
        """The directory of `cgroup` (a path from the hierarchy's root), if it is below this mount."""
        rel = os.path.relpath(cgroup, self.root)
        if rel == ".":
            return self.mount
        if rel.startswith(".."):
            return None
        return self.mount / rel

    def name(self, directory: Path) -> str:
        """`directory`'s cgroup path as /proc/PID/cgroup shows it, without the leading slash."""
        return str(Path(self.root) / directory.relative_to(self.mount)).strip("/")


@dataclass(frozen=True)
class Layout:
    hierarchies: tuple[Hierarchy, ...]

    @property
    def kind(self) -> str:
        """"v2" (unified), "v1" (legacy), "hybrid" (v1 controllers and a v2 tree), or "none"."""
        versions = {h.version for h in self.hierarchies}
        v1 = any(h.version == 1 and h.controllers for h in self.hierarchies)
        if 2 in versions and v1:
            return "hybrid"
        if 2 in versions:
            return "v2"
        return "v1" if v1 else "none"

    def place(self, controller: str) -> Hierarchy | None:
        """Where `controller` is: the v2 tree if it has it, else its v1 hierarchy."""
        for version in (2, 1):
            for h in self.hierarchies:
                if h.version == version and controller in h.controllers:
                    return h
        return None


_OCTAL = re.compile(r"\\([0-7]{3})")


def _unescape(field: str) -> str:
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[tuple[int, Path, str, frozenset[str]]]:
    """The cgroup mounts in /proc/self/mountinfo: (version, mount point, root, v1 controllers)."""
    found: list[tuple[int, Path, str, frozenset[str]]] = []
    for line in text.splitlines():
        fields = line.split()
        if " - " not in line or len(fields) < 10:
            continue
        sep = fields.index("-")
        fstype, superopts = fields[sep + 1], fields[sep + 3] if len(fields) > sep + 3 else ""
        if fstype == "cgroup2":
            found.append((2, Path(_unescape(fields[4])), _unescape(fields[3]), frozenset()))
        elif fstype == "cgroup":
            controllers = frozenset(o for o in superopts.split(",") if o in CONTROLLERS)
            if controllers:   # not the named hierarchies (name=systemd) nor the others kvmpod does not use
                found.append((1, Path(_unescape(fields[4])), _unescape(fields[3]), controllers))
    return found


def parse_proc_cgroup(text: str) -> dict[str, str]:
    """/proc/self/cgroup: controller → cgroup path; "" is the v2 tree."""
    own = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        for controller in parts[1].split(",") if parts[1] else [""]:
            own[controller] = parts[2]
    return own


def detect(mountinfo: str, proc_cgroup: str) -> Layout:
    """The layout these two files describe (the v2 tree's controllers are read from its root)."""
    own = parse_proc_cgroup(proc_cgroup)
    hierarchies, seen = [], set()
    for version, mount, root, controllers in parse_mountinfo(mountinfo):
        key = (version, controllers)
        if key in seen:   # the same hierarchy mounted twice: the first one does
            continue
        seen.add(key)
        if version == 2:
            try:
                controllers = frozenset((mount / "cgroup.controllers").read_text().split())
            except OSError:
                controllers = frozenset()
            mine = own.get("")
        else:
            mine = next((own[c] for c in sorted(controllers) if c in own), None)
        hierarchies.append(Hierarchy(version, mount, root, controllers & frozenset(CONTROLLERS), mine))
    return Layout(tuple(hierarchies))


def host_layout(root: Path = Path("/")) -> Layout:
    """This host's layout (`root`: another tree's /proc/self files, for `kvmpod doctor`'s fixture hosts)."""
    try:
        return detect((root / "proc/self/mountinfo").read_text(), (root / "proc/self/cgroup").read_text())
    except OSError:
        return Layout(())


def _writable(directory: Path) -> bool:
    return os.access(directory, os.W_OK) and os.access(directory / "cgroup.procs", os.W_OK)


def base_directory(h: Hierarchy) -> Path | None:
    """The highest directory from the hierarchy's root down to kvmpod's own cgroup that kvmpod may
    write (make cgroups in and move processes into): the root itself for root, the top of a subtree
    delegated to the user otherwise; None without one."""
    own = h.directory(h.own) if h.own is not None else None
    if own is None:
        candidates = [h.mount]
    else:
        rel = own.relative_to(h.mount)
        candidates = [h.mount] + [h.mount.joinpath(*rel.parts[:i + 1]) for i in range(len(rel.parts))]
    return next((d for d in candidates if _writable(d)), None)


def parent_name(run_dir: Path | None = None) -> str:
    """The cgroup that holds the pods' cgroups: `kvmpod`, or for another runtime dir (KVMPOD_RUN_DIR: tests,
    benchmarks) a name of its own, so `kvmpod gc` of one never removes an empty cgroup another just made."""
    run = run_dir or paths.runtime_dir()
    if run == paths.default_runtime_dir():
        return "kvmpod"
    return "kvmpod-" + hashlib.sha256(os.fsencode(run)).hexdigest()[:8]


# -- one cgroup --------------------------------------------------------------------------------------

_PARENT = re.compile(r"kvmpod(-[0-9a-f]{8})?")   # parent_name()'s

@dataclass(frozen=True)
class CgroupDir:
    path: Path
    version: int
    controllers: tuple[str, ...]


@dataclass(frozen=True)
class Cgroup:
    """A VM's cgroup: its directory in each hierarchy it uses, and the limits written there."""
    name: str                       # e.g. kvmpod/<uuid>: as /proc/PID/cgroup shows it, without the slash
    dirs: tuple[CgroupDir, ...]
    limits: CgroupLimits

    @property
    def controllers(self) -> tuple[str, ...]:
        return tuple(sorted(c for d in self.dirs for c in d.controllers))

    @property
    def procs_files(self) -> tuple[bytes, ...]:
        """What `join` writes to, precomputed: the preexec function runs between fork and exec."""
        return tuple(os.fsencode(d.path / "cgroup.procs") for d in self.dirs)

    def describe(self) -> str:
        where = "; ".join(f"v{d.version} {','.join(d.controllers)} {d.path}" for d in self.dirs)
        return f"cgroup {self.name} ({where}): {self.limits.describe()}"

    def record(self) -> dict[str, Any]:
        """For state.json (docs/layout.md)."""
        return {"name": self.name,
                "controllers": {c: {"path": str(d.path), "version": d.version} for d in self.dirs for c in d.controllers},
                "limits": self.limits.record()}

    @classmethod
    def from_record(cls, record: object) -> "Cgroup | None":
        """The cgroup a state.json recorded, or None if it recorded none (or nothing readable, or a
        directory that is not a kvmpod cgroup: removing it must never remove another's)."""
        if not isinstance(record, dict):
            return None
        try:
            by_dir: dict[tuple[str, int], list[str]] = {}
            for controller, where in record["controllers"].items():
                if not _PARENT.fullmatch(Path(str(where["path"])).parent.name):
                    return None
                by_dir.setdefault((str(where["path"]), int(where["version"])), []).append(str(controller))
            limits = record["limits"]
            return cls(str(record["name"]), tuple(CgroupDir(Path(p), v, tuple(sorted(cs)))
                                                 for (p, v), cs in by_dir.items()),
                       CgroupLimits(int(limits["memory_bytes"]), int(limits["pids"]),
                                    None if limits["cpu_quota_us"] is None else int(limits["cpu_quota_us"]),
                                    int(limits["cpu_period_us"]), int(limits["swap_bytes"]),
                                    None if limits.get("cpu_weight") is None else int(limits["cpu_weight"])))
        except (KeyError, TypeError, ValueError, AttributeError):
            return None

    def oom_kills(self) -> int:
        """How many processes the kernel's OOM killer ended in this cgroup for its memory limit."""
        for d in self.dirs:
            if "memory" not in d.controllers:
                continue
            if d.version == 2:
                return _counter(d.path / "memory.events", "oom_kill")
            kills = _counter(d.path / "memory.oom_control", "oom_kill", missing=-1)
            if kills >= 0:
                return kills
            return _number(d.path / "memory.failcnt")   # kernels before 4.13: the limit was hit
        return 0

    def oom_message(self) -> str:
        """How a VM OOM-killed in this cgroup is reported: the pod's, or the boot snapshot maker's."""
        subject = "the boot snapshot's VM" if self.name.rpartition("/")[2].startswith("snapshot-") else "the pod's VM"
        return f"{subject} exceeded its memory limit of {self.limits.memory_bytes // MIB} MiB (cgroup {self.name})"

    def remove(self, wait: float = 2.0) -> bool:
        """rmdir in every hierarchy once its processes are gone (a killed one may take a moment to
        exit), then the parent if no other pod uses it. True if nothing is left."""
        left = False
        for d in self.dirs:
            left |= not _rmdir(d.path, wait)
            _rmdir(d.path.parent, 0)   # busy while another pod runs: it stays
        return not left


def _counter(path: Path, key: str, missing: int = 0) -> int:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return missing


def _number(path: Path) -> int:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return 0


def _mkdir(path: Path, exist_ok: bool = False) -> None:
    """mkdir in a cgroup filesystem: the kernel fills the new directory (tests replace this)."""
    try:
        os.mkdir(path)
    except FileExistsError:
        if not exist_ok:
            raise


def _remove_dir(path: Path) -> None:
    """rmdir in a cgroup filesystem: a cgroup without processes goes, files and all (tests replace this)."""
    os.rmdir(path)


def _rmdir(path: Path, wait: float) -> bool:
    deadline = time.monotonic() + wait
    while True:
        try:
            _remove_dir(path)
            return True
        except FileNotFoundError:
            return True
        except OSError as e:
            if e.errno not in (errno.EBUSY, errno.ENOTEMPTY) or time.monotonic() >= deadline:
                if wait:
                    log.debug("cgroup %s: rmdir: %s", path, e.strerror)
                return False
        time.sleep(0.01)


def join(procs_files: tuple[bytes, ...]) -> None:
    """Move the calling process into the cgroup (call it between fork and exec: a preexec function)."""
    for name in procs_files:
        fd = os.open(name, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
        try:
            os.write(fd, b"0")   # "0": the writer itself, in v1 and v2 alike
        finally:
            os.close(fd)


def _write(path: Path, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)   # as `echo value > file`
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _limit_files(controller: str, version: int, limits: CgroupLimits, d: Path) -> list[tuple[str, str]]:
    """The files to write for one controller, in order (v1's memsw must not go below the limit)."""
    if controller == "memory":
        if version == 2:
            files = [("memory.max", str(limits.memory_bytes))]
            if (d / "memory.swap.max").exists():   # absent without swap accounting: then no swap is charged
                files.append(("memory.swap.max", str(limits.swap_bytes)))
            if (d / "memory.oom.group").exists():  # QEMU and its virtiofsd go together
                files.append(("memory.oom.group", "1"))
            return files
        files = [("memory.limit_in_bytes", str(limits.memory_bytes))]
        if (d / "memory.memsw.limit_in_bytes").exists():   # swap accounting on: memory + swap
            files.append(("memory.memsw.limit_in_bytes", str(limits.memory_bytes + limits.swap_bytes)))
        return files
    if controller == "pids":
        return [("pids.max", str(limits.pids))]
    if controller == "cpu":
        files = []
        if limits.cpu_weight is not None:
            files.append(("cpu.weight", str(limits.cpu_weight)) if version == 2 else
                         ("cpu.shares", str(max(2, limits.cpu_weight * 1024 // 100))))
        if limits.cpu_quota_us is None:
            return files
        if version == 2:
            return [*files, ("cpu.max", f"{limits.cpu_quota_us} {limits.cpu_period_us}")]
        return [*files, ("cpu.cfs_period_us", str(limits.cpu_period_us)),
                ("cpu.cfs_quota_us", str(limits.cpu_quota_us))]
    return []


def _enable(directory: Path, controllers: list[str], missing: dict[str, str]) -> list[str]:
    """Enable `controllers` for `directory`'s children (v2's cgroup.subtree_control): those it could.
    A controller the directory has not got itself (cgroup.controllers: not delegated to it) cannot be,
    nor any in a non-root cgroup that holds processes (the top of a delegated subtree holds none)."""
    have = set((directory / "cgroup.controllers").read_text().split())
    for c in controllers:
        if c not in have:
            missing[c] = f"not available in {directory}"
    controllers = [c for c in controllers if c in have]
    file = directory / "cgroup.subtree_control"
    enabled = set(file.read_text().split())
    if any(c not in enabled for c in controllers):
        try:
            _write(file, " ".join(f"+{c}" for c in controllers))   # one write: the kernel adds each
            enabled |= set(controllers)
        except OSError:
            for c in controllers:   # which one failed, and why
                try:
                    _write(file, f"+{c}")
                    enabled.add(c)
                except OSError as e:
                    missing[c] = f"cannot enable it in {file}: {e.strerror}"
    return [c for c in controllers if c in enabled]


def placement(layout: Layout) -> tuple[dict[Hierarchy, tuple[Path, list[str]]], dict[str, str]]:
    """Where a VM's cgroup would go: per hierarchy, the directory kvmpod may write under
    (base_directory) and the controllers it would use there; and why each of the others cannot be
    used. `create` makes the cgroup there, `kvmpod doctor` reports it."""
    where: dict[Hierarchy, tuple[Path, list[str]]] = {}
    missing: dict[str, str] = {}
    for c in CONTROLLERS:
        h = layout.place(c)
        if h is None:
            missing[c] = "not mounted"
        elif h in where:
            where[h][1].append(c)
        elif (base := base_directory(h)) is not None:
            where[h] = (base, [c])
        else:
            missing[c] = (f"not root, and no cgroup is delegated to uid {os.geteuid()}" if os.geteuid()
                          else f"{h.mount} is not writable")
    return where, missing


def create(leaf: str, limits: CgroupLimits, layout: Layout | None = None,
           parent: str | None = None) -> tuple[Cgroup | None, str]:
    """Make the cgroup `<parent>/<leaf>` in every hierarchy that has one of CONTROLLERS, with `limits`
    written. Returns it (None if no controller could be used) and one notice saying what is missing
    and why ("" if nothing is). A controller whose directory or files refuse is left out, and nothing
    of it stays behind."""
    layout = layout or host_layout()
    parent = parent or parent_name()
    where, missing = placement(layout)
    made: list[CgroupDir] = []
    name = ""
    try:
        for h, (base, controllers) in where.items():
            if d := _make(h, base, parent, leaf, controllers, limits, missing):
                made.append(d)
                name = name or h.name(d.path)
    except BaseException:
        Cgroup(name, tuple(made), limits).remove(wait=0)
        raise
    if not made:
        return None, _notice("", missing, made=False)
    return Cgroup(name, tuple(made), limits), _notice(name, missing, made=True)


def _make(h: Hierarchy, base: Path, parent: str, leaf: str, controllers: list[str], limits: CgroupLimits,
          missing: dict[str, str]) -> CgroupDir | None:
    """`base/parent/leaf` in hierarchy `h`, with the limits of `controllers` written (None when none
    could be: then no directory stays). Why a controller could not be used goes to `missing`."""
    top = base / parent
    d = top / leaf
    for attempt in range(3):   # another pod's removal may take an empty parent away in between: again
        try:
            usable = controllers
            if h.version == 2:   # a v2 cgroup has a controller's files only if its parent enables it
                usable = _enable(base, usable, missing)
                if not usable:
                    return None
            _mkdir(top, exist_ok=True)
            if h.version == 2:
                usable = _enable(top, usable, missing)
            _mkdir(d)
            break
        except FileNotFoundError as e:
            if attempt < 2:
                continue
            missing.update({c: f"{e.filename}: {e.strerror}" for c in controllers})
            return None
        except OSError as e:
            missing.update({c: f"{e.filename}: {e.strerror}" for c in controllers})
            return None
    kept = []
    for c in usable:
        try:
            for file, value in _limit_files(c, h.version, limits, d):
                _write(d / file, value)
            kept.append(c)
        except OSError as e:
            missing[c] = f"{e.filename}: {e.strerror}"
    if not kept:
        _rmdir(d, 0)
        _rmdir(top, 0)
        return None
    return CgroupDir(d, h.version, tuple(kept))


def _notice(name: str, missing: dict[str, str], made: bool) -> str:
    """The one notice for what the host does not allow ("" when it allows everything)."""
    if not missing:
        return ""
    by_why: dict[str, list[str]] = {}
    for c, why in sorted(missing.items()):
        by_why.setdefault(why, []).append(c)
    whys = "; ".join(f"{', '.join(cs)}: {why}" for why, cs in by_why.items())
    if not made:
        return f"no cgroup for the VM ({whys}): QEMU runs without memory, task and CPU limits (docs/security.md)"
    what = {"memory": "memory", "pids": "tasks", "cpu": "CPU time"}
    return (f"the VM's cgroup {name} goes without {', '.join(sorted(missing))} ({whys}): QEMU's "
            f"{' and '.join(what[c] for c in sorted(missing))} not limited (docs/security.md)")


def for_vm(leaf: str, limits: CgroupLimits) -> tuple[Cgroup | None, str]:
    """The cgroup for one VM (`leaf`: the pod's UUID, or the boot snapshot maker's name), made with its
    limits, unless `[security] cgroup = false`; and a notice when the host does not allow all of it."""
    if off := switched_off():
        return None, f"QEMU runs without a cgroup: {off} (for measuring only)"
    return create(leaf, limits)


def sweep(keep: Callable[[str], bool], layout: Layout | None = None, parent: str | None = None) -> list[str]:
    """`kvmpod gc`: remove the empty cgroups under the parent that no pod or snapshot maker uses
    (`keep(leaf)` says which are in use), then the parent if it is empty. Returns the leaves that are
    gone from every hierarchy (one that still holds a process stays where it does)."""
    layout = layout or host_layout()
    parent = parent or parent_name()
    gone: dict[str, bool] = {}
    for h in layout.hierarchies:
        base = base_directory(h) if h.controllers else None
        if base is None or not (base / parent).is_dir():
            continue
        for entry in sorted((base / parent).iterdir()):
            if entry.is_dir() and not keep(entry.name):
                gone[entry.name] = _rmdir(entry, 0) and gone.get(entry.name, True)
        _rmdir(base / parent, 0)
    return sorted(leaf for leaf, ok in gone.items() if ok)


STALE_AFTER = 3600.0   # seconds: an empty pod cgroup this old is no pod's (QEMU joins within seconds)


def sweep_other_parents(layout: Layout | None = None, parent: str | None = None,
                        older_than: float = STALE_AFTER) -> list[str]:
    """`kvmpod gc`, for the parents of other runtime dirs (`kvmpod-<hash>`, whose pod directories this
    process cannot see: a test's or a benchmark's, often deleted by now): the empty cgroups in them
    made more than `older_than` seconds ago, then the parents left empty. Returns what it removed."""
    layout = layout or host_layout()
    parent = parent or parent_name()
    removed = []
    now = time.time()
    for h in layout.hierarchies:
        base = base_directory(h) if h.controllers else None
        if base is None:
            continue
        for top in sorted(base.glob("kvmpod-*")):
            if top.name in (parent, "kvmpod") or not _PARENT.fullmatch(top.name) or not top.is_dir():
                continue
            for entry in sorted(top.iterdir()):
                with contextlib.suppress(OSError):
                    if entry.is_dir() and now - entry.stat().st_mtime > older_than and _rmdir(entry, 0):
                        removed.append(f"{top.name}/{entry.name}")
            _rmdir(top, 0)
    return sorted(set(removed))


def snapshot_leaf(key: str) -> str:
    """The leaf of a boot snapshot maker's cgroup: its pid names it, so gc knows when it is over."""
    return f"snapshot-{os.getpid()}-{key[:8]}"


def snapshot_maker_alive(leaf: str) -> bool | None:
    """For a snapshot maker's leaf: whether its process lives; None for another leaf."""
    m = re.fullmatch(r"snapshot-(\d+)-[0-9a-f]+", leaf)
    if m is None:
        return None
    try:
        os.kill(int(m.group(1)), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
