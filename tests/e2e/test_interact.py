"""Working with running pods end to end: enter (pipes and a terminal), run --interactive on a
terminal, run --detach + logs, stop (grace, timeout, --force), rm, and eight pods at once. Real VMs."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import select
import struct
import subprocess
import termios
import time
from pathlib import Path

import pytest

from kvmpod.pod.client import process_ended
from tests.conftest import kvmpod_cmd
from tests.e2e.conftest import VM_TIMEOUT, qemu_pids_of, the_error

# An app that runs until SIGTERM, which it answers by exiting 0 (the shell runs the trap between sleeps).
SERVICE = ["--exec", "/bin/sh", "--", "-c",
           "trap 'echo got TERM; exit 0' TERM; echo up; echo to-stderr >&2; while :; do sleep 0.1; done"]
STUBBORN = ["--exec", "/bin/sh", "--", "-c", "trap '' TERM; echo up; while :; do sleep 0.1; done"]


def proc_alive(pid: int) -> bool:
    """Running (a zombie has exited: the detached kvmpod's new parent reaps it in its own time)."""
    return not process_ended(pid)


class Pods:
    """The kvmpod commands of one test, and cleanup: every pod it made is stopped and removed."""

    def __init__(self, env: dict[str, str]):
        self.env = env
        self.made: list[str] = []

    def cmd(self, *args: str, input: bytes | None = None, timeout: float = VM_TIMEOUT) -> subprocess.CompletedProcess:
        return subprocess.run(kvmpod_cmd(*args), input=input, capture_output=True, env=self.env, timeout=timeout)

    def detach(self, *run_args: str) -> str:
        result = self.cmd("run", "--detach", *run_args)
        assert result.returncode == 0, result.stderr.decode()
        uuid = result.stdout.decode().strip()
        assert len(uuid) == 36, result.stdout
        self.made.append(uuid)
        return uuid

    def state(self, uuid: str) -> dict:
        return json.loads((self.pod_dir(uuid) / "state.json").read_text())

    def pod_dir(self, uuid: str) -> Path:
        return Path(self.env["KVMPOD_RUN_DIR"], "pods", uuid)

    def cleanup(self) -> None:
        for uuid in self.made:
            if self.pod_dir(uuid).exists():
                self.cmd("stop", "--force", uuid, timeout=60)
                self.cmd("rm", uuid, timeout=60)


@pytest.fixture
def pods(kvmpod_env):
    p = Pods(kvmpod_env)
    yield p
    p.cleanup()


class PtySession:
    """A kvmpod command on a pseudo-terminal that is its controlling terminal, as in a real shell."""

    def __init__(self, argv: list[str], env: dict[str, str], rows: int = 30, cols: int = 100):
        self.master, slave = pty.openpty()
        self.resize(rows, cols)
        self.saved = termios.tcgetattr(slave)
        self.slave = slave
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True,
                                     preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))
        self.buf = b""

    def resize(self, rows: int, cols: int) -> None:
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))  # SIGWINCH to kvmpod

    def send(self, data: bytes) -> None:
        os.write(self.master, data)

    def expect(self, pattern: bytes, timeout: float = VM_TIMEOUT) -> bytes:
        """Everything up to and including `pattern`, which must appear within `timeout` seconds."""
        deadline = time.time() + timeout
        while pattern not in self.buf:
            ready, _, _ = select.select([self.master], [], [], max(0.0, deadline - time.time()))
            if not ready:
                raise AssertionError(f"no {pattern!r} on the terminal; got {self.buf!r}")
            try:
                self.buf += os.read(self.master, 4096)
            except OSError:
                raise AssertionError(f"the terminal closed before {pattern!r}; got {self.buf!r}") from None
        end = self.buf.index(pattern) + len(pattern)
        seen, self.buf = self.buf[:end], self.buf[end:]
        return seen

    def wait(self, timeout: float = 60) -> int:
        return self.proc.wait(timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)
        os.close(self.slave)


# -- enter ---------------------------------------------------------------------------------------

def test_enter_without_a_terminal_relays_pipes_and_the_exit_code(pods, busybox_aci):
    uuid = pods.detach(str(busybox_aci), *SERVICE)
    result = pods.cmd("enter", uuid[:8], "--set-env", "EXTRA=x", "--",
                      "/bin/sh", "-c", "cat; echo oops >&2; tty; echo $AC_APP_NAME $IMAGE_VAR $EXTRA; id -u; exit 7",
                      input=b"from stdin\n")
    assert result.returncode == 7, result.stderr
    assert result.stdout == b"from stdin\nnot a tty\nbusybox from-image x\n0\n"
    assert result.stderr == b"oops\n"
    # a bare command name is looked up in the app's PATH; the app's user unless told otherwise
    result = pods.cmd("enter", uuid, "--user", "app", "--working-dir", "/home/app", "--", "sh", "-c", "id -un; pwd")
    assert (result.returncode, result.stdout) == (0, b"app\n/home/app\n"), result.stderr
    data = os.urandom(3 * 1024 * 1024 + 5)  # more than the agent's stdin window: flow control end to end
    cat = pods.cmd("enter", uuid, "--", "/bin/cat", input=data)
    assert cat.returncode == 0 and cat.stdout == data, cat.stderr
    missing = pods.cmd("enter", uuid, "--", "/bin/nope")
    assert missing.returncode == 127 and "/bin/nope" in the_error(missing)
    wrong_app = pods.cmd("enter", uuid, "--app", "other", "--", "/bin/true")
    assert wrong_app.returncode == 125 and "no app 'other'" in the_error(wrong_app) and "busybox" in the_error(wrong_app)


def test_enter_with_a_terminal(pods, busybox_aci, kvmpod_env):
    uuid = pods.detach(str(busybox_aci), *SERVICE)
    term = PtySession(kvmpod_cmd("enter", uuid), kvmpod_env, rows=30, cols=100)
    try:
        term.expect(b"# ")  # busybox sh's prompt: it found a terminal
        term.send(b"tty; stty size\r")
        assert b"/dev/pts/0\r\n30 100\r\n" in term.expect(b"30 100\r\n")
        term.resize(40, 120)
        time.sleep(0.5)  # SIGWINCH -> RESIZE -> TIOCSWINSZ in the guest
        term.send(b"stty size\r")
        term.expect(b"40 120\r\n")
        term.send(b"echo slee''ping; sleep 100\r")
        term.expect(b"sleeping\r\n")  # the output, not the echoed command line
        time.sleep(0.5)
        term.send(b"\x03")  # ^C reaches the guest's line discipline: SIGINT for sleep, not for kvmpod
        term.send(b"echo status=$?\r")
        term.expect(b"status=130")
        term.send(b"exit 5\r")
        assert term.wait() == 5
        assert termios.tcgetattr(term.slave) == term.saved  # the local terminal is as it was
    finally:
        term.close()


def test_run_interactive_on_a_terminal(kvmpod_env, busybox_aci):
    term = PtySession(kvmpod_cmd("run", "--interactive", str(busybox_aci), "--exec", "/bin/sh", "--"), kvmpod_env,
                      rows=33, cols=99)
    try:
        term.expect(b"# ")
        term.send(b"tty; stty size\r")
        assert b"/dev/pts/0\r\n33 99\r\n" in term.expect(b"33 99\r\n")
        term.send(b"exit 3\r")
        assert term.wait() == 3
        assert termios.tcgetattr(term.slave) == term.saved
    finally:
        term.close()


# -- detach, logs, stop, rm -----------------------------------------------------------------------

def test_detach_logs_follow_stop_and_rm(pods, busybox_aci):
    uuid = pods.detach(str(busybox_aci), *SERVICE)
    state = pods.state(uuid)
    assert state["state"] == "running" and proc_alive(state["kvmpod_pid"])
    deadline = time.time() + 60
    while b"to-stderr" not in pods.cmd("logs", uuid).stdout and time.time() < deadline:
        time.sleep(0.2)
    assert pods.cmd("logs", uuid[:6]).stdout == b"up\nto-stderr\n"  # stdout and stderr, one file
    follow = subprocess.Popen(kvmpod_cmd("logs", "--follow", uuid), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=pods.env)
    time.sleep(1)
    assert follow.poll() is None  # still following while the pod runs
    assert pods.cmd("rm", uuid).returncode == 125  # refused while it runs
    stopped = pods.cmd("stop", uuid[:8])
    assert (stopped.returncode, stopped.stdout) == (0, f"{uuid}\n".encode()), stopped.stderr
    assert not proc_alive(state["qemu_pid"]) and not proc_alive(state["kvmpod_pid"])
    out, err = follow.communicate(timeout=30)  # ends with the pod
    assert (follow.returncode, out) == (0, b"up\nto-stderr\ngot TERM\n"), err
    status = pods.cmd("status", uuid)
    assert b"state:   exited" in status.stdout and b"exited with code 0" in status.stdout
    assert not list(pods.pod_dir(uuid).glob("*.sock"))
    assert pods.cmd("stop", uuid).returncode == 0  # an ended pod: not an error
    assert pods.cmd("logs", uuid).stdout == b"up\nto-stderr\ngot TERM\n"
    assert pods.cmd("rm", uuid).returncode == 0
    assert not pods.pod_dir(uuid).exists()


def test_stop_escalates_to_sigkill_after_the_timeout(pods, busybox_aci):
    uuid = pods.detach(str(busybox_aci), *STUBBORN)
    time.sleep(1)  # let the shell install its trap
    result = pods.cmd("stop", "--timeout", "1", uuid)
    assert result.returncode == 0, result.stderr
    assert b"killed by signal 9" in pods.cmd("status", uuid).stdout
    assert pods.cmd("rm", uuid).returncode == 0


def test_stop_force_kills_qemu_at_once(pods, busybox_aci):
    uuid = pods.detach(str(busybox_aci), *STUBBORN)
    state = pods.state(uuid)
    result = pods.cmd("stop", "--force", uuid)
    assert result.returncode == 0, result.stderr
    assert not proc_alive(state["qemu_pid"]) and not proc_alive(state["kvmpod_pid"])
    assert b"killed by signal 9" in pods.cmd("status", uuid).stdout
    assert pods.cmd("rm", uuid).returncode == 0


def test_stop_an_attached_pod(pods, kvmpod, busybox_aci):
    proc = kvmpod.popen(str(busybox_aci), *SERVICE)
    try:
        state = kvmpod.wait_for_running_pod(proc)
        entered = pods.cmd("enter", state["uuid"], "--", "/bin/echo", "inside")
        assert (entered.returncode, entered.stdout) == (0, b"inside\n"), entered.stderr
        time.sleep(0.5)
        assert pods.cmd("stop", state["uuid"]).returncode == 0
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0 and out.endswith(b"got TERM\n")
    finally:
        proc.kill()
        proc.wait()


def test_detach_startup_failure_is_reported_and_leaves_nothing(pods, busybox_aci):
    result = pods.cmd("run", "--detach", str(busybox_aci), "--exec", "/bin/nope")
    assert result.returncode == 127 and "/bin/nope" in the_error(result)
    assert result.stdout == b""


# -- many at once --------------------------------------------------------------------------------

PODS = 8


def test_eight_pods_at_once_each_entered_and_stopped(pods, busybox_aci, kvmpod_env):
    starts = [subprocess.Popen(kvmpod_cmd("run", "--detach", "--set-env", f"N={i}", str(busybox_aci), *SERVICE),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=kvmpod_env) for i in range(PODS)]
    uuids = []
    for start in starts:
        out, err = start.communicate(timeout=VM_TIMEOUT * 2)
        assert start.returncode == 0, err.decode()
        uuids.append(out.decode().strip())
    pods.made += uuids
    states = [pods.state(u) for u in uuids]
    for i, uuid in enumerate(uuids):
        result = pods.cmd("enter", uuid, "--", "/bin/sh", "-c", "echo pod $N; exit $N")
        assert (result.returncode, result.stdout) == (i, f"pod {i}\n".encode()), result.stderr
    stopped = pods.cmd("stop", *uuids)
    assert stopped.returncode == 0 and stopped.stdout.decode().split() == uuids, stopped.stderr
    for uuid, state in zip(uuids, states):
        assert not proc_alive(state["qemu_pid"]) and not proc_alive(state["kvmpod_pid"])
        assert not list(pods.pod_dir(uuid).glob("*.sock"))
        assert b"exited with code 0" in pods.cmd("status", uuid).stdout
    assert pods.cmd("rm", *uuids).returncode == 0
    assert qemu_pids_of(kvmpod_env["KVMPOD_RUN_DIR"]) == []
    assert list(Path(kvmpod_env["KVMPOD_RUN_DIR"], "pods").iterdir()) == []
