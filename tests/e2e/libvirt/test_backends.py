"""The core e2e set on both VM backends (the QEMU one and libvirt's: docs/libvirt.md). Real VMs, a
real libvirt daemon (conftest.py)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import kvmpod_cmd
from tests.e2e.conftest import CURL, stderr_lines

SH = ["--exec", "/bin/sh", "--", "-c"]
SERVICE = ["--exec", "/bin/sh", "--", "-c",
           "trap 'echo got TERM; exit 0' TERM; echo up; echo to-stderr >&2; while :; do sleep 0.1; done"]


@pytest.mark.parametrize("script, code", [("exit 0", 0), ("exit 3", 3), ("kill -9 $$", 137)])
def test_exit_codes(pod_runner, busybox_aci, script, code):
    result = pod_runner.run("--net", "none", str(busybox_aci), *SH, script)
    assert result.returncode == code, result.stderr


def test_streams_stay_separate(pod_runner, busybox_aci):
    result = pod_runner.run("--net", "none", str(busybox_aci), *SH, "for i in 1 2; do echo out$i; echo err$i >&2; done")
    assert result.stdout == b"out1\nout2\n"
    assert stderr_lines(result) == ["err1", "err2"]


def test_one_mib_of_stdin_round_trips(pod_runner, busybox_aci):
    data = os.urandom(1024 * 1024)
    result = pod_runner.run("--net", "none", "--interactive", str(busybox_aci), "--exec", "/bin/cat", "--", input=data)
    assert result.returncode == 0, result.stderr
    assert hashlib.sha256(result.stdout).hexdigest() == hashlib.sha256(data).hexdigest()


def test_two_app_pod_ends_with_the_failing_apps_code(pod_runner, busybox_aci):
    result = pod_runner.run("--net", "none", str(busybox_aci), "--name", "good", *SH, "echo fine",
                            "---", str(busybox_aci), "--name", "bad", *SH, "exit 5")
    assert result.returncode == 5, result.stderr
    assert b"fine\n" in result.stdout


def test_detach_logs_enter_and_stop(pod_runner, busybox_aci, kvmpod_env):
    uuid = pod_runner.detach("--net", "none", str(busybox_aci), *SERVICE)
    try:
        deadline = time.time() + 60
        while b"to-stderr" not in pod_runner.cmd("logs", uuid).stdout and time.time() < deadline:
            time.sleep(0.2)
        assert pod_runner.cmd("logs", uuid).stdout == b"up\nto-stderr\n"
        entered = pod_runner.cmd("enter", uuid, "--", "/bin/sh", "-c", "cat; exit 4", input=b"through enter\n")
        assert (entered.returncode, entered.stdout) == (4, b"through enter\n"), entered.stderr
        status = json.loads(pod_runner.cmd("status", "--json", uuid).stdout)
        expected = "libvirt" if pod_runner.backend_args else "qemu"
        assert status["backend"] == expected
        if expected == "libvirt":
            assert status["domain"] == f"kvmpod-{uuid[:8]}"
            assert f"libvirt:kvmpod-{uuid[:8]}" in pod_runner.cmd("list").stdout.decode()
        stopped = pod_runner.cmd("stop", uuid)
        assert stopped.returncode == 0, stopped.stderr
        assert pod_runner.cmd("logs", uuid).stdout == b"up\nto-stderr\ngot TERM\n"
    finally:
        pod_runner.cmd("stop", "--force", uuid)
        pod_runner.cmd("rm", uuid)


def test_host_volume_rw_and_read_only_enforced(pod_runner, busybox_aci, tmp_path):
    share, frozen = tmp_path / "share", tmp_path / "frozen"
    share.mkdir()
    frozen.mkdir()
    (share / "in").write_text("hello\n")
    (frozen / "in").write_text("frozen\n")
    # as root in the guest, a remount read-write must still fail: the host side refuses the writes
    script = ("cat /h/in; echo new > /h/out; cat /ro/in; touch /ro/x 2>&1 | sed 's/^/ro /'; "
              "mount -o remount,rw /ro 2>/dev/null; touch /ro/y 2>&1 | sed 's/^/ro2 /'; exit 0")
    result = pod_runner.run("--net", "none", "--volume", f"h,kind=host,source={share}",
                            "--volume", f"ro,kind=host,source={frozen},readOnly=true", str(busybox_aci),
                            "--mount", "volume=h,target=/h", "--mount", "volume=ro,target=/ro", *SH, script)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.decode().splitlines()
    assert lines[:2] == ["hello", "frozen"]
    assert any(line.startswith("ro ") and "Read-only file system" in line for line in lines)
    assert any(line.startswith("ro2 ") and "Read-only file system" in line for line in lines)
    assert (share / "out").read_text() == "new\n"
    assert sorted(os.listdir(frozen)) == ["in"]


def test_empty_volume_shared_by_two_apps(pod_runner, busybox_aci):
    writer = "echo from-writer > /shared/w; echo writer-ok"
    reader = ('i=0; while [ ! -e /shared/w ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done; '
              'echo "content $(cat /shared/w)"')
    result = pod_runner.run("--net", "none", "--volume", "shared,kind=empty",
                            str(busybox_aci), "--name", "writer", "--mount", "volume=shared,target=/shared", *SH, writer,
                            "---", str(busybox_aci), "--name", "reader", "--mount", "volume=shared,target=/shared",
                            *SH, reader)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.decode().splitlines()
    assert "writer-ok" in lines and "content from-writer" in lines, (result.stdout, result.stderr)


@pytest.fixture(scope="module")
def web_aci(busybox_rootfs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("backend-images") / "web.aci"
    subprocess.run(kvmpod_cmd("image", "build", "--rootfs", str(busybox_rootfs), "--name", "example.com/web",
                              "--exec", "/bin/httpd -f -p 80 -h /etc", "--port", "http:tcp:80", "-o", str(out)),
                   check=True)
    return out


def test_user_networking_forwards_a_port(pod_runner, web_aci, backend):
    port = 18191 if backend == "libvirt" else 18190
    uuid = pod_runner.detach("--net", "user", "--port", f"http:127.0.0.1:{port}", str(web_aci))
    try:
        got = subprocess.run([*CURL, f"http://127.0.0.1:{port}/hosts"], capture_output=True)
        assert b"127.0.0.1 localhost" in got.stdout, got.stderr
    finally:
        stopped = pod_runner.cmd("stop", uuid)
        pod_runner.cmd("rm", uuid)
    assert stopped.returncode == 0, stopped.stderr


def test_metadata_service_answers_the_pods_uuid(pod_runner, busybox_aci, tmp_path):
    saved = tmp_path / "uuid"
    result = pod_runner.run("--net", "none", "--uuid-file-save", str(saved), str(busybox_aci), *SH,
                            'echo "uuid $(wget -q -O - "$AC_METADATA_URL/acMetadata/v1/pod/uuid")"')
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode() == f"uuid {saved.read_text()}\n"


def test_interactive_on_a_terminal(pod_runner, busybox_aci, kvmpod_env):
    import termios

    from tests.e2e.test_interact import PtySession

    term = PtySession(kvmpod_cmd("run", *pod_runner.backend_args, "--net", "none", "--interactive", str(busybox_aci),
                                 "--exec", "/bin/sh", "--"), kvmpod_env, rows=33, cols=99)
    try:
        term.expect(b"# ")
        term.send(b"tty; stty size\r")
        assert b"/dev/pts/0\r\n33 99\r\n" in term.expect(b"33 99\r\n")
        term.send(b"exit 3\r")
        assert term.wait() == 3
        assert termios.tcgetattr(term.slave) == term.saved
    finally:
        term.close()
