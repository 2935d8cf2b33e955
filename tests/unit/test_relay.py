"""kvmpod-relay (kvmpod/relay/relay.c) against fake channels: socketpairs for the agent and QMP, a
listening control socket, a child process for QEMU. Its way back to kvmpod is replaced by a small
Python program that records the arguments and the unread bytes it was given."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvmpod.agent import protocol as p
from tests.conftest import REPO

RELAY = REPO / "guest-agent" / "build" / "kvmpod-relay"
RECORDER = """
import json, os, sys
result, qmp_fd, args = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
unread = os.read(int(args[args.index("--unread") + 1]), 1 << 22)
os.set_blocking(qmp_fd, False)
try:
    qmp = os.read(qmp_fd, 4096)
except BlockingIOError:
    qmp = b""
with open(result, "w") as f:
    json.dump({"args": args, "unread": unread.hex(), "qmp": qmp.hex()}, f)
"""


@pytest.fixture(scope="module")
def relay_binary() -> Path:
    subprocess.run(["make", "-s", "-C", str(RELAY.parent.parent), "build/kvmpod-relay"], check=True)
    return RELAY


def frame(mtype: p.MessageType, stream: int, payload: bytes = b"") -> bytes:
    return p.Frame(mtype, stream, payload).encode()


class Rig:
    """One relay run: its channels, the ends the test holds, and what came back."""

    def __init__(self, tmp: Path, relay: Path, unread: bytes = b"", broken: list[int] | None = None):
        self.tmp = tmp
        self.agent, agent_relay = socket.socketpair()
        self.qmp, qmp_relay = socket.socketpair()
        self.control_path = tmp / "control.sock"
        control = socket.socket(socket.AF_UNIX)
        control.bind(str(self.control_path))
        control.listen()
        self.qemu = subprocess.Popen(["sleep", "60"])
        pidfd = os.pidfd_open(self.qemu.pid)
        self.out_r, out_w = os.pipe()
        self.err_r, err_w = os.pipe()
        unread_fd = os.memfd_create("unread", 0)
        os.write(unread_fd, unread)
        os.lseek(unread_fd, 0, os.SEEK_SET)
        self.result = tmp / "result.json"
        script = tmp / "recorder.py"
        script.write_text(RECORDER)
        fds = [agent_relay.fileno(), qmp_relay.fileno(), control.fileno(), pidfd, out_w, err_w, unread_fd]
        argv = [str(relay), "--agent", str(fds[0]), "--qmp", str(fds[1]), "--control", str(fds[2]),
                "--qemu", str(pidfd), "--unread", str(unread_fd), "--stream", f"1:{out_w}:{err_w}"]
        for fd in broken or []:
            argv += ["--broken", str(fd)]
        argv += ["--", sys.executable, str(script), str(self.result), str(fds[1])]
        self.out_w, self.err_w = out_w, err_w
        # as kvmpod does before its exec: the pod's signals are blocked, so none is lost before the relay reads them
        self.proc = subprocess.Popen(argv, pass_fds=fds, preexec_fn=lambda: signal.pthread_sigmask(
            signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}))
        for fd in (pidfd, out_w, err_w, unread_fd):
            os.close(fd)
        for sock in (agent_relay, qmp_relay, control):
            sock.close()

    def back(self, timeout: float = 10) -> dict:
        """Wait for the way back; the recorded arguments and unread bytes."""
        assert self.proc.wait(timeout) == 0
        result = json.loads(self.result.read_text())
        result["unread"] = bytes.fromhex(result["unread"])
        return result

    def read_out(self, fd: int, n: int, timeout: float = 10) -> bytes:
        data = b""
        deadline = time.time() + timeout
        os.set_blocking(fd, False)
        while len(data) < n and time.time() < deadline:
            try:
                data += os.read(fd, n - len(data))
            except BlockingIOError:
                time.sleep(0.01)
        return data

    def close(self) -> None:
        for proc in (self.proc, self.qemu):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for fd in (self.out_r, self.err_r):
            os.close(fd)
        self.agent.close()
        self.qmp.close()


@pytest.fixture
def rig(tmp_path, relay_binary):
    rigs: list[Rig] = []

    def make(**kwargs) -> Rig:
        rigs.append(Rig(tmp_path, relay_binary, **kwargs))
        return rigs[-1]

    yield make
    for r in rigs:
        r.close()


def test_output_is_relayed_until_a_frame_for_kvmpod(rig):
    r = rig()
    exit_frame = frame(p.MessageType.EXIT, 1, b"\x01\x02")
    r.agent.sendall(frame(p.MessageType.STDOUT, 1, b"hello ") + frame(p.MessageType.STDERR, 1, b"oops"))
    assert r.read_out(r.out_r, 6) == b"hello "
    assert r.read_out(r.err_r, 4) == b"oops"
    r.agent.sendall(frame(p.MessageType.STDOUT, 1, b"world") + exit_frame + frame(p.MessageType.STDOUT, 1, b"late"))
    back = r.back()
    assert r.read_out(r.out_r, 5) == b"world"
    assert back["args"][:4] == ["--unread", back["args"][1], "--why", "agent"]
    assert back["unread"].startswith(exit_frame)  # kvmpod reads from the first frame it has to judge


def test_unread_bytes_from_kvmpod_come_first(rig):
    half = frame(p.MessageType.STDOUT, 1, b"split across")
    r = rig(unread=frame(p.MessageType.STDOUT, 1, b"queued ") + half[:7])
    r.agent.sendall(half[7:])
    assert r.read_out(r.out_r, 19) == b"queued split across"
    r.agent.close()  # EOF: kvmpod is the one to explain it
    assert r.back()["args"][3] == "agent"


def test_a_partial_frame_at_eof_goes_back_unread(rig):
    r = rig()
    r.agent.sendall(frame(p.MessageType.STDOUT, 1, b"cut")[:9])
    r.agent.close()
    back = r.back()
    assert back["args"][3] == "agent" and back["unread"] == frame(p.MessageType.STDOUT, 1, b"cut")[:9]


@pytest.mark.parametrize("bad", [
    frame(p.MessageType.STDOUT, 2, b"unknown stream"),
    frame(p.MessageType.STDOUT, 1, b"x")[:6] + b"\x01\x00" + frame(p.MessageType.STDOUT, 1, b"x")[8:],  # flags
    (p.MAX_PAYLOAD + 1).to_bytes(4, "little") + frame(p.MessageType.STDOUT, 1)[4:],  # too long
    frame(p.MessageType.LOG, 0, b"a log line"),
])
def test_what_kvmpod_must_judge_goes_back_untouched(rig, bad):
    r = rig()
    r.agent.sendall(bad)
    back = r.back()
    assert back["args"][3] == "agent" and back["unread"] == bad


def test_a_signal_is_taken_and_passed_on(rig):
    r = rig()
    r.proc.send_signal(signal.SIGTERM)
    back = r.back()
    assert back["args"][2:6] == ["--why", "signal", "--signal", str(int(signal.SIGTERM))]


def test_a_control_connection_waits_for_kvmpod(rig):
    r = rig()
    client = socket.socket(socket.AF_UNIX)
    client.connect(str(r.control_path))
    try:
        assert r.back()["args"][3] == "control"
    finally:
        client.close()


def test_a_qmp_message_stays_in_its_socket(rig):
    r = rig()
    event = b'{"event": "SHUTDOWN"}\r\n'
    r.qmp.sendall(event)
    back = r.back()
    assert back["args"][3] == "qmp" and bytes.fromhex(back["qmp"]) == event  # left for kvmpod's QMP client


def test_qemu_ending_brings_kvmpod_back(rig):
    r = rig()
    r.qemu.kill()
    assert r.back()["args"][3] == "qemu"


def test_a_broken_output_is_reported_and_dropped(rig):
    r = rig()
    os.close(r.out_r)
    r.out_r = os.open(os.devnull, os.O_RDONLY)  # for close()
    r.agent.sendall(frame(p.MessageType.STDOUT, 1, b"nobody reads this") + frame(p.MessageType.STDERR, 1, b"seen"))
    assert r.read_out(r.err_r, 4) == b"seen"
    r.agent.sendall(frame(p.MessageType.EXIT, 1))
    args = r.back()["args"]
    assert "--broken" in args and args[args.index("--broken") + 1] == str(r.out_w)


def test_bad_arguments_are_refused(relay_binary):
    for argv, error in ((["--agent", "x"], "--agent: not an fd number"), (["--agent"], "--agent: lacks its value"),
                        (["--stream", "1:2"], "--stream: takes ID:OUTFD:ERRFD"), (["--bogus", "1"], "--bogus: unknown option"),
                        (["--agent", "3"], "--agent, --qmp, --control, --qemu, --unread and a resume command after -- are needed")):
        result = subprocess.run([str(relay_binary), *argv], capture_output=True, text=True)
        assert result.returncode == 2 and result.stderr.startswith(f"kvmpod-relay: {error}"), result.stderr


# -- which pods, which binary (kvmpod/pod/relay.py) ------------------------------------------------

def test_which_pods_stay_in_kvmpod():
    from kvmpod.pod.options import RunOptions
    from kvmpod.pod.relay import unfit

    assert unfit(RunOptions(), False, "serial") is None
    assert unfit(RunOptions(), False, "vhost-vsock") is None
    assert unfit(RunOptions(interactive=True), False, "serial") == "it is interactive"
    assert "virtiofsd" in unfit(RunOptions(), True, "serial")
    assert "vsock device" in unfit(RunOptions(), False, "vsock-user")


def test_finding_the_relay(tmp_path, monkeypatch, relay_binary):
    from kvmpod.errors import ConfigError
    from kvmpod.pod.relay import ENV_RELAY, find_relay

    config = tmp_path / "kvmpod.toml"
    monkeypatch.setenv("KVMPOD_CONFIG", str(config))
    monkeypatch.delenv(ENV_RELAY, raising=False)
    assert find_relay() == relay_binary  # the checkout's build
    config.write_text("[run]\nidle-relay = false\n")
    assert find_relay() is None
    config.write_text('[run]\nidle-relay = "no"\n')
    with pytest.raises(ConfigError, match=r"idle-relay in .*kvmpod.toml must be true or false"):
        find_relay()
    monkeypatch.setenv(ENV_RELAY, "off")
    assert find_relay() is None
    monkeypatch.setenv(ENV_RELAY, str(tmp_path))
    with pytest.raises(ConfigError, match=r"\$KVMPOD_RELAY names .*, which is not an executable file"):
        find_relay()
    monkeypatch.setenv(ENV_RELAY, str(relay_binary))
    assert find_relay() == relay_binary
