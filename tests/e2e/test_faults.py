"""Faults at every phase of `kvmpod run` ($KVMPOD_TEST_FAULT, kvmpod/faults.py): kvmpod SIGKILLed, or its QEMU
killed or frozen, at each; then nothing is left (after `kvmpod gc` and `image gc` where kvmpod itself was
killed), `kvmpod image fsck` passes, and the next pod runs. Also: the store's filesystem full, `image rm` and
`image gc` racing a starting pod, a host volume's source removed mid-run, a guest flooding a slow reader, a
guest that stops answering. Each test has its own store, runtime dir and snapshot cache. docs/reliability.md
lists what each fault left before its fix."""

from __future__ import annotations

import gzip
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from bench.soak import leftovers, private_env
from kvmpod.pod.relay import find_relay
from kvmpod.vm import cgroup
from tests.conftest import kvmpod_cmd
from tests.e2e.conftest import the_error
from tests.e2e.test_net import Netns, web_aci  # noqa: F401 - web_aci: a fixture (busybox with an http port)

SH = ["--exec", "/bin/sh", "--", "-c"]
KILLED = -signal.SIGKILL


@pytest.fixture
def base():
    """Where a test's store, runtime dir and snapshot cache are: short, for the pods' unix sockets."""
    path = Path(tempfile.mkdtemp(prefix="kvmpod-faults-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def kvmpod_env(base, monkeypatch):
    """This module's tests each get a store, runtime dir and snapshot cache of their own (the e2e suite's
    checks after every test look at these)."""
    env = private_env(base)
    for key in ("KVMPOD_STORE_DIR", "KVMPOD_RUN_DIR", "KVMPOD_SNAPSHOT_DIR", "KVMPOD_AUDIT_LOG", "XDG_CONFIG_HOME"):
        monkeypatch.setenv(key, env[key])
    yield env
    cgroup.sweep(lambda leaf: False, parent=cgroup.parent_name(Path(env["KVMPOD_RUN_DIR"])))


def cmd(env, *args, fault: str | None = None, input: bytes | None = None, timeout: float = 240):
    run_env = dict(env, KVMPOD_TEST_FAULT=fault) if fault else env
    return subprocess.run(kvmpod_cmd(*args), input=input, capture_output=True, env=run_env, timeout=timeout)


def fired(result, fault: str) -> bool:
    phase, action = fault.split(":")
    return f"kvmpod: notice: test fault: {action} at {phase}" in result.stderr.decode()


def clean_after(env, base: Path, gc: bool) -> None:
    """Nothing left (after the gcs, if `gc`), the store checks clean, and the next pod runs."""
    if gc:
        assert cmd(env, "gc").returncode == 0
        assert cmd(env, "image", "gc").returncode == 0
    assert leftovers(env, base) == []
    fsck = cmd(env, "image", "fsck")
    assert (fsck.returncode, fsck.stdout) == (0, b""), fsck.stderr
    return None


# phase, action, how the faulty run ends: its exit status and its one error line (None: no error)
CASES = [
    ("import", "kill-self", KILLED, None),
    ("import-commit", "kill-self", KILLED, None),
    ("disk", "kill-self", KILLED, None),
    ("snapshot", "kill-self", KILLED, None),
    ("snapshot", "kill-qemu", 3, None),      # the maker fails, the pod boots cold: it still runs
    ("spawn", "kill-self", KILLED, None),
    ("spawn", "kill-qemu", 125, "kvmpod: error: QEMU failed to start: QEMU was killed by signal 9"),
    ("handshake", "kill-self", KILLED, None),
    ("handshake", "kill-qemu", 125, "kvmpod: error: the VM ended before the app finished: QEMU was killed by signal 9"),
    ("app-start", "kill-self", KILLED, None),
    ("app-start", "kill-qemu", 125, "kvmpod: error: the VM ended before the app finished: QEMU was killed by signal 9"),
    ("relay", "kill-self", KILLED, None),
    ("relay", "kill-qemu", 125, "kvmpod: error: the VM ended before the app finished: QEMU was killed by signal 9"),
    ("teardown", "kill-self", KILLED, None),
    ("teardown", "kill-qemu", 3, None),      # the app had exited: its status stands
]
FIRST_RUN = {"import", "import-commit", "disk", "snapshot"}   # phases only a pod's first run goes through
# what the crash leaves in the store before `image gc`, as `image fsck` reports it
FSCK_BEFORE_GC = {"import": "temporary file of a process that is gone",
                  "import-commit": "blob without a record (an import that was cut short)",
                  "disk": "partial write of a process that is gone"}


@pytest.mark.parametrize("phase, action, status, error", CASES, ids=[f"{p}:{a}" for p, a, _, _ in CASES])
def test_a_fault_at_every_phase_leaves_nothing(kvmpod_env, busybox_aci, base, phase, action, status, error):
    env = kvmpod_env
    app = "exit 3"
    if phase == "relay":
        if find_relay() is None:
            pytest.skip("kvmpod-relay is not built (make -C kvmpod/relay)")
        app = "sleep 3; exit 3"   # quiet for longer than QUIET_FOR: handed to kvmpod-relay
    snapshots = Path(env["KVMPOD_SNAPSHOT_DIR"])
    if phase not in FIRST_RUN:   # imported, disk built, boot snapshot made: the fault hits this pod's own path
        assert cmd(env, "run", str(busybox_aci), *SH, "true").returncode == 0
    made = sorted(p.name for p in snapshots.iterdir()) if snapshots.is_dir() else []
    fault = f"{phase}:{action}"
    result = cmd(env, "run", str(busybox_aci), *SH, app, fault=fault)
    assert fired(result, fault), result.stderr
    if phase not in FIRST_RUN:   # a killed QEMU (or kvmpod) costs no boot snapshot: the next pod restores it
        assert "did not restore" not in result.stderr.decode()
        assert sorted(p.name for p in snapshots.iterdir()) == made
    assert result.returncode == status, result.stderr
    if error is not None:
        assert the_error(result) == error
    elif status != KILLED:
        assert [line for line in result.stderr.decode().splitlines() if "error" in line] == []
    if phase in FSCK_BEFORE_GC:   # the crash's leftover in the store, found; and what --repair does of it
        fsck = cmd(env, "image", "fsck")
        assert fsck.returncode == 1 and FSCK_BEFORE_GC[phase] in fsck.stdout.decode(), fsck
        repaired = cmd(env, "image", "fsck", "--repair")
        assert repaired.returncode == 0 and repaired.stdout.startswith(b"repaired: removed "), repaired
    if status != KILLED:   # kvmpod saw the fault: it cleaned up by itself
        assert leftovers(env, base) == []
    clean_after(env, base, gc=status == KILLED)
    after = cmd(env, "run", str(busybox_aci), *SH, "exit 4")
    assert after.returncode == 4, after.stderr
    assert "did not restore" not in after.stderr.decode()   # a killed QEMU did not cost the boot snapshot
    assert leftovers(env, base) == []


def test_a_pod_with_a_host_volume_killed_leaves_no_virtiofsd(kvmpod_env, busybox_aci, tmp_path, base):
    share = tmp_path / "share"
    share.mkdir()
    result = cmd(kvmpod_env, "run", "--volume", f"v,kind=host,source={share}", str(busybox_aci),
                 "--mount", "volume=v,target=/v", *SH, "echo x > /v/out", fault="app-start:kill-self")
    assert result.returncode == KILLED and fired(result, "app-start:kill-self"), result.stderr
    clean_after(kvmpod_env, base, gc=True)


def _tmpfs(path: Path, size: int):
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting the small tmpfs needs root")
def test_a_full_store_during_import_and_disk_build_is_one_line_and_leaves_the_store_intact(
        kvmpod_env, busybox_aci, tmp_path, base):
    tar_size = len(gzip.decompress(busybox_aci.read_bytes()))
    full = tmp_path / "full"
    env = kvmpod_env
    for size, failing in ((tar_size // 2, "cannot import it into"), (tar_size + (256 << 10), "cannot write the rootfs disk")):
        _tmpfs(full, size)
        try:
            result = cmd(env, "--dir", str(full), "run", str(busybox_aci), *SH, "true")
            assert result.returncode == 125
            error = the_error(result)
            assert failing in error and error.endswith("No space left on device"), error
            fsck = cmd(env, "--dir", str(full), "image", "fsck")
            assert (fsck.returncode, fsck.stdout) == (0, b""), fsck
            assert list((full / "tmp").iterdir()) == []
            assert [p.name for p in (full / "rootfs").iterdir()] == []
        finally:
            subprocess.run(["umount", str(full)], check=True)
            full.rmdir()
    assert leftovers(env, base) == []


def _wait_stopped(proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        if Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T":
            return
        time.sleep(0.05)
    raise AssertionError("kvmpod never reached the fault site")


@pytest.mark.parametrize("phase", ["import", "import-commit", "disk"])
def test_image_rm_and_gc_racing_a_starting_pod(kvmpod_env, busybox_aci, base, phase):
    """kvmpod stopped (SIGSTOP) at a point of its start where the store is mid-change; meanwhile `image gc`,
    `image rm` and `image fsck` run; then it goes on and the pod runs."""
    env = kvmpod_env
    proc = subprocess.Popen(kvmpod_cmd("run", str(busybox_aci), *SH, "exit 5"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=dict(env, KVMPOD_TEST_FAULT=f"{phase}:stop-self"))
    try:
        _wait_stopped(proc)
        store = Path(env["KVMPOD_STORE_DIR"])
        before = sorted(str(p.relative_to(store)) for p in store.rglob("*") if not p.name.endswith((".lock", ".use")))
        assert cmd(env, "image", "gc").returncode == 0
        fsck = cmd(env, "image", "fsck")
        assert (fsck.returncode, fsck.stdout) == (0, b""), fsck   # what a live kvmpod writes is no problem
        removed = cmd(env, "image", "rm", "example.com/busybox")
        assert removed.returncode == 125
        if phase == "disk":   # the pod has claimed its image: refused
            assert b"in use by a running pod" in removed.stderr, removed.stderr
        else:                 # not recorded yet: nothing to remove
            assert b"no such image in the store" in removed.stderr, removed.stderr
        after = sorted(str(p.relative_to(store)) for p in store.rglob("*") if not p.name.endswith((".lock", ".use")))
        assert after == before   # gc took nothing from under the starting pod
    finally:
        proc.send_signal(signal.SIGCONT)
        out, err = proc.communicate(timeout=240)
    assert proc.returncode == 5, err
    clean_after(env, base, gc=False)


def test_a_host_volumes_source_removed_mid_run(kvmpod_env, busybox_aci, tmp_path, base, kvmpod):
    share = tmp_path / "share"
    share.mkdir()
    (share / "before").write_text("x")
    kvmpod.env = kvmpod_env
    proc = kvmpod.popen("--volume", f"v,kind=host,source={share}", str(busybox_aci), "--mount", "volume=v,target=/v",
                        *SH, "while [ -e /v/before ]; do sleep 0.2; done; ls -a /v; echo listed; "
                             "echo new > /v/new; echo wrote=$?")
    kvmpod.wait_for_running_pod(proc)
    shutil.rmtree(share)
    out, err = proc.communicate(timeout=240)
    # the guest sees the directory go; virtiofsd keeps serving the deleted directory it holds open
    assert proc.returncode == 0, err
    lines = out.decode().splitlines()
    assert "listed" in lines and "wrote=1" in lines, out   # a write into the deleted directory is refused
    assert not share.exists()   # nothing made it again on the host
    assert leftovers(kvmpod_env, base) == []


def _rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


FLOOD_MIB = 100


def _flood(env, aci: Path, pause: float) -> tuple[int, int, int]:
    """A guest writing FLOOD_MIB MiB to stdout as fast as it can, read 64 KiB at a time with `pause` s
    between reads: (kvmpod's exit status, bytes read, kvmpod's peak RSS in KiB)."""
    proc = subprocess.Popen(kvmpod_cmd("run", str(aci), *SH, f"dd if=/dev/zero bs=65536 count={FLOOD_MIB * 16} "
                                                            "2>/dev/null"),
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    peak = [0]

    def watch() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], _rss_kib(proc.pid))
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    total = 0
    while data := os.read(proc.stdout.fileno(), 65536):
        total += len(data)
        if pause:
            time.sleep(pause)
    proc.wait(timeout=240)
    watcher.join()
    return proc.returncode, total, peak[0]


def test_a_guest_flooding_a_slow_reader_keeps_kvmpod_bounded(kvmpod_env, busybox_aci, base):
    """kvmpod stops reading the guest while its stdout is full: the flood waits in the guest, not in kvmpod's
    memory. Measured peak RSS: docs/reliability.md."""
    assert cmd(kvmpod_env, "run", str(busybox_aci), *SH, "true").returncode == 0   # snapshot made
    fast = _flood(kvmpod_env, busybox_aci, 0)
    slow = _flood(kvmpod_env, busybox_aci, 0.005)   # ~12 MiB/s: slower than the guest writes under TCG
    assert fast[:2] == slow[:2] == (0, FLOOD_MIB << 20)
    print(f"kvmpod peak RSS: fast reader {fast[2]} KiB, slow reader {slow[2]} KiB")
    assert slow[2] < fast[2] + 16 * 1024, (fast, slow)   # a slow reader costs no buffer to speak of
    assert leftovers(kvmpod_env, base) == []


def test_a_guest_flooding_a_reader_that_reads_nothing_can_still_be_stopped(kvmpod_env, busybox_aci, base, kvmpod):
    """Before OutputPump, kvmpod blocked in write() on its stdout: `kvmpod stop` hung and SIGTERM went
    unheard. Now the output waits in a bounded queue and then in the guest, and the pod ends."""
    kvmpod.env = kvmpod_env
    proc = kvmpod.popen(str(busybox_aci), *SH, "while :; do dd if=/dev/zero bs=65536 count=160 2>/dev/null; done")
    try:
        state = kvmpod.wait_for_running_pod(proc)
        time.sleep(3)   # the pipe, the queue, the channel fill up: nothing reads kvmpod's stdout
        assert _rss_kib(proc.pid) < 64 * 1024
        stopped = cmd(kvmpod_env, "stop", "--timeout", "1", state["uuid"], timeout=120)
        assert stopped.returncode == 0, stopped.stderr
        assert proc.wait(timeout=60) in (128 + signal.SIGKILL, 128 + signal.SIGTERM)
    finally:
        proc.kill()
        proc.communicate()
    assert leftovers(kvmpod_env, base) == []


def test_a_guest_that_stops_answering_at_boot_ends_by_the_boot_timeout(kvmpod_env, busybox_aci, base):
    assert cmd(kvmpod_env, "run", str(busybox_aci), *SH, "true").returncode == 0
    result = cmd(kvmpod_env, "run", "--boot-timeout", "3", str(busybox_aci), *SH, "true", fault="handshake:stop-qemu")
    assert result.returncode == 125 and fired(result, "handshake:stop-qemu")
    assert the_error(result).startswith("kvmpod: error: the guest agent did not answer within 3 s")
    clean_after(kvmpod_env, base, gc=False)


def test_a_guest_that_stops_answering_while_its_app_runs_ends_by_the_run_timeout(kvmpod_env, busybox_aci, base):
    """--timeout stops the pod; the agent answers neither SIGTERM (the stop timeout, 10 s) nor SIGKILL
    (KILL_WAIT, 5 s): the VM is killed and the pod ends 124."""
    assert cmd(kvmpod_env, "run", str(busybox_aci), *SH, "true").returncode == 0
    result = cmd(kvmpod_env, "run", "--timeout", "1", str(busybox_aci), *SH, "sleep 600",
                 fault="app-start:stop-qemu")
    assert result.returncode == 124 and fired(result, "app-start:stop-qemu"), result.stderr
    assert "killed by signal 9" in the_error(result)
    clean_after(kvmpod_env, base, gc=False)


def test_a_runtime_dir_too_deep_for_the_control_socket_is_one_line(kvmpod_env, busybox_aci, base):
    """It was an internal error (AF_UNIX path too long) once QEMU ran; now it is refused before the pod starts."""
    deep = base / ("d" * 80)
    env = dict(kvmpod_env, KVMPOD_RUN_DIR=str(deep))
    result = cmd(env, "run", str(busybox_aci), *SH, "true")
    assert result.returncode == 125
    error = the_error(result)
    assert error.startswith(f"kvmpod: error: {deep}/pods/") and error.endswith(
        "/control.sock: socket path too long for a unix socket (use a shorter runtime dir)")
    assert leftovers(env, base) == []


# bridged pods (the default network, a port forward) in a network namespace of the test's own
NET_CASES = [("spawn", "kill-self"), ("handshake", "kill-self"), ("app-start", "kill-self"),
             ("teardown", "kill-self"), ("handshake", "kill-qemu"), ("app-start", "kill-qemu"),
             ("teardown", "kill-qemu")]


@pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")
@pytest.mark.parametrize("phase, action", NET_CASES, ids=[f"{p}:{a}" for p, a in NET_CASES])
def test_a_fault_in_a_bridged_pod_leaves_no_tap_lease_or_forward(kvmpod_env, base, web_aci, phase, action):
    ns = Netns(kvmpod_env)
    try:
        fault = f"{phase}:{action}"
        ns.env = dict(kvmpod_env, KVMPOD_TEST_FAULT=fault)
        result = ns.kvmpod("run", "--net", "default", "--port", "http:18090", str(web_aci), *SH, "exit 3")
        ns.env = kvmpod_env
        assert fired(result, fault), result.stderr
        if action == "kill-self":
            assert result.returncode == KILLED
            assert ns.kvmpod("gc").returncode == 0
        else:
            assert result.returncode == (3 if phase == "teardown" else 125), result.stderr
        assert ns.leftovers() == []
        assert leftovers(kvmpod_env, base) == []
        again = ns.kvmpod("run", "--net", "default", "--port", "http:18090", str(web_aci), *SH, "exit 4")
        assert again.returncode == 4, again.stderr   # the address and the port are free again
        assert ns.leftovers() == []
    finally:
        ns.delete()


@pytest.mark.skipif(find_relay() is None, reason="kvmpod-relay is not built (make -C kvmpod/relay)")
def test_kvmpod_relay_killed_and_a_kvmpod_killed_after_coming_back_leave_nothing(kvmpod_env, busybox_aci, base):
    """The pod's process while it is kvmpod-relay (SIGKILLed by the test), and once it has come back as
    kvmpod (SIGKILLed at its teardown by the hook): QEMU goes with it, `kvmpod gc` leaves nothing."""
    from tests.e2e.test_relay import running_pod, wait_for_host

    assert cmd(kvmpod_env, "run", str(busybox_aci), *SH, "true").returncode == 0
    proc = subprocess.Popen(kvmpod_cmd("run", str(busybox_aci), *SH, "sleep 600"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=kvmpod_env)
    state = wait_for_host(running_pod(kvmpod_env, proc), "kvmpod-relay")
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=60) == KILLED
    proc.stderr.close()
    deadline = time.time() + 30
    while Path(f"/proc/{state['qemu_pid']}").exists() and time.time() < deadline:
        time.sleep(0.1)
    clean_after(kvmpod_env, base, gc=True)
    result = cmd(kvmpod_env, "run", str(busybox_aci), *SH, "sleep 3; exit 6", fault="teardown:kill-self")
    assert result.returncode == KILLED and fired(result, "teardown:kill-self"), result.stderr
    clean_after(kvmpod_env, base, gc=True)
