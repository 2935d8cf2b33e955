"""A real libvirt daemon for the libvirt backend's tests (docs/libvirt.md), and the `backend` parameter
that runs the core e2e set on both backends.

The daemon: the machine's own if `qemu:///system` answers; else one these tests start with sockets of
their own (libvirtd -f a config in a temp dir: the URI carries `?socket=`), with virtlogd, which
libvirt's QEMU driver needs for QEMU's logs, and stop after. On a host without udev /dev/kvm is
root's alone and libvirt then probes QEMU again on every call (it checks /dev/kvm as its QEMU user):
these tests give it the group and mode Debian's udev rules give (kvm, 0660) for the session and put
it back after.
"""

from __future__ import annotations

import grp
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from kvmpod.vm import cgroup
from tests.conftest import kvmpod_cmd
from tests.e2e.conftest import VM_TIMEOUT, Kvmpod

SYSTEM_URI = "qemu:///system"
REAPER = Path(__file__).resolve().parents[2] / "reaper.py"
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


def _answers(uri: str) -> bool:
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


@pytest.fixture(scope="package")
def kvmpod_dirs():
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
    yield env
    cgroup.sweep(lambda leaf: False, parent=cgroup.parent_name(Path(env["KVMPOD_RUN_DIR"])))
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="package")   # the daemon stops after this directory's tests, not at the session's end
def libvirt_uri():
    if WHY_NOT:
        pytest.skip(WHY_NOT)
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
    started: list[Path] = []
    reaper = None
    logs_before = set(QEMU_LOGS.glob("kvmpod-*.log*"))   # libvirt keeps a log per domain: ours go after
    work = Path(tempfile.mkdtemp(prefix="kvt-libvirt-"))
    uri = SYSTEM_URI
    try:
        if not _answers(SYSTEM_URI):
            if _pid_alive(Path("/run/libvirt/virtlogd.pid")) is None and not Path("/run/libvirt/virtlogd-sock").exists():
                subprocess.run(["virtlogd", "-d", "-p", str(work / "virtlogd.pid")], check=True)
                started.append(work / "virtlogd.pid")
            (work / "libvirtd.conf").write_text(
                f'unix_sock_dir = "{work}"\nunix_sock_rw_perms = "0700"\nauth_unix_rw = "none"\n'
                'auth_unix_ro = "none"\nlog_outputs = "3:stderr"\n')
            # under a reaper of its own: this machine's PID 1 reaps orphans late, and libvirt waits for
            # a killed QEMU to vanish before it reports the domain's end (tests/reaper.py)
            reaper = subprocess.Popen([sys.executable, str(REAPER), "libvirtd", "-d", "-f", str(work / "libvirtd.conf"),
                              "-p", str(work / "libvirtd.pid")], start_new_session=True)
            started.append(work / "libvirtd.pid")
            uri = f"{SYSTEM_URI}?socket={work}/libvirt-sock"
            deadline = time.time() + 60
            while not _answers(uri):
                assert time.time() < deadline, "the libvirtd these tests started does not answer"
                time.sleep(0.2)
        yield uri
        left = [n for n in virsh(uri, "list", "--all", "--name", check=False).stdout.split() if n.startswith("kvmpod-")]
        assert left == [], f"libvirt domains outlived the libvirt tests: {left}"
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
        shutil.rmtree(work, ignore_errors=True)
        if kvm_mode is not None:
            os.chown(kvm, kvm_mode[0], kvm_mode[1])
            os.chmod(kvm, kvm_mode[2])


def domains(uri: str) -> list[str]:
    return [n for n in virsh(uri, "list", "--all", "--name", check=False).stdout.split() if n.startswith("kvmpod-")]


@pytest.fixture(autouse=True)
def no_domain_left(request):
    """After every test here that used libvirt: no domain of kvmpod's (libvirt may take a moment to
    report a destroyed transient domain gone)."""
    yield
    callspec = getattr(request.node, "callspec", None)
    on_libvirt = callspec is not None and callspec.params.get("backend") == "libvirt"
    if "libvirt_uri" not in request.fixturenames and not on_libvirt:
        return
    uri = request.getfixturevalue("libvirt_uri")
    deadline = time.time() + 15
    while domains(uri) and time.time() < deadline:
        time.sleep(0.2)
    assert domains(uri) == [], "a libvirt domain outlived its pod"


class BackendKvmpod(Kvmpod):
    """`kvmpod run` on one backend: the libvirt one gets --backend libvirt --libvirt-uri."""

    def __init__(self, env: dict[str, str], backend_args: list[str]):
        super().__init__(env)
        self.backend_args = backend_args

    def run(self, *args: str, input: bytes | None = None, timeout: float = VM_TIMEOUT) -> subprocess.CompletedProcess:
        return super().run(*self.backend_args, *args, input=input, timeout=timeout)

    def popen(self, *args: str) -> subprocess.Popen:
        return super().popen(*self.backend_args, *args)

    def cmd(self, *args: str, input: bytes | None = None, timeout: float = VM_TIMEOUT) -> subprocess.CompletedProcess:
        """Any kvmpod command (run gets the backend's flags)."""
        if args and args[0] == "run":
            args = ("run", *self.backend_args, *args[1:])
        return subprocess.run(kvmpod_cmd(*args), input=input, capture_output=True, env=self.env, timeout=timeout)

    def detach(self, *run_args: str) -> str:
        result = self.cmd("run", "--detach", *run_args)
        assert result.returncode == 0, result.stderr.decode()
        return result.stdout.decode().strip()


@pytest.fixture(params=["qemu", "libvirt"])
def backend(request) -> str:
    return request.param


@pytest.fixture
def pod_runner(request, backend, kvmpod_env) -> BackendKvmpod:
    if backend == "libvirt":
        uri = request.getfixturevalue("libvirt_uri")
        return BackendKvmpod(kvmpod_env, ["--backend", "libvirt", "--libvirt-uri", uri])
    return BackendKvmpod(kvmpod_env, [])
