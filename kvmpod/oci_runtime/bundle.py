"""An OCI bundle's config.json (opencontainers/runtime-spec config.md) → the pod that runs it.

Everything is checked here, before anything starts: a missing or malformed config.json, a field of
the wrong type, a rootfs that is not a directory, an unknown namespace or mount type, an ociVersion
kvmpod cannot serve — each is one line naming the field (`config.json: process.args: …`).

What maps where (docs/oci-runtime.md has the full table and what is ignored, and why):
- root.path → the app's root, shared with the guest over virtio-fs and used in place (the container's
  writes land in podman's upper layer); root.readonly → read-only root.
- process → the app: args, env (complete, as the runtime computed it), cwd, user uid/gid/additionalGids,
  capabilities.bounding (the retain set), noNewPrivileges, rlimits, oomScoreAdj, terminal.
- mounts: bind mounts of directories → host volumes (virtio-fs), of files → copies in a staging
  directory bound over the target, tmpfs → empty volumes; proc, sysfs, devpts, /dev, /dev/shm,
  mqueue and cgroup mounts are the guest's own (its kernel provides them).
- linux.resources.memory.limit and cpu quota/period → the VM's size; linux.seccomp → the guest
  agent's filter (allow-lists and deny-lists by name); linux.namespaces: the network namespace's path
  is the VM's network (kvmpod/net/given.py); the other namespaces are the VM itself.
"""

from __future__ import annotations

import json
import math
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvmpod.errors import KvmpodError
from kvmpod.image.manifest import App, EnvVar, ImageManifest, Isolator

SUPPORTED_MAJOR = 1
MIN_MEMORY_MIB = 64          # below this the guest kernel and agent do not fit
APP_NAME = "container"       # the app's name in the pod (an AC Name; the container ID is not one)
NAMESPACES = frozenset({"pid", "network", "mount", "ipc", "uts", "user", "cgroup", "time"})
GUEST_MOUNT_TYPES = frozenset({"proc", "sysfs", "devpts", "mqueue", "cgroup", "cgroup2", "securityfs"})
# Destinations the guest's own filesystem set covers (kvmpod's agent mounts these in every app root).
GUEST_DESTINATIONS = frozenset({"/proc", "/sys", "/dev", "/dev/pts", "/dev/shm", "/dev/mqueue", "/sys/fs/cgroup"})
RLIMITS = {"RLIMIT_CPU": 0, "RLIMIT_FSIZE": 1, "RLIMIT_DATA": 2, "RLIMIT_STACK": 3, "RLIMIT_CORE": 4,
           "RLIMIT_RSS": 5, "RLIMIT_NPROC": 6, "RLIMIT_NOFILE": 7, "RLIMIT_MEMLOCK": 8, "RLIMIT_AS": 9,
           "RLIMIT_LOCKS": 10, "RLIMIT_SIGPENDING": 11, "RLIMIT_MSGQUEUE": 12, "RLIMIT_NICE": 13,
           "RLIMIT_RTPRIO": 14, "RLIMIT_RTTIME": 15}
U64_MAX = 2**64 - 1
# Linux's capabilities by number (linux/capability.h, 6.1): the names a bounding set may hold.
CAPABILITIES = ("CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL",
                "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE", "CAP_NET_BIND_SERVICE",
                "CAP_NET_BROADCAST", "CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_IPC_LOCK", "CAP_IPC_OWNER",
                "CAP_SYS_MODULE", "CAP_SYS_RAWIO", "CAP_SYS_CHROOT", "CAP_SYS_PTRACE", "CAP_SYS_PACCT",
                "CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_NICE", "CAP_SYS_RESOURCE", "CAP_SYS_TIME",
                "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE", "CAP_AUDIT_WRITE", "CAP_AUDIT_CONTROL",
                "CAP_SETFCAP", "CAP_MAC_OVERRIDE", "CAP_MAC_ADMIN", "CAP_SYSLOG", "CAP_WAKE_ALARM",
                "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ", "CAP_PERFMON", "CAP_BPF", "CAP_CHECKPOINT_RESTORE")


class BundleError(KvmpodError):
    """config.json (or the bundle around it) is not something kvmpod can run; the message names the field."""


@dataclass(frozen=True)
class BindMount:
    destination: str
    source: Path
    read_only: bool
    is_file: bool


@dataclass(frozen=True)
class TmpfsMount:
    destination: str
    mode: int = 0o1777


@dataclass(frozen=True)
class Seccomp:
    """linux.seccomp as the guest agent enforces it: one allow-list or one deny-list, by name."""
    retain: tuple[str, ...] | None = None
    remove: tuple[str, ...] | None = None
    errno: str = "EPERM"
    ignored_conditions: int = 0   # rules with argument conditions, applied without them


@dataclass(frozen=True)
class Bundle:
    path: Path
    oci_version: str
    rootfs: Path
    readonly_rootfs: bool
    args: list[str]
    env: list[str]
    cwd: str
    uid: int
    gid: int
    additional_gids: list[int]
    terminal: bool
    console_size: tuple[int, int] | None
    capabilities: tuple[str, ...] | None      # the bounding set; None: not given
    no_new_privileges: bool
    rlimits: tuple[tuple[int, int, int], ...]
    oom_score_adj: int | None
    hostname: str | None
    binds: list[BindMount] = field(default_factory=list)
    tmpfs: list[TmpfsMount] = field(default_factory=list)
    memory_mib: int | None = None
    cpus: int | None = None
    seccomp: Seccomp | None = None
    netns: str | None = None          # the network namespace's path; None with network_isolated: loopback only
    annotations: dict[str, str] = field(default_factory=dict)


def _fail(where: str, message: str) -> BundleError:
    return BundleError(f"config.json: {where}: {message}")


def get_field(obj: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str, default: Any = None) -> Any:
    value = obj.get(key, default)
    if value is default and key not in obj:
        return default
    wanted = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in wanted:
        raise _fail(f"{where}{key}", f"{json.dumps(value)} is not a {wanted[0].__name__}")
    if not isinstance(value, wanted):
        names = {dict: "object", list: "array", str: "string", int: "integer", bool: "boolean", float: "number"}
        raise _fail(f"{where}{key}", f"{json.dumps(value)[:60]} is not {'an' if names[wanted[0]][0] in 'aeiou' else 'a'} "
                                     f"{names[wanted[0]]}")
    return value


def str_list(obj: dict[str, Any], key: str, where: str) -> list[str]:
    value = get_field(obj, key, list, where, [])
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise _fail(f"{where}{key}[{i}]", f"{json.dumps(item)[:60]} is not a string")
    return value


def uint_field(obj: dict[str, Any], key: str, where: str, limit: int = 2**32 - 1) -> int | None:
    value = get_field(obj, key, int, where)
    if value is not None and not 0 <= value <= limit:
        raise _fail(f"{where}{key}", f"{value} is out of range")
    return value


def read_json_object(path: Path, what: str, missing: str = "no such file") -> dict[str, Any]:
    """The JSON object in `path`; BundleError prefixed by `what` if it is unreadable or not one."""
    try:
        value = json.loads(path.read_bytes())
    except FileNotFoundError as cause:
        raise BundleError(f"{what}: {missing}") from cause
    except OSError as e:
        raise BundleError(f"{what}: {e.strerror}") from e
    except ValueError as e:
        raise BundleError(f"{what}: not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise BundleError(f"{what}: not a JSON object")
    return value


def read_bundle(bundle: Path) -> Bundle:
    """Read and check `bundle`/config.json; BundleError naming the field on anything kvmpod cannot run."""
    config_path = bundle / "config.json"
    config = read_json_object(config_path, str(config_path), f"no such file (is {bundle} an OCI bundle?)")
    return parse_config(bundle, config)


def parse_config(bundle: Path, config: dict[str, Any]) -> Bundle:
    version = get_field(config, "ociVersion", str, "")
    if version is None:
        raise _fail("ociVersion", "missing")
    major = version.split(".", 1)[0]
    if not major.isdigit() or int(major) != SUPPORTED_MAJOR:
        raise _fail("ociVersion", f"{version!r}: kvmpod serves runtime-spec {SUPPORTED_MAJOR}.x")
    rootfs, readonly = _root(bundle, config)
    process = get_field(config, "process", dict, "")
    if process is None:
        raise _fail("process", "missing (kvmpod runs a container's process; it has nothing to run)")
    args = str_list(process, "args", "process.")
    if not args or not args[0]:
        raise _fail("process.args", "empty: nothing to run")
    if not args[0].startswith("/") and "/" in args[0]:
        raise _fail("process.args", f"{args[0]!r}: a relative path (a bare name is looked up in PATH)")
    cwd = get_field(process, "cwd", str, "process.", "/")
    if not cwd.startswith("/"):
        raise _fail("process.cwd", f"{cwd!r} is not an absolute path")
    user = get_field(process, "user", dict, "process.", {})
    caps = get_field(process, "capabilities", dict, "process.")
    linux = get_field(config, "linux", dict, "", {})
    annotations = get_field(config, "annotations", dict, "", {})
    for key, value in annotations.items():
        if not isinstance(value, str):
            raise _fail(f"annotations.{key}", "is not a string")
    size = get_field(process, "consoleSize", dict, "process.")
    binds, tmpfs = _mounts(config)
    memory_mib, cpus = _resources(get_field(linux, "resources", dict, "linux.", {}))
    return Bundle(
        path=bundle, oci_version=version, rootfs=rootfs, readonly_rootfs=readonly, args=args,
        env=env_list(process), cwd=cwd, uid=uint_field(user, "uid", "process.user.") or 0,
        gid=uint_field(user, "gid", "process.user.") or 0,
        additional_gids=[_gid(g, i) for i, g in enumerate(get_field(user, "additionalGids", list, "process.user.", []))],
        terminal=get_field(process, "terminal", bool, "process.", False),
        console_size=(uint_field(size, "height", "process.consoleSize.") or 24, uint_field(size, "width", "process.consoleSize.") or 80)
        if size else None,
        capabilities=_bounding(caps) if caps is not None else None,
        no_new_privileges=get_field(process, "noNewPrivileges", bool, "process.", False),
        rlimits=_rlimits(process), oom_score_adj=_oom(process),
        hostname=_hostname(config), binds=binds, tmpfs=tmpfs, memory_mib=memory_mib, cpus=cpus,
        seccomp=_seccomp(get_field(linux, "seccomp", dict, "linux.")), netns=_network(linux), annotations=annotations)


def _root(bundle: Path, config: dict[str, Any]) -> tuple[Path, bool]:
    root = get_field(config, "root", dict, "")
    if root is None:
        raise _fail("root", "missing")
    path = get_field(root, "path", str, "root.")
    if not path:
        raise _fail("root.path", "missing")
    rootfs = (bundle / path) if not path.startswith("/") else Path(path)
    try:
        st = rootfs.stat()
    except OSError as e:
        raise _fail("root.path", f"{rootfs}: {e.strerror}") from e
    if not stat.S_ISDIR(st.st_mode):
        raise _fail("root.path", f"{rootfs} is not a directory")
    return rootfs.resolve(), get_field(root, "readonly", bool, "root.", False)


def env_list(process: dict[str, Any]) -> list[str]:
    env = str_list(process, "env", "process.")
    for i, entry in enumerate(env):
        name, sep, _ = entry.partition("=")
        if not sep or not name:
            raise _fail(f"process.env[{i}]", f"{entry!r} is not NAME=VALUE")
    return env


def _hostname(config: dict[str, Any]) -> str | None:
    """An RFC 1123 host name (it travels on the guest kernel's command line: nothing else may be in it)."""
    import argparse

    from kvmpod.cli.types import hostname  # importing kvmpod.cli loads its whole parser: only for a hostname

    value = get_field(config, "hostname", str, "")
    if not value:
        return None
    try:
        return hostname(value)
    except argparse.ArgumentTypeError as e:
        raise _fail("hostname", str(e)) from e


def _bounding(caps: dict[str, Any]) -> tuple[str, ...]:
    names = str_list(caps, "bounding", "process.capabilities.")
    for i, name in enumerate(names):
        if name not in CAPABILITIES:
            raise _fail(f"process.capabilities.bounding[{i}]", f"{name!r} is not a Linux capability")
    return tuple(names)


def _gid(value: Any, index: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**32:
        raise _fail(f"process.user.additionalGids[{index}]", f"{json.dumps(value)} is not a group ID")
    return value


def _rlimits(process: dict[str, Any]) -> tuple[tuple[int, int, int], ...]:
    out = []
    for i, item in enumerate(get_field(process, "rlimits", list, "process.", [])):
        where = f"process.rlimits[{i}]."
        if not isinstance(item, dict):
            raise _fail(where[:-1], "is not an object")
        kind = get_field(item, "type", str, where)
        if kind not in RLIMITS:
            raise _fail(f"{where}type", f"{kind!r} is not a Linux resource limit")
        soft, hard = uint_field(item, "soft", where, U64_MAX), uint_field(item, "hard", where, U64_MAX)
        if soft is None or hard is None:
            raise _fail(where[:-1], "needs soft and hard")
        if soft > hard:
            raise _fail(where[:-1], f"soft {soft} is above hard {hard}")
        out.append((RLIMITS[kind], soft, hard))
    return tuple(out)


def _oom(process: dict[str, Any]) -> int | None:
    value = get_field(process, "oomScoreAdj", int, "process.")
    if value is not None and not -1000 <= value <= 1000:
        raise _fail("process.oomScoreAdj", f"{value} is outside -1000..1000")
    return value


def _mounts(config: dict[str, Any]) -> tuple[list[BindMount], list[TmpfsMount]]:
    binds: list[BindMount] = []
    tmpfs: list[TmpfsMount] = []
    for i, mount in enumerate(get_field(config, "mounts", list, "", [])):
        where = f"mounts[{i}]"
        if not isinstance(mount, dict):
            raise _fail(where, "is not an object")
        destination = get_field(mount, "destination", str, f"{where}.")
        if not destination or not destination.startswith("/") or "/../" in destination + "/" \
                or "\0" in destination:
            raise _fail(f"{where}.destination", f"{destination!r} is not a clean absolute path")
        destination = "/" + "/".join(p for p in destination.split("/") if p and p != ".")
        kind = get_field(mount, "type", str, f"{where}.", "")
        options = str_list(mount, "options", f"{where}.")
        if kind in GUEST_MOUNT_TYPES or destination in GUEST_DESTINATIONS:
            continue   # the guest's own (its kernel's proc, sysfs, devpts...; /dev and /dev/shm tmpfs)
        if kind == "bind" or "bind" in options or "rbind" in options:
            source = get_field(mount, "source", str, f"{where}.")
            if not source or not source.startswith("/"):
                raise _fail(f"{where}.source", f"{source!r} is not an absolute path")
            try:
                st = Path(source).stat()
            except OSError as e:
                raise _fail(f"{where}.source", f"{source}: {e.strerror}") from e
            if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
                raise _fail(f"{where}.source", f"{source} is neither a directory nor a regular file")
            binds.append(BindMount(destination, Path(source).resolve(), "ro" in options,
                                   stat.S_ISREG(st.st_mode)))
        elif kind == "tmpfs":
            mode = next((o.split("=", 1)[1] for o in options if o.startswith("mode=")), "1777")
            try:
                tmpfs.append(TmpfsMount(destination, int(mode, 8)))
            except ValueError as cause:
                raise _fail(f"{where}.options", f"mode={mode} is not an octal mode") from cause
        else:
            raise _fail(f"{where}.type", f"{kind!r} mounts are not supported (bind and tmpfs are; proc, "
                                         "sysfs, devpts, mqueue and cgroup come from the guest)")
    return binds, tmpfs


def _resources(resources: dict[str, Any]) -> tuple[int | None, int | None]:
    memory = get_field(resources, "memory", dict, "linux.resources.", {})
    limit = get_field(memory, "limit", int, "linux.resources.memory.")
    memory_mib = None
    if limit is not None and limit > 0:
        memory_mib = max(MIN_MEMORY_MIB, math.ceil(limit / (1 << 20)))
    cpu = get_field(resources, "cpu", dict, "linux.resources.", {})
    quota, period = get_field(cpu, "quota", int, "linux.resources.cpu."), get_field(cpu, "period", int, "linux.resources.cpu.")
    cpus = None
    if quota is not None and quota > 0:
        cpus = max(1, math.ceil(quota / (period or 100000)))
    return memory_mib, cpus


ALLOW_ACTIONS = frozenset({"SCMP_ACT_ALLOW", "SCMP_ACT_LOG"})
DENY_ACTIONS = frozenset({"SCMP_ACT_ERRNO", "SCMP_ACT_KILL", "SCMP_ACT_KILL_PROCESS", "SCMP_ACT_KILL_THREAD",
                          "SCMP_ACT_TRAP"})


def _seccomp(profile: dict[str, Any] | None) -> Seccomp | None:
    """The profile as one allow-list (defaultAction denies) or one deny-list (defaultAction allows).
    Rules with argument conditions apply without them (the agent filters by syscall number only):
    an allowed call is allowed with any arguments, a denied one denied with any; the VM is the
    boundary, the filter a second line (docs/oci-runtime.md)."""
    if profile is None:
        return None
    default = get_field(profile, "defaultAction", str, "linux.seccomp.")
    if default not in ALLOW_ACTIONS | DENY_ACTIONS:
        raise _fail("linux.seccomp.defaultAction", f"{default!r} is not a seccomp action kvmpod applies")
    allow_by_default = default in ALLOW_ACTIONS
    names: list[str] = []
    conditional = 0
    for i, rule in enumerate(get_field(profile, "syscalls", list, "linux.seccomp.", [])):
        where = f"linux.seccomp.syscalls[{i}]."
        if not isinstance(rule, dict):
            raise _fail(where[:-1], "is not an object")
        action = get_field(rule, "action", str, where)
        if action not in ALLOW_ACTIONS | DENY_ACTIONS:
            raise _fail(f"{where}action", f"{action!r} is not a seccomp action kvmpod applies")
        if (action in ALLOW_ACTIONS) == allow_by_default:
            continue   # what the default does anyway
        rule_names = str_list(rule, "names", where)
        if rule.get("args"):
            conditional += 1
            if not allow_by_default:
                pass   # allowed with the condition: allowed (the less strict reading)
            else:
                continue   # denied only with the condition: not denied (else the call could never run)
        names += rule_names
    errno_ret = profile.get("defaultErrnoRet")
    errno = "EPERM" if errno_ret in (None, 1) else _errno_name(errno_ret)
    unique = tuple(dict.fromkeys(names))
    if allow_by_default:
        return Seccomp(remove=unique, errno=errno, ignored_conditions=conditional)
    return Seccomp(retain=unique, errno=errno if default == "SCMP_ACT_ERRNO" else "",
                   ignored_conditions=conditional)


def _errno_name(number: Any) -> str:
    import errno as errnos

    if not isinstance(number, int) or number not in errnos.errorcode:
        raise _fail("linux.seccomp.defaultErrnoRet", f"{json.dumps(number)} is not an errno number")
    return errnos.errorcode[number]


def _network(linux: dict[str, Any]) -> str | None:
    """The network namespace's path; "" for a new (empty) one; a container with none shares the host's
    network stack, which a VM cannot."""
    namespaces = get_field(linux, "namespaces", list, "linux.", [])
    network: str | None = None
    for i, ns in enumerate(namespaces):
        where = f"linux.namespaces[{i}]"
        if not isinstance(ns, dict):
            raise _fail(where, "is not an object")
        kind = get_field(ns, "type", str, f"{where}.")
        if kind not in NAMESPACES:
            raise _fail(f"{where}.type", f"{kind!r} is not a Linux namespace type")
        if kind == "network":
            network = get_field(ns, "path", str, f"{where}.", "")
    if network is None:
        raise _fail("linux.namespaces", "no network namespace: the container would share the host's network "
                                        "stack, which a VM cannot (podman: use --network none or a network)")
    return network


def stage_files(bundle: Bundle, directory: Path) -> list[tuple[BindMount, str]]:
    """Copies of the bundle's file bind mounts in `directory` (f0, f1…), shared with the guest as one
    volume: virtio-fs shares directories, and sharing a file's own directory would show the guest its
    neighbours (podman's userdata holds config.json and more). Changes on either side after the
    start are not carried over (docs/oci-runtime.md)."""
    directory.mkdir(mode=0o700, exist_ok=True)
    staged = []
    for i, bind in enumerate(b for b in bundle.binds if b.is_file):
        name = f"f{i}"
        try:
            shutil.copy2(bind.source, directory / name)
        except OSError as e:
            raise BundleError(f"config.json: mount {bind.destination}: copying {bind.source}: {e.strerror}") from e
        staged.append((bind, name))
    return staged


def image_manifest(bundle: Bundle, container_id: str) -> ImageManifest:
    """What stands for the container's image in kvmpod's metadata service and pod manifest."""
    name = "oci.kvmpod.local/container"
    raw = {"acKind": "ImageManifest", "acVersion": "0.8.11", "name": name,
           "labels": [{"name": "os", "value": "linux"}, {"name": "arch", "value": "amd64"}],
           "annotations": [{"name": "io.kvmpod.oci/id", "value": container_id},
                           {"name": "io.kvmpod.oci/bundle", "value": str(bundle.path)}]}
    return ImageManifest(name=name, labels={"os": "linux", "arch": "amd64"}, app=None, raw=raw,
                         annotations={"io.kvmpod.oci/id": container_id, "io.kvmpod.oci/bundle": str(bundle.path)})


def app_of(bundle: Bundle) -> App:
    """The container's process as an appc app (the executor rules do the rest)."""
    isolators = []
    if bundle.capabilities is not None:
        isolators.append(Isolator("os/linux/capabilities-retain-set", {"set": list(bundle.capabilities)}))
    if bundle.no_new_privileges:
        isolators.append(Isolator("os/linux/no-new-privileges", True))
    seccomp = bundle.seccomp
    if seccomp is not None and seccomp.retain is not None:
        isolators.append(Isolator("os/linux/seccomp-retain-set", {"set": list(seccomp.retain), "errno": seccomp.errno}))
    elif seccomp is not None and seccomp.remove:
        isolators.append(Isolator("os/linux/seccomp-remove-set", {"set": list(seccomp.remove), "errno": seccomp.errno}))
    return App(exec=list(bundle.args), user=str(bundle.uid), group=str(bundle.gid), working_directory=bundle.cwd,
               environment=[EnvVar(*e.split("=", 1)) for e in bundle.env],
               supplementary_gids=list(bundle.additional_gids), isolators=isolators)
