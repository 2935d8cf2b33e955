"""How a pod's QEMU confines itself: a seccomp filter, an unprivileged user and an empty chroot
(docs/security.md has the threat model and what each of these stops).

QEMU does all three itself, from its own options (written by kvmpod/vm/config.py):

- `-sandbox on,obsolete=deny,elevateprivileges=…,spawn=deny,resourcecontrol=deny`: QEMU installs its
  seccomp filter (no_new_privs, then a deny list: a denied call kills QEMU) while it parses its early
  options, before it opens any file or talks to any guest;
- `-runas kvmpod-qemu` and `-chroot DIR` (`-run-with user=,chroot=` from 9.1): QEMU switches user and
  root at the end of its start-up, after the kernel, initrd, firmware, disks, memory files, console log
  and vhost-user sockets are open and every fd kvmpod passes is inherited. Nothing of the pod has to be
  readable by that user, and nothing is made world-writable.

Because the filter is in place before the switch, a QEMU that switches user needs
elevateprivileges=allow (its setgid/setuid would otherwise kill it: tested, docs/security.md).

Only root can switch user and chroot: a pod started by another user has a QEMU of that user already.
The QEMU binary's version and whether it has seccomp are probed once per binary (path, size, mtime)
and remembered in <cache>/qemu-caps.json: the probe is `QEMU -sandbox … -version` (~15 ms).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import pwd
import re
import shlex
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

from kvmpod import config, paths
from kvmpod.errors import ConfigError, VMError
from kvmpod.vm.config import Confinement
from kvmpod.vm.qemu_binary import binary_identity

QEMU_USER = "kvmpod-qemu"
SECTION = "security"
SANDBOX_PROBE = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
CAPS_FILE = "qemu-caps.json"
CHROOT_NAME = "qemu-root"
# a system user with no home and no login: QEMU only ever becomes it (useradd(8) on Debian and others)
USERADD = ("useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin",
           "--user-group", "--comment", "QEMU of kvmpod pods")


@dataclass(frozen=True)
class QemuCaps:
    version: tuple[int, int]
    seccomp: bool
    why_not: str = ""      # QEMU's own words when it refused -sandbox


def parse_version(text: str) -> tuple[int, int] | None:
    match = re.search(r"QEMU emulator version (\d+)\.(\d+)", text)
    return (int(match[1]), int(match[2])) if match else None


def _caps_file() -> Path:
    return paths.cache_dir() / CAPS_FILE


def _read_caps() -> dict[str, object]:
    try:
        data = json.loads(_caps_file().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_caps(data: dict[str, object]) -> None:
    path = _caps_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{CAPS_FILE}.{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        tmp.rename(path)
    except OSError:
        pass  # a cache: the next pod probes again


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise VMError(f"{argv[0]}: cannot run it to learn its version: {e}") from e


def _last_line(text: str, binary: Path) -> str:
    lines = [line.removeprefix(f"{binary}: ").removeprefix(f"{binary.name}: ").strip()
             for line in text.strip().splitlines()]
    return lines[-1] if lines else "no output"


@functools.lru_cache(maxsize=None)
def probe(binary: Path) -> QemuCaps:
    """The version of `binary` and whether it takes kvmpod's -sandbox options (remembered per binary)."""
    identity = binary_identity(binary)
    key = json.dumps(identity, sort_keys=True)
    known = _read_caps()
    entry = known.get(key)
    if isinstance(entry, dict) and isinstance(entry.get("version"), list) and len(entry["version"]) == 2:
        return QemuCaps((int(entry["version"][0]), int(entry["version"][1])), bool(entry.get("seccomp")),
                        str(entry.get("why_not", "")))
    proc = _run([str(binary), "-sandbox", SANDBOX_PROBE, "-version"])
    seccomp, why_not = proc.returncode == 0, ""
    if not seccomp:  # QEMU stopped at -sandbox: ask for the version alone
        why_not = _last_line(proc.stderr, binary)
        proc = _run([str(binary), "-version"])
    version = parse_version(proc.stdout)
    if version is None:
        raise VMError(f"{binary}: `-version` printed no QEMU version ({_last_line(proc.stdout + proc.stderr, binary)})")
    caps = QemuCaps(version, seccomp, why_not)
    known[key] = {"version": list(version), "seccomp": seccomp, "why_not": why_not}
    _write_caps(dict(list(known.items())[-16:]))  # the binaries seen last: older ones were replaced
    return caps


# --- kvmpod.toml's [security] (docs/security.md: for measuring what confinement costs only) -----------

def sandbox_setting() -> tuple[bool, str | None]:
    """[security] sandbox: (on, where it was turned off)."""
    found = config.lookup("sandbox", SECTION)
    if found is None:
        return True, None
    if not isinstance(found.value, bool):
        raise ConfigError(f"{found.describe(f'[{SECTION}] sandbox')}: {found.value!r} must be true or false")
    return found.value, None if found.value else found.describe(f"[{SECTION}] sandbox = false")


def user_setting() -> tuple[str | None, str | None]:
    """[security] qemu-user: (the user QEMU runs as when kvmpod is root, or None; where it was turned off)."""
    found = config.lookup("qemu-user", SECTION)
    if found is None:
        return QEMU_USER, None
    if found.value is False:
        return None, found.describe(f"[{SECTION}] qemu-user = false")
    if not isinstance(found.value, str) or not re.fullmatch(r"[a-z_][a-z0-9_-]{0,31}", found.value):
        raise ConfigError(f"{found.describe(f'[{SECTION}] qemu-user')}: {found.value!r} must be a user name or false")
    return found.value, None


# --- the user and the chroot ------------------------------------------------------------------------

def useradd_argv(name: str) -> list[str]:
    return [*USERADD, name]


def ensure_user(name: str) -> pwd.struct_passwd:
    """The system user `name`, created (useradd) if it is not there. Raises VMError naming the fix."""
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        argv = useradd_argv(name)
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL)
            lines = (proc.stderr or proc.stdout).strip().splitlines()
            why = lines[-1].strip() if proc.returncode and lines else ""
        except OSError as e:
            why = f"{argv[0]}: {e.strerror}"
        try:
            entry = pwd.getpwnam(name)  # made, or made meanwhile by another pod's kvmpod
        except KeyError:
            raise VMError(f"cannot create the system user {name} that QEMU runs as ({why or 'useradd made no user'}): "
                          f"create it with `{shlex.join(argv)}`, or set "
                          f"[{SECTION}] qemu-user = false in kvmpod.toml to run QEMU as root") from None
    if entry.pw_uid == 0 or entry.pw_gid == 0:
        raise VMError(f"user {name} (uid {entry.pw_uid}, gid {entry.pw_gid}) is root: QEMU must switch to an "
                      f"unprivileged user ([{SECTION}] qemu-user in kvmpod.toml)")
    return entry


def chroot_dir(resolv_conf: Path = Path("/etc/resolv.conf")) -> Path:
    """The directory QEMU chroots into: <runtime dir>/qemu-root, root's, mode 0555, made once. It is
    empty but for etc/resolv.conf, a copy of the host's (mode 0444, refreshed at each pod's start):
    --net user's DNS proxy (libslirp, inside QEMU) reads /etc/resolv.conf when the guest asks."""
    path = paths.runtime_dir() / CHROOT_NAME
    etc = path / "etc"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for directory in (path, etc):
            with contextlib.suppress(FileExistsError):
                directory.mkdir(mode=0o555)
        entries = {p.relative_to(path) for p in path.rglob("*")}
        dirs = [os.lstat(d) for d in (path, etc)]
        _refresh_copy(resolv_conf, etc / "resolv.conf")
    except OSError as e:
        raise VMError(f"{path}: cannot make QEMU's chroot directory: {e.strerror or e}") from e
    if (not all(stat.S_ISDIR(st.st_mode) and st.st_uid == 0 and not st.st_mode & 0o222 for st in dirs)
            or not entries <= {Path("etc"), Path("etc/resolv.conf")}):
        raise VMError(f"{path}: QEMU's chroot must be a directory of root's that nobody can write, holding nothing "
                      "but etc/resolv.conf (remove it: kvmpod makes it again)")
    return path


def _refresh_copy(source: Path, copy: Path) -> None:
    """`copy` holds what `source` holds now (nothing if there is none), written only when it changed."""
    try:
        text = source.read_bytes()
    except FileNotFoundError:
        text = b""
    try:
        if copy.read_bytes() == text and not os.lstat(copy).st_mode & 0o222:
            return
    except FileNotFoundError:
        pass
    tmp = copy.with_name(f".{copy.name}.{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):  # a leftover of a killed kvmpod
        tmp.chmod(0o600)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, text)
        os.fchmod(fd, 0o444)
    finally:
        os.close(fd)
    os.rename(tmp, copy)   # in a 0555 directory: root writes it (DAC_OVERRIDE), QEMU's user cannot


# --- the decision -------------------------------------------------------------------------------------

def confinement(binary: Path, *, is_root: bool, shares_9p: bool) -> tuple[Confinement, list[str]]:
    """How the QEMU `binary` of a pod confines itself, and the notices for what it does without."""
    caps = probe(binary)
    notices = []
    seccomp, sandbox_off = sandbox_setting()
    if sandbox_off:
        notices.append(f"QEMU runs without its seccomp sandbox: {sandbox_off} (for measuring only)")
    elif not caps.seccomp:
        seccomp = False
        notices.append(f"QEMU {binary} has no seccomp support ({caps.why_not}): its syscalls are not filtered "
                       "(`kvmpod setup --only qemu` builds a QEMU that has it)")
    user, chroot = None, None
    if is_root:
        name, user_off = user_setting()
        if user_off:
            notices.append(f"QEMU runs as root: {user_off} (for measuring only)")
        elif shares_9p:
            notices.append("QEMU runs as root, without a chroot: it serves the pod's host volumes over virtio-9p "
                           "itself, which keeps file owners only as root (virtiofsd, in qemu-system-common, "
                           "would serve them instead)")
        elif name is not None:
            ensure_user(name)
            user, chroot = name, chroot_dir()
    return Confinement(seccomp=seccomp, elevate_privileges="allow" if user else "deny", user=user,
                       chroot=chroot, version=caps.version), notices


def describe(c: Confinement) -> str:
    """For --debug: the confinement in words."""
    return (f"seccomp {'on' if c.seccomp else 'off'} (elevateprivileges={c.elevate_privileges}), "
            f"user {c.user or ('root' if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name)}, "
            f"chroot {c.chroot or 'none'}")
