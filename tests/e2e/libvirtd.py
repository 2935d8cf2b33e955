"""A real libvirt daemon for the libvirt backend's tests (docs/libvirt.md): started and stopped here for
tests/e2e/libvirt/ (the host's network namespace, user-mode networks) and tests/e2e/libvirt_net/ (one
inside a network namespace the test made, for kvmpod's bridge). Each package holds its daemon for its
own tests only, and pytest runs packages one after another, so two daemons never share /run/libvirt.

The daemon: the machine's own if `qemu:///system` answers (host namespace only); else one started with
sockets of its own (libvirtd -f a config in a temp dir: the URI carries `?socket=`), with virtlogd,
which libvirt's QEMU driver needs for QEMU's logs, under tests/reaper.py. On a host without udev
/dev/kvm is root's alone and libvirt then probes QEMU again on every call (it checks /dev/kvm as its
QEMU user): it gets the group and mode Debian's udev rules give (kvm, 0660) while the daemon runs.
"""

from __future__ import annotations

import contextlib
import grp
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from kvmpod.vm import cgroup

SYSTEM_URI = "qemu:///system"
REAPER = Path(__file__).resolve().parents[1] / "reaper.py"
QEMU_LOGS = Path("/var/log/libvirt/qemu")
WHY_NOT = None
if os.geteuid() != 0:
    WHY_NOT = "the libvirt tests start a system libvirtd, which needs root"
elif shutil.which("libvirtd") is None or shutil.which("virsh") is None:
    WHY_NOT = "libvirtd/virsh not installed (make libvirt-deps)"
elif importlib.util.find_spec("libvirt") is None:
    WHY_NOT = "libvirt-python not installed in the venv (pip install '.[libvirt]')"


def virsh(uri: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["virsh", "-q", "-c", uri, *args], capture_output=True, text=True, timeout=60, check=check)


def answers(uri: str) -> bool:
    try:
        return virsh(uri, "version", check=False).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def _pid_alive(pidfile: Path) -> int | None:
    try:
        pid = int(pidfile.read_text())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


def domains(uri: str) -> list[str]:
    return [n for n in virsh(uri, "list", "--all", "--name", check=False).stdout.split() if n.startswith("kvmpod-")]


@contextlib.contextmanager
def kvmpod_dirs() -> Iterator[dict[str, str]]:
    """As tests/conftest.py's, in a directory libvirt's QEMU user can pass through (0711: it opens the
    kernel and the store's images itself, and pytest's temp dirs are root's alone)."""
    base = Path(tempfile.mkdtemp(prefix="kvt-libvirt-dirs-", dir="/tmp"))
    os.chmod(base, 0o711)
    config = base / "config" / "kvmpod" / "kvmpod.toml"
    config.parent.mkdir(parents=True)
    config.write_text('[net]\ndefault = "none"\n')
    env = {"KVMPOD_STORE_DIR": str(base / "store"), "KVMPOD_RUN_DIR": str(base / "run"),
           "KVMPOD_AUDIT_LOG": str(base / "audit.log"), "XDG_CONFIG_HOME": str(base / "config"),
           "KVMPOD_SNAPSHOT_DIR": str(base / "snapshots")}
    try:
        yield env
    finally:
        cgroup.sweep(lambda leaf: False, parent=cgroup.parent_name(Path(env["KVMPOD_RUN_DIR"])))
        shutil.rmtree(base, ignore_errors=True)


@contextlib.contextmanager
def _kvm_as_udev_has_it() -> Iterator[None]:
    kvm = Path("/dev/kvm")
    kvm_mode = None
    if kvm.exists():
        st = kvm.stat()
        try:
            kvm_gid = grp.getgrnam("kvm").gr_gid
        except KeyError:
            kvm_gid = None
        if kvm_gid is not None and st.st_gid != kvm_gid:
            kvm_mode = (st.st_uid, st.st_gid, st.st_mode & 0o7777)
            os.chown(kvm, 0, kvm_gid)
            os.chmod(kvm, 0o660)
    try:
        yield
    finally:
        if kvm_mode is not None:
            os.chown(kvm, kvm_mode[0], kvm_mode[1])
            os.chmod(kvm, kvm_mode[2])


def machine_cgroups() -> set[Path]:
    """The cgroups libvirt made for kvmpod's domains (`machine/qemu-N-kvmpod-….libvirt-qemu`, in any
    hierarchy), which it removes when a domain ends."""
    return set(Path("/sys/fs/cgroup").glob("*/machine/qemu-*-kvmpod-*")) | set(
        Path("/sys/fs/cgroup").glob("machine/qemu-*-kvmpod-*"))


def _remove_cgroup_tree(path: Path) -> None:
    for sub in sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            sub.rmdir()
    with contextlib.suppress(OSError):
        path.rmdir()


@contextlib.contextmanager
def libvirt_daemon(netns: str | None = None) -> Iterator[str]:
    """The URI of a libvirt daemon: the machine's (when no `netns` is asked for and it answers), else
    one started here — inside the network namespace `netns` if given — and stopped after. Asserts on
    the way out that no `kvmpod-*` domain is left and none of their cgroups (removing any), and removes
    the logs libvirt kept of the domains."""
    with _kvm_as_udev_has_it():
        started: list[Path] = []
        reaper = None
        logs_before = set(QEMU_LOGS.glob("kvmpod-*.log*"))   # libvirt keeps a log per domain: ours go after
        cgroups_before = machine_cgroups()
        work = Path(tempfile.mkdtemp(prefix="kvt-libvirt-"))
        uri = SYSTEM_URI
        try:
            if netns is not None or not answers(SYSTEM_URI):
                if _pid_alive(Path("/run/libvirt/virtlogd.pid")) is None and not Path("/run/libvirt/virtlogd-sock").exists():
                    subprocess.run(["virtlogd", "-d", "-p", str(work / "virtlogd.pid")], check=True)
                    started.append(work / "virtlogd.pid")
                (work / "libvirtd.conf").write_text(
                    f'unix_sock_dir = "{work}"\nunix_sock_rw_perms = "0700"\nauth_unix_rw = "none"\n'
                    'auth_unix_ro = "none"\nlog_outputs = "3:stderr"\n')
                # under a reaper of its own: this machine's PID 1 reaps orphans late, and libvirt waits for
                # a killed QEMU to vanish before it reports the domain's end (tests/reaper.py)
                # nsenter, not `ip netns exec`: that one mounts a sysfs of the namespace's over /sys, which
                # hides the cgroup hierarchies under /sys/fs/cgroup from libvirtd
                inside = ["nsenter", f"--net=/run/netns/{netns}"] if netns is not None else []
                reaper = subprocess.Popen([*inside, sys.executable, str(REAPER), "libvirtd", "-d",
                                           "-f", str(work / "libvirtd.conf"), "-p", str(work / "libvirtd.pid")],
                                          start_new_session=True)
                started.append(work / "libvirtd.pid")
                uri = f"{SYSTEM_URI}?socket={work}/libvirt-sock"
                deadline = time.time() + 60
                while not answers(uri):
                    assert time.time() < deadline, "the libvirtd these tests started does not answer"
                    time.sleep(0.2)
            yield uri
            assert domains(uri) == [], f"libvirt domains outlived the libvirt tests: {domains(uri)}"
            deadline = time.time() + 10   # libvirt removes a domain's cgroups as it reports the domain's end
            while (machine_cgroups() - cgroups_before) and time.time() < deadline:
                time.sleep(0.2)
            left = sorted(str(p) for p in machine_cgroups() - cgroups_before)
            assert left == [], f"cgroups of ended libvirt domains are left: {left}"
        finally:
            for pidfile in reversed(started):   # libvirtd first, then virtlogd
                if (pid := _pid_alive(pidfile)) is not None:
                    os.kill(pid, signal.SIGTERM)
                    deadline = time.time() + 30
                    while _pid_alive(pidfile) is not None and time.time() < deadline:
                        time.sleep(0.1)
            if reaper is not None:
                reaper.wait(timeout=30)
            for log in set(QEMU_LOGS.glob("kvmpod-*.log*")) - logs_before:
                log.unlink(missing_ok=True)
            for cgroup in machine_cgroups() - cgroups_before:   # the next tests start clean
                _remove_cgroup_tree(cgroup)
            shutil.rmtree(work, ignore_errors=True)


def wait_no_domain(uri: str, timeout: float = 15) -> list[str]:
    """The `kvmpod-*` domains still there after up to `timeout` s (libvirt may take a moment to report a
    destroyed transient domain gone)."""
    deadline = time.time() + timeout
    while domains(uri) and time.time() < deadline:
        time.sleep(0.2)
    return domains(uri)
