"""Least privilege around the VMM (docs/security.md), on real pods started as root: QEMU under its seccomp
filter, as the kvmpod-qemu user, chrooted into an empty directory; virtiofsd under its own sandbox; a
call the filter denies (QEMU made to exec a helper) kills QEMU before the helper runs, and the pod says
so; kvmpod.toml's [security] switches turn both off."""

from __future__ import annotations

import json
import os
import pwd
import subprocess
from pathlib import Path

import pytest

from tests.conftest import kvmpod_cmd
from tests.e2e.conftest import VM_TIMEOUT, Kvmpod, the_error

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the user switch and the chroot are root's")

SLEEP = ("--exec", "/bin/sh", "--", "-c", "sleep 60")


def status_of(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {key: value.strip() for key, _, value in (line.partition(":") for line in lines)}


def running(kvmpod: Kvmpod, *args: str) -> tuple[subprocess.Popen, dict]:
    proc = kvmpod.popen(*args)
    return proc, kvmpod.wait_for_running_pod(proc)


def stop(proc: subprocess.Popen) -> bytes:
    """SIGTERM to the pod (its app gets it); its stderr."""
    proc.terminate()
    return proc.communicate(timeout=60)[1]


def run_with(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(kvmpod_cmd("run", *args), capture_output=True, env=env, timeout=VM_TIMEOUT)


@pytest.mark.parametrize("boot", ["cold", "snapshot"])
def test_a_root_pods_qemu_is_filtered_unprivileged_and_chrooted(kvmpod, kvmpod_env, busybox_aci, boot):
    user = pwd.getpwnam("kvmpod-qemu") if boot == "snapshot" else None   # the cold run may make it
    proc, state = running(kvmpod, f"--boot={boot}", str(busybox_aci), *SLEEP)
    try:
        user = user or pwd.getpwnam("kvmpod-qemu")
        status = status_of(state["qemu_pid"])
        assert status["Seccomp"] == "2" and status["NoNewPrivs"] == "1"
        assert status["Uid"].split() == [str(user.pw_uid)] * 4 and status["Gid"].split() == [str(user.pw_gid)] * 4
        assert user.pw_uid != 0 and user.pw_gid != 0
        assert status["Groups"] == str(user.pw_gid)
        assert status["CapEff"] == status["CapPrm"] == "0000000000000000"
        root = Path(kvmpod_env["KVMPOD_RUN_DIR"]) / "qemu-root"
        assert os.readlink(f"/proc/{state['qemu_pid']}/root") == str(root)
        assert sorted(str(p.relative_to(root)) for p in root.rglob("*")) == ["etc", "etc/resolv.conf"]
        assert root.stat().st_uid == 0 and root.stat().st_mode & 0o777 == 0o555
    finally:
        stop(proc)
    assert proc.returncode == 128 + 15, proc.stderr   # the app got the SIGTERM: the pod ran to its end


def test_debug_shows_the_sandbox_user_and_chroot_of_qemu(kvmpod, kvmpod_env, busybox_aci):
    result = kvmpod.run("--debug", "--boot=cold", str(busybox_aci))
    assert result.returncode == 0, result.stderr
    argv_line = next(line for line in result.stderr.decode().splitlines() if "qemu argv:" in line)
    root = Path(kvmpod_env["KVMPOD_RUN_DIR"]) / "qemu-root"
    assert "'-sandbox', 'on,obsolete=deny,elevateprivileges=allow,spawn=deny,resourcecontrol=deny'" in argv_line
    assert f"'-chroot', '{root}', '-runas', 'kvmpod-qemu'" in argv_line
    assert (f"QEMU confinement: seccomp on (elevateprivileges=allow), user kvmpod-qemu, chroot {root}"
            in result.stderr.decode())


def test_virtiofsd_of_a_host_volume_pod_is_sandboxed_and_qemu_still_unprivileged(kvmpod, busybox_aci, tmp_path):
    share = tmp_path / "share"
    share.mkdir()
    (share / "in").write_text("from the host\n")
    proc, state = running(kvmpod, "--volume", f"h,kind=host,source={share}", str(busybox_aci),
                          "--mount", "volume=h,target=/h", "--exec", "/bin/sh", "--", "-c",
                          "cat /h/in > /h/part && mv /h/part /h/out; sleep 60")
    try:
        assert state["virtiofsd_pids"]
        for pid in state["virtiofsd_pids"]:
            # the C virtiofsd: the process kvmpod started only waits (no capabilities left at all); its
            # child serves, in new mount, pid and net namespaces, under seccomp, with fewer capabilities
            waiter = status_of(pid)
            assert waiter["CapEff"] == waiter["CapBnd"] == "0000000000000000"
            [worker] = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            status = status_of(int(worker))
            assert status["Seccomp"] == "2" and status["NoNewPrivs"] == "1"
            assert status["CapBnd"] == "0000000000000000"
            caps = int(status["CapEff"], 16)
            assert caps and not caps & (1 << 27) and not caps & (1 << 31)   # no CAP_MKNOD, no CAP_SETFCAP
            assert not caps & (1 << 21)   # nor CAP_SYS_ADMIN
            assert len(status["NSpid"].split()) == 2   # pid 1 of a pid namespace of its own
            for ns in ("mnt", "net", "pid"):
                assert os.readlink(f"/proc/{worker}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}")
        assert status_of(state["qemu_pid"])["Uid"].split()[0] == str(pwd.getpwnam("kvmpod-qemu").pw_uid)
        for _ in range(300):
            if (share / "out").exists():
                break
            subprocess.run(["sleep", "0.1"])
        assert (share / "out").read_text() == "from the host\n"
        assert (share / "out").stat().st_uid == 0   # virtiofsd (root) keeps owners; QEMU never touches files
    finally:
        stop(proc)


def test_9p_host_volumes_keep_a_root_qemu_with_one_notice(kvmpod, kvmpod_env, busybox_aci, tmp_path):
    share = tmp_path / "share"
    share.mkdir()
    env = dict(kvmpod_env, KVMPOD_VOLUME_TRANSPORT="9p")
    result = run_with(env, "--volume", f"h,kind=host,source={share}", str(busybox_aci), "--mount", "volume=h,target=/h",
                      "--exec", "/bin/sh", "--", "-c", "echo x > /h/f")
    assert result.returncode == 0, result.stderr
    notices = [line for line in result.stderr.decode().splitlines() if "QEMU runs as root" in line]
    assert len(notices) == 1 and "virtio-9p" in notices[0]
    assert (share / "f").stat().st_uid == 0


def test_qemu_made_to_exec_a_helper_is_killed_by_its_filter_before_the_helper_runs(kvmpod, kvmpod_env, busybox_aci,
                                                                                   tmp_path):
    marker = tmp_path / "helper-ran"
    helper = tmp_path / "helper"
    helper.write_text(f"#!/bin/sh\ntouch {marker}\n")
    helper.chmod(0o755)
    # -netdev bridge forks and execs its helper (QEMU's qemu-bridge-helper): the spawn=deny part of the filter
    command = json.dumps({"execute": "netdev_add", "arguments": {"type": "bridge", "id": "h", "br": "kvmpod-none",
                                                                  "helper": str(helper)}})
    env = dict(kvmpod_env, KVMPOD_TEST_QMP=command)
    sandboxed = run_with(env, "--boot=cold", str(busybox_aci), "--exec", "/bin/sh", "--", "-c", "sleep 3")
    assert sandboxed.returncode == 125
    assert the_error(sandboxed) == ("kvmpod: error: the VM ended before the app finished: QEMU was killed by its "
                                    "seccomp sandbox (SIGSYS): it made a system call the sandbox denies")
    assert not marker.exists()
    # the same command with both switches off: the helper runs (and QEMU, given no fd back, refuses the
    # netdev), and the pod goes on — so it is the filter that stopped it above
    off = tmp_path / "off.toml"
    off.write_text("[security]\nsandbox = false\nqemu-user = false\n")
    unconfined = run_with(dict(env, KVMPOD_CONFIG=str(off)), "--boot=cold", str(busybox_aci), "--exec", "/bin/sh",
                          "--", "-c", "echo went on")
    assert unconfined.returncode == 0, unconfined.stderr
    assert unconfined.stdout == b"went on\n"
    assert marker.exists()


def test_a_call_the_filter_refuses_fails_and_the_pod_goes_on(kvmpod_env, busybox_aci, tmp_path):
    # QEMU 7.2's filter answers what it denies in two ways: a process clone (spawn) is trapped, and kills
    # QEMU (above); resource control (sched_setaffinity, setpriority, ...) gets EPERM, and only the request
    # that made it fails. A thread context pinned to a CPU sets its thread's affinity.
    command = json.dumps({"execute": "object-add", "arguments": {"qom-type": "thread-context", "id": "tc",
                                                                "cpu-affinity": [0]}})
    env = dict(kvmpod_env, KVMPOD_TEST_QMP=command)
    sandboxed = run_with(env, "--boot=cold", str(busybox_aci), "--exec", "/bin/sh", "--", "-c", "echo went on")
    assert sandboxed.returncode == 0, sandboxed.stderr
    assert sandboxed.stdout == b"went on\n"
    answer = [line for line in sandboxed.stderr.decode().splitlines() if line.startswith("kvmpod: test QMP")]
    assert len(answer) == 1 and "Operation not permitted" in answer[0], sandboxed.stderr
    off = tmp_path / "off.toml"
    off.write_text("[security]\nsandbox = false\nqemu-user = false\n")
    unconfined = run_with(dict(env, KVMPOD_CONFIG=str(off)), "--boot=cold", str(busybox_aci), "--exec", "/bin/true")
    assert unconfined.returncode == 0, unconfined.stderr
    assert "Operation not permitted" not in unconfined.stderr.decode()   # it is the filter that refused it


def test_the_security_switches_turn_the_filter_and_the_user_off(kvmpod_env, busybox_aci, tmp_path):
    off = tmp_path / "off.toml"
    off.write_text("[security]\nsandbox = false\nqemu-user = false\n")
    switched_off = Kvmpod(dict(kvmpod_env, KVMPOD_CONFIG=str(off)))
    proc, state = running(switched_off, "--boot=cold", str(busybox_aci), *SLEEP)
    try:
        status = status_of(state["qemu_pid"])
        assert status["Seccomp"] == "0" and status["Uid"].split()[0] == "0"
        assert os.readlink(f"/proc/{state['qemu_pid']}/root") == "/"
    finally:
        stderr = stop(proc)
    assert [line for line in stderr.decode().splitlines() if "(for measuring only)" in line] == [
        f"kvmpod: notice: QEMU runs without its seccomp sandbox: [security] sandbox = false in {off} (for measuring only)",
        f"kvmpod: notice: QEMU runs as root: [security] qemu-user = false in {off} (for measuring only)"]


def test_a_guest_that_remounts_a_read_only_host_volume_still_cannot_write_it(kvmpod, busybox_rootfs, tmp_path):
    """virtiofsd has no read-only mode: it serves a read-only bind of the source, so the host refuses
    what a guest with CAP_SYS_ADMIN writes after `mount -o remount,rw`."""
    import io
    import tarfile

    manifest = {"acKind": "ImageManifest", "acVersion": "0.8.11", "name": "example.com/admin",
                "labels": [{"name": "os", "value": "linux"}, {"name": "arch", "value": "amd64"}],
                "app": {"exec": ["/bin/true"], "user": "0", "group": "0", "isolators": [
                    {"name": "os/linux/capabilities-retain-set", "value": {"set": ["CAP_SYS_ADMIN"]}}]}}
    image = tmp_path / "admin.aci"
    with tarfile.open(image, "w") as tar:
        data = json.dumps(manifest).encode()
        info = tarfile.TarInfo("manifest")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
        tar.add(busybox_rootfs, arcname="rootfs")
    frozen = tmp_path / "frozen"
    frozen.mkdir()
    (frozen / "f").write_text("kept\n")
    result = kvmpod.run("--volume", f"ro,kind=host,source={frozen},readOnly=true", str(image),
                        "--mount", "volume=ro,target=/ro", "--exec", "/bin/sh", "--", "-c",
                        "mount -o remount,rw /ro && grep -q ' /ro virtiofs rw,' /proc/mounts && echo remounted; "
                        "echo changed > /ro/f; echo new > /ro/g; mkdir /ro/d; true")
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"remounted\n"
    assert result.stderr.decode().count("Read-only file system") == 3, result.stderr
    assert (frozen / "f").read_text() == "kept\n" and sorted(p.name for p in frozen.iterdir()) == ["f"]


@pytest.mark.parametrize("boot", ["cold", "snapshot"])
def test_qemu_dies_with_a_killed_kvmpod_after_its_user_switch(kvmpod, kvmpod_env, busybox_aci, boot):
    """PR_SET_PDEATHSIG does not survive QEMU's -runas: its death line (kvmpod/vm/hangup.py) does."""
    import signal
    import time

    from tests.e2e.conftest import proc_alive

    proc, state = running(kvmpod, f"--boot={boot}", str(busybox_aci), *SLEEP)
    qemu = state["qemu_pid"]
    assert status_of(qemu)["Uid"].split()[0] != "0"
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    deadline = time.time() + 10
    while proc_alive(qemu) and time.time() < deadline:
        time.sleep(0.05)
    assert not proc_alive(qemu), "QEMU outlived its kvmpod"
    assert subprocess.run(kvmpod_cmd("gc"), env=kvmpod_env, capture_output=True, timeout=60).returncode == 0
