"""kvmpod-oci under the real podman 4.3 (with conmon 2.1) and containerd 1.6 (ctr, the runc shim v2):
every container in its own VM (docs/oci-runtime.md).

Isolation from the machine: podman runs with its storage, run root, tmpdir and network config under
a temporary directory, inside a network namespace this module makes (nsenter --net: netavark's
bridge, its firewall rules and port forwards live there, nothing in the machine's own namespace);
containerd runs with its own root, state and socket under a temp dir and is stopped at the end.
kvmpod-oci is given through a wrapper that points it at the test session's kvmpod directories
(conmon passes no environment on to the runtime).
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import select
import shutil
import signal
import struct
import subprocess
import termios
import time
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from tests.podman_env import (CONFIGURED, IMAGE, PODMAN, TIMEOUT, Podman, clear_leftovers, isolated_podman,
                              unmount_below)

CTR, CONTAINERD = shutil.which("ctr"), shutil.which("containerd")
pytestmark = pytest.mark.skipif(PODMAN is None or os.geteuid() != 0,
                                reason="podman (Debian package podman, installed by make setup) and root are needed")


@pytest.fixture(scope="module")
def podman(tmp_path_factory, kvmpod_dirs, busybox_rootfs) -> Iterator[Podman]:
    # one start slot (kvmpod/pod/admission.py) for every container here: they start one at a time, and a
    # created container that waits for `start` must not keep the slot (test_init_several_then_start_them)
    config = tmp_path_factory.mktemp("kvmpod-config") / "kvmpod.toml"
    config.write_text("[run]\nconcurrent-starts = 1\n")
    with isolated_podman(tmp_path_factory.mktemp("podman") / "env", {**kvmpod_dirs, "KVMPOD_CONFIG": str(config)},
                         busybox_rootfs) as p:
        yield p


@pytest.fixture(autouse=True)
def no_container_left(podman):
    yield
    left = clear_leftovers(podman)
    assert left == [], f"left by the test: {left}"


def run(podman: Podman, *args: str, input: bytes | None = None) -> subprocess.CompletedProcess:
    return podman("run", "--rm", *args, input=input)


# -- podman run ------------------------------------------------------------------------------

def test_exit_code_and_separate_streams(podman):
    done = run(podman, IMAGE, "/bin/sh", "-c", "echo out; echo err >&2; exit 3")
    assert done.returncode == 3, done.stderr
    assert done.stdout == b"out\n"
    assert done.stderr.decode().splitlines()[-1:] == ["err"]


def test_a_bare_command_is_looked_up_in_path_as_runc_does(podman):
    done = run(podman, IMAGE, "echo", "found in PATH")
    assert (done.returncode, done.stdout) == (0, b"found in PATH\n"), done.stderr
    assert run(podman, IMAGE, "no-such-command").returncode == 127


def test_killed_by_a_signal(podman):
    assert run(podman, IMAGE, "/bin/sh", "-c", "kill -9 $$").returncode == 137
    assert run(podman, IMAGE, "/bin/sh", "-c", "kill -USR1 $$").returncode == 128 + signal.SIGUSR1


def test_ten_mib_through_stdin_byte_exact(podman):
    data = os.urandom(10 << 20)
    done = run(podman, "-i", IMAGE, "/bin/cat", input=data)
    assert done.returncode == 0, done.stderr
    assert done.stdout == data


def test_init_several_then_start_them(podman):
    # `podman init` is the runtime's create: each pod boots and waits for `start` with its start slot given
    # back, or the second init would wait for the first's start for ever (one slot in this module)
    names = ["slot-a", "slot-b", "slot-c"]
    try:
        for name in names:
            podman("create", "--name", name, IMAGE, "/bin/sh", "-c", f"echo {name}", check=True)
        for name in names:
            assert podman("init", name, timeout=120).returncode == 0
        for name in names:
            assert podman("start", "--attach", name, timeout=120).stdout.decode().split() == [name]
    finally:
        podman("rm", "--force", "--time", "0", *names)


def test_network_host_is_refused_in_one_line(podman):
    done = run(podman, "--network", "host", IMAGE, "/bin/true")
    assert done.returncode != 0
    assert b"no network namespace: the container would share the host's network stack, which a VM cannot" \
        in done.stderr


def test_network_none_is_loopback_only(podman):
    done = run(podman, "--network", "none", IMAGE, "/bin/sh", "-c", "cat /proc/net/dev | tail -n +3 | cut -d: -f1")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [b"lo", b"sit0"] or done.stdout.split() == [b"lo"]


def test_the_image_config_env_workdir_and_user(podman):
    done = run(podman, CONFIGURED, "/bin/sh", "-c", 'echo "$GREETING $(pwd) $(id -u):$(id -g)"')
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"from-the-image /home/app 1000:1000\n"


def test_read_only_root_and_a_read_only_host_dir(podman, tmp_path):
    assert run(podman, "--read-only", IMAGE, "/bin/sh", "-c", "echo x > /x").returncode == 1
    (tmp_path / "in").write_text("from the host\n")
    done = run(podman, "-v", f"{tmp_path}:/data:ro", IMAGE, "/bin/sh", "-c", "cat /data/in; echo x > /data/out")
    assert done.stdout == b"from the host\n" and done.returncode == 1
    assert b"Read-only file system" in done.stderr
    assert not (tmp_path / "out").exists()


def test_a_named_volume_outlives_its_writer(podman):
    name = f"kvmpodvol{uuid.uuid4().hex[:6]}"
    try:
        assert run(podman, "-v", f"{name}:/vol", IMAGE, "/bin/sh", "-c", "echo kept > /vol/f").returncode == 0
        done = run(podman, "-v", f"{name}:/vol", IMAGE, "/bin/cat", "/vol/f")
        assert done.returncode == 0 and done.stdout == b"kept\n"
    finally:
        podman("volume", "rm", "--force", name)


def test_memory_limit_sizes_the_vm(podman):
    done = run(podman, "--memory", "512m", IMAGE, "/bin/sh", "-c", "grep MemTotal /proc/meminfo")
    total_kib = int(done.stdout.split()[1])
    assert 400 * 1024 < total_kib <= 512 * 1024, done.stdout   # the guest kernel keeps some for itself


def test_what_the_container_writes_lands_in_its_upper_layer(podman):
    name = f"diff{uuid.uuid4().hex[:6]}"
    try:
        podman("run", "--name", name, IMAGE, "/bin/sh", "-c", "echo new > /etc/written; rm /etc/greeting",
               check=True)
        diff = podman("diff", name, check=True).stdout.decode().split("\n")
        assert "A /etc/written" in diff and "D /etc/greeting" in diff
        copied = podman.base / "copied"
        podman("cp", f"{name}:/etc/written", str(copied), check=True)
        assert copied.read_text() == "new\n"
        podman("commit", "--quiet", name, f"localhost/kvmpod-test/{name}:1", check=True)
        done = run(podman, f"localhost/kvmpod-test/{name}:1", "/bin/sh", "-c", "cat /etc/written; ls /etc/greeting")
        assert done.stdout == b"new\n" and done.returncode == 1   # the commit has the write and the deletion
    finally:
        podman("rm", "--force", name)
        podman("rmi", "--force", f"localhost/kvmpod-test/{name}:1")


def test_port_forward_reaches_a_server_in_the_guest(podman):
    name = f"web{uuid.uuid4().hex[:6]}"
    try:
        podman("run", "-d", "--name", name, "-p", "18080:8080", IMAGE, "/bin/sh", "-c",
               "mkdir -p /www; echo hello-from-the-vm > /www/index.html; exec httpd -f -p 8080 -h /www", check=True)
        got = podman.in_netns("curl", "-sS", "-m", "10", "--retry", "60", "--retry-all-errors", "--retry-delay", "1",
                              "--retry-max-time", "90", "http://127.0.0.1:18080/index.html", timeout=120)
        assert got.stdout == b"hello-from-the-vm\n", got.stderr
    finally:
        podman("rm", "--force", "--time", "0", name)


# -- terminals -------------------------------------------------------------------------------

def in_pty(argv: list[str], env: dict[str, str], steps: list[tuple[bytes, bytes]], rows: int = 30,
           cols: int = 100, timeout: float = 120) -> tuple[bytes, int]:
    """Run argv on a new pty of rows x cols; for each (expect, send): wait for `expect` in the output,
    then type `send`. Returns all output and the exit status."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True,
                            preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))
    os.close(slave)
    out = b""
    deadline = time.monotonic() + timeout
    try:
        for expect, send in [*steps, (b"", b"")]:
            while expect not in out:
                if time.monotonic() > deadline:
                    raise AssertionError(f"no {expect!r} in {out!r}")
                ready, _, _ = select.select([master], [], [], 1)
                if ready:
                    try:
                        chunk = os.read(master, 4096)
                    except OSError:
                        chunk = b""
                    if not chunk:
                        raise AssertionError(f"output ended without {expect!r}: {out!r}")
                    out += chunk
            if send:
                os.write(master, send)
        while True:   # the rest, until the terminal closes
            ready, _, _ = select.select([master], [], [], 1)
            if ready:
                try:
                    chunk = os.read(master, 4096)
                except OSError:
                    break
                if not chunk:
                    break
                out += chunk
            elif proc.poll() is not None:
                break
        return out, proc.wait(timeout=60)
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_interactive_terminal_size_prompt_and_ctrl_c(podman):
    out, code = in_pty(podman.argv("run", "--rm", "-it", IMAGE, "/bin/sh", "-c",
                                   'stty size; printf "name? "; read name; echo "hi $name"; echo go; exec cat'),
                       podman.env, [(b"name? ", b"kvm\r"), (b"go", b"\x03")])
    assert b"30 100" in out and b"hi kvm" in out, out
    assert code == 130, out   # cat killed by the ^C (SIGINT from the guest's line discipline)


# -- detached containers -------------------------------------------------------------------------

@pytest.fixture
def detached(podman):
    name = f"d{uuid.uuid4().hex[:8]}"
    podman("run", "-d", "--name", name, IMAGE, "/bin/sh", "-c",
           'trap "echo got-usr1" USR1; trap "" TERM; echo started; while true; do sleep 0.2; done', check=True)
    yield name
    podman("rm", "--force", "--time", "0", name)


def _status(podman: Podman, name: str) -> str:
    return podman("inspect", "--format", "{{.State.Status}}", name, check=True).stdout.decode().strip()


def test_exec_logs_kill_pause_and_stop(podman, detached):
    assert _status(podman, detached) == "running"
    done = podman("exec", "-e", "FOO=bar", detached, "/bin/sh", "-c", "echo in-exec $FOO; exit 5")
    assert (done.returncode, done.stdout) == (5, b"in-exec bar\n"), done.stderr
    out, code = in_pty(podman.argv("exec", "-it", detached, "/bin/sh", "-c", "stty size; exit 4"), podman.env,
                       [(b"30 100", b"")])
    assert code == 4, out
    podman("kill", "--signal", "USR1", detached, check=True)
    deadline = time.monotonic() + 30
    while b"got-usr1" not in podman("logs", detached).stdout and time.monotonic() < deadline:
        time.sleep(0.2)
    assert podman("logs", detached).stdout.startswith(b"started\n")
    assert b"got-usr1" in podman("logs", detached).stdout
    podman("pause", detached, check=True)
    assert _status(podman, detached) == "paused"
    podman("unpause", detached, check=True)
    assert _status(podman, detached) == "running"
    assert podman("exec", detached, "/bin/true").returncode == 0   # the guest still answers after a resume
    podman("stop", "--time", "2", detached, check=True)   # TERM is ignored: SIGKILL after 2 s
    state = json.loads(podman("inspect", detached, check=True).stdout)[0]["State"]
    assert (state["Status"], state["ExitCode"]) == ("exited", 137)


def test_what_a_failed_test_leaves_is_cleared_for_the_next(podman, detached):
    # A test failing midway leaves a running container and its kvmpod-oci record: the leftover
    # check clears them (and says so) so that the failure does not cascade into later tests.
    assert list((podman.base / "oci-root").glob("*")), "the running container has no kvmpod-oci record"
    left = clear_leftovers(podman)
    assert left == [f"container {detached}"], left   # podman's rm took the record with it (kvmpod-oci delete)
    assert list((podman.base / "oci-root").glob("*")) == []
    assert clear_leftovers(podman) == []
    assert podman("ps", "--all", "--format", "{{.Names}}").stdout.decode().split() == []


def test_rm_force_of_a_running_container(podman, detached):
    podman("rm", "--force", "--time", "0", detached, check=True)
    assert podman("ps", "--all", "--format", "{{.Names}}").stdout.decode().split() == []


def test_an_exec_process_dies_with_its_host_end(podman, detached):
    """conmon kills the exec pid directly: the guest process must go with it."""
    proc = subprocess.Popen(podman.argv("exec", detached, "/bin/sh", "-c", "echo up; exec sleep 600"),
                            stdout=subprocess.PIPE, env=podman.env)
    assert proc.stdout is not None and proc.stdout.readline() == b"up\n"
    container_id = podman("inspect", "--format", "{{.Id}}", detached, check=True).stdout.decode().strip()
    host_ends = subprocess.run(["pgrep", "-f", f"kvmpod-oci .*exec .*--detach .*{container_id}"],
                               capture_output=True, text=True).stdout.split()
    pids = [int(p) for p in host_ends]
    assert pids, "no exec host process"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=60)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        listing = podman("exec", detached, "/bin/ps").stdout
        if b"sleep 600" not in listing:
            break
        time.sleep(0.5)
    assert b"sleep 600" not in listing


# -- containerd --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def containerd(tmp_path_factory, podman):
    if CTR is None or CONTAINERD is None:
        pytest.skip("containerd is not installed (Debian package containerd, installed by make setup)")
    base = tmp_path_factory.mktemp("containerd")
    shim_dirs = Path("/run/containerd")   # the shim's sockets and fifos, and runc's --root, live here
    had_shim_dirs = shim_dirs.exists()
    (base / "config.toml").write_text(f'version = 2\nroot = "{base}/root"\nstate = "{base}/state"\n'
                                      f'[grpc]\n  address = "{base}/containerd.sock"\n'
                                      '[plugins."io.containerd.grpc.v1.cri"]\n  disable_cgroup = true\n')
    log = open(base / "containerd.log", "wb")
    daemon = subprocess.Popen([CONTAINERD, "--config", str(base / "config.toml")], stdout=log, stderr=log,
                              start_new_session=True)
    ctr = [CTR, "--address", str(base / "containerd.sock")]
    try:
        deadline = time.monotonic() + 60
        while subprocess.run([*ctr, "version"], capture_output=True).returncode != 0:
            assert daemon.poll() is None and time.monotonic() < deadline, (base / "containerd.log").read_text()
            time.sleep(0.2)
        archive = base / "image.tar"
        podman("save", "--format", "docker-archive", "-o", str(archive), IMAGE, check=True)
        subprocess.run([*ctr, "image", "import", str(archive)], check=True, capture_output=True)
        yield ctr, podman.runtime
    finally:
        daemon.terminate()
        try:
            daemon.wait(timeout=30)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
        log.close()
        unmount_below(base)
        shutil.rmtree(base, ignore_errors=True)
        if not had_shim_dirs:
            shutil.rmtree(shim_dirs, ignore_errors=True)


@pytest.mark.parametrize("code", [0, 3])
def test_ctr_run_exit_codes_and_output(containerd, code):
    ctr, runtime = containerd
    name = f"c{uuid.uuid4().hex[:8]}"
    done = subprocess.run([*ctr, "run", "--runc-binary", str(runtime), "--rm", IMAGE, name, "/bin/sh", "-c",
                           f"echo out-{code}; echo err >&2; exit {code}"], capture_output=True, timeout=TIMEOUT)
    assert done.returncode == code, done.stderr
    assert done.stdout == f"out-{code}\n".encode() and done.stderr.endswith(b"err\n")
