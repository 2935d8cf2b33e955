"""`kvmpod run` end to end: exit codes, streams, stdin, environment, users, failures. Real VMs."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from kvmpod.vm.accel import HostFacts, kvm_unusable_reason
from tests.conftest import kvmpod_cmd
from tests.e2e.conftest import proc_alive, qemu_pids_of, stderr_lines, the_error

SH = ["--exec", "/bin/sh", "--", "-c"]


def test_image_app_runs_with_its_own_exec(kvmpod, busybox_aci):
    result = kvmpod.run(str(busybox_aci))
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"Hello from a kvmpod VM!\n"


@pytest.mark.parametrize("code", [0, 1, 7, 255])
def test_exit_codes_come_back_exactly(kvmpod, busybox_aci, code):
    result = kvmpod.run(str(busybox_aci), *SH, f"exit {code}")
    assert result.returncode == code, result.stderr


def test_the_issue_example(kvmpod, busybox_aci):
    result = kvmpod.run(str(busybox_aci), *SH, "echo hello; echo oops >&2; exit 7")
    assert (result.returncode, result.stdout) == (7, b"hello\n")
    assert stderr_lines(result) == ["oops"]


def test_killed_by_sigkill_gives_137(kvmpod, busybox_aci):
    result = kvmpod.run(str(busybox_aci), *SH, "kill -9 $$")
    assert result.returncode == 137, result.stderr


def test_missing_exec_path_is_a_clear_error(kvmpod, busybox_aci):
    result = kvmpod.run(str(busybox_aci), "--exec", "/bin/nope")
    assert result.returncode == 127
    assert "/bin/nope" in the_error(result) and "No such file" in the_error(result)


def test_stdout_and_stderr_stay_separate_and_ordered(kvmpod, busybox_aci):
    result = kvmpod.run(str(busybox_aci), *SH, "for i in 1 2 3; do echo out$i; echo err$i >&2; done")
    assert result.stdout == b"out1\nout2\nout3\n"
    assert stderr_lines(result) == ["err1", "err2", "err3"]


def test_ten_mib_of_random_bytes_arrive_byte_exact(kvmpod, busybox_aci):
    script = "head -c 10485760 /dev/urandom > /tmp/r && sha256sum /tmp/r >&2 && cat /tmp/r"
    result = kvmpod.run(str(busybox_aci), *SH, script)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout) == 10 * 1024 * 1024
    guest_sum = stderr_lines(result)[0].split()[0]
    assert hashlib.sha256(result.stdout).hexdigest() == guest_sum


@pytest.mark.parametrize("transport", ["serial", "vsock-user"])
def test_small_writes_to_both_streams_arrive_whole_and_in_order(kvmpod, busybox_aci, transport):
    # the agent moves a pipe's bytes with splice() and lets a frame of small writes fill for a moment
    # (guest-agent/src/process.c relay_output): every byte must still arrive, each stream in its order,
    # and what an app writes just before it exits too
    script = ("i=0; while [ $i -lt 3000 ]; do echo out$i; echo err$i >&2; i=$((i+1)); done; "
              "head -c 100000 /dev/zero | tr '\\0' x; printf end")
    result = kvmpod.run("--agent-transport", transport, str(busybox_aci), *SH, script)
    assert result.returncode == 0, result.stderr
    expected = "".join(f"out{i}\n" for i in range(3000)) + "x" * 100000 + "end"
    assert result.stdout.decode() == expected
    assert [line for line in stderr_lines(result) if line.startswith("err")] == [f"err{i}" for i in range(3000)]


def test_stdin_is_forwarded_byte_exact(kvmpod, busybox_aci):
    data = os.urandom(3 * 1024 * 1024 + 17)
    result = kvmpod.run("--interactive", str(busybox_aci), "--exec", "/bin/cat", "--", input=data)
    assert result.returncode == 0, result.stderr
    assert result.stdout == data


def test_without_interactive_stdin_is_empty(kvmpod, busybox_aci):
    result = kvmpod.run(str(busybox_aci), "--exec", "/bin/cat", "--", input=b"not for the app")
    assert (result.returncode, result.stdout) == (0, b"")


def test_environment_is_exactly_as_specified(kvmpod, busybox_aci):
    result = kvmpod.run("--set-env", "POD_VAR=pod", str(busybox_aci), "--set-env", "APP_VAR=a b=c",
                        "--exec", "/bin/env", "--")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.decode().splitlines()
    urls = [line for line in lines if line.startswith("AC_METADATA_URL=")]  # its token is new for every pod
    assert len(urls) == 1 and urls[0].startswith("AC_METADATA_URL=http://127.0.0.1:18112/")
    assert sorted(line for line in lines if line not in urls) == sorted([
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "AC_APP_NAME=busybox", "container=kvmpod", "IMAGE_VAR=from-image", "POD_VAR=pod", "APP_VAR=a b=c"])


def test_working_directory(kvmpod, busybox_aci):
    result = kvmpod.run(str(busybox_aci), "--working-dir", "/home/app", "--exec", "/bin/pwd", "--")
    assert result.stdout == b"/home/app\n"


def test_missing_working_directory_is_a_clear_error(kvmpod, busybox_aci):
    result = kvmpod.run(str(busybox_aci), "--working-dir", "/no/such/dir", "--exec", "/bin/pwd", "--")
    assert result.returncode == 125
    assert "/no/such/dir" in the_error(result)


# No supplementary groups unless the manifest lists supplementaryGIDs (spec/ace.md): /etc/group
# membership does not add any, so busybox id prints no groups= part.
@pytest.mark.parametrize("user, group, expected", [
    ("app", "extra", "uid=1000(app) gid=2000(extra)"),
    ("1000", "65534", "uid=1000(app) gid=65534(nogroup)"),
    ("0", "0", "uid=0(root) gid=0(root)"),
])
def test_user_and_group_by_name_and_number(kvmpod, busybox_aci, user, group, expected):
    result = kvmpod.run(str(busybox_aci), "--user", user, "--group", group, "--exec", "/bin/id", "--")
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().strip() == expected


def test_supplementary_gids_from_the_manifest(kvmpod, busybox_rootfs, tmp_path):
    from kvmpod.image.build import build_aci
    from kvmpod.image.manifest import build_manifest

    manifest = build_manifest("example.com/groups", exec_=["/bin/id"], user="app", group="app")
    manifest["app"]["supplementaryGIDs"] = [2000, 3000]
    build_aci(busybox_rootfs, manifest, tmp_path / "groups.aci")
    result = kvmpod.run(str(tmp_path / "groups.aci"))
    assert result.stdout.decode().strip() == "uid=1000(app) gid=1000(app) groups=2000(extra),3000"


def test_unknown_user_is_a_clear_error(kvmpod, busybox_aci):
    result = kvmpod.run(str(busybox_aci), "--user", "nosuchuser", "--exec", "/bin/id", "--")
    assert result.returncode == 125
    assert "nosuchuser" in the_error(result)


def test_app_sees_the_appc_filesystem_set(kvmpod, busybox_aci):
    script = ("for n in null zero full random urandom tty console; do [ -c /dev/$n ] || echo missing $n; done;"
              "[ -L /dev/ptmx ] || echo missing ptmx; [ -d /dev/pts ] || echo missing pts;"
              "[ -d /dev/shm ] || echo missing shm; [ -r /proc/self/status ] || echo missing proc;"
              "[ -d /sys/kernel ] || echo missing sys; echo ok")
    result = kvmpod.run(str(busybox_aci), *SH, script)
    assert result.stdout == b"ok\n", result.stdout


def test_rootfs_is_writable_by_default_and_readonly_on_request(kvmpod, busybox_aci):
    assert kvmpod.run(str(busybox_aci), *SH, "echo x > /etc/new && cat /etc/new").stdout == b"x\n"
    result = kvmpod.run(str(busybox_aci), "--readonly-rootfs", *SH, "echo x > /etc/new")
    assert result.returncode != 0 and b"Read-only file system" in result.stderr


def test_tcg_fallback_notice_appears_once_with_its_reason(kvmpod, busybox_aci):
    result = kvmpod.run(str(busybox_aci), *SH, "true")
    notices = [line for line in result.stderr.decode().splitlines() if "using TCG" in line]
    reason = kvm_unusable_reason(HostFacts.probe())
    if reason is None:
        assert notices == []
    else:
        assert len(notices) == 1 and reason in notices[0]
        if Path("/sys/module/kvm_pvm").exists():
            assert "PVM-only" in notices[0]


def test_guest_kernel_panic_is_reported(kvmpod, busybox_aci):
    result = kvmpod.run(str(busybox_aci), *SH, "echo c > /proc/sysrq-trigger; sleep 60")
    assert result.returncode == 125
    assert "kernel panicked" in the_error(result)


def test_agent_crash_is_reported(kvmpod, busybox_aci):
    # kvmpod.fault=crash-after-hello is the agent's test-only fault injection (docs/agent-protocol.md)
    result = kvmpod.run("--kernel-arg", "kvmpod.fault=crash-after-hello", str(busybox_aci), *SH, "true")
    assert result.returncode == 125
    assert "guest agent (PID 1) crashed" in the_error(result)


def test_qemu_killed_is_reported_promptly(kvmpod, busybox_aci, kvmpod_env):
    proc = kvmpod.popen(str(busybox_aci), *SH, "sleep 600")
    try:
        state = kvmpod.wait_for_running_pod(proc)
        os.kill(state["qemu_pid"], signal.SIGKILL)
        _, err = proc.communicate(timeout=30)  # a hang fails here; how fast it is belongs to bench/
        assert proc.returncode == 125
        assert "QEMU was killed by signal 9" in err.decode()
    finally:
        proc.kill()
        proc.wait()


def test_kvmpod_killed_takes_qemu_with_it(kvmpod, busybox_aci, kvmpod_env):
    proc = kvmpod.popen(str(busybox_aci), *SH, "sleep 600")
    state = kvmpod.wait_for_running_pod(proc)
    proc.kill()
    proc.wait()
    deadline = time.time() + 10
    while proc_alive(state["qemu_pid"]) and time.time() < deadline:
        time.sleep(0.1)
    assert not proc_alive(state["qemu_pid"])
    # kvmpod had no chance to clean its pod directory: `kvmpod gc` does
    pod_dir = Path(kvmpod_env["KVMPOD_RUN_DIR"], "pods", state["uuid"])
    listed = subprocess.run(kvmpod_cmd("list"), capture_output=True, text=True, env=kvmpod_env).stdout
    assert f"{state['uuid']}  abandoned" in listed
    gc = subprocess.run(kvmpod_cmd("gc"), capture_output=True, text=True, env=kvmpod_env)
    assert gc.returncode == 0 and f"removed pod {state['uuid']}" in gc.stdout
    assert not pod_dir.exists()


def test_first_sigterm_is_forwarded_to_the_app(kvmpod, busybox_aci):
    proc = kvmpod.popen(str(busybox_aci), *SH, "trap 'echo got TERM; exit 3' TERM; while :; do sleep 0.1; done")
    try:
        kvmpod.wait_for_running_pod(proc)
        time.sleep(1)  # let the shell install its trap
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        assert (proc.returncode, out) == (3, b"got TERM\n")
    finally:
        proc.kill()
        proc.wait()


def test_keep_leaves_the_pod_directory(kvmpod, busybox_aci, kvmpod_env):
    result = kvmpod.run("--keep", str(busybox_aci), *SH, "exit 4")
    assert result.returncode == 4
    pods = list(Path(kvmpod_env["KVMPOD_RUN_DIR"], "pods").iterdir())
    assert len(pods) == 1
    state = json.loads((pods[0] / "state.json").read_text())
    assert state["state"] == "exited" and state["apps"][0]["exit_code"] == 4
    manifest = json.loads((pods[0] / "pod-manifest").read_text())
    assert manifest["acKind"] == "PodManifest" and manifest["apps"][0]["image"]["id"].startswith("sha512-")
    assert (pods[0] / "console.log").exists()
    assert not (pods[0] / "qmp.sock").exists() and not (pods[0] / "agent.sock").exists()
    status = subprocess.run(kvmpod_cmd("status", pods[0].name[:8]), capture_output=True, text=True, env=kvmpod_env)
    assert "state:   exited" in status.stdout and "exited with code 4" in status.stdout
    subprocess.run(kvmpod_cmd("gc"), check=True, capture_output=True, env=kvmpod_env)
    assert not pods[0].exists()


def test_qemu_start_failure_shows_qemus_own_error(kvmpod, busybox_aci):
    result = kvmpod.run("--memory", "900000G", str(busybox_aci))
    assert result.returncode == 125
    # anonymous RAM: "cannot set up guest memory"; the memfd RAM vhost-user needs: "backing store for guest RAM"
    assert "QEMU failed to start" in the_error(result)
    assert "guest memory" in the_error(result) or "guest RAM" in the_error(result)


def test_missing_image_is_a_clear_error_and_starts_nothing(kvmpod, kvmpod_env):
    result = kvmpod.run("/no/such.aci")
    assert result.returncode == 125
    assert "/no/such.aci" in the_error(result)
    assert qemu_pids_of(kvmpod_env["KVMPOD_RUN_DIR"]) == []
