"""The pod control socket without a VM: framing, what `enter` runs, the server and client ends,
the local terminal, the stop escalation, and the command lines of enter/logs/stop/rm."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import signal
import socket
import stat
import termios
import threading
from pathlib import Path

import pytest

from kvmpod import cli
from kvmpod.cli import interact
from kvmpod.cli import run as cli_run
from kvmpod.cli.parser import parse
from kvmpod.agent.session import ExitStatus, Isolators
from kvmpod.errors import Interrupted, KvmpodError, UsageError
from kvmpod.pod import client, control, registry
from kvmpod.pod.control import ControlError, FrameParser, Kind
from kvmpod.pod.options import RunOptions
from kvmpod.pod.poddir import PodDir
from kvmpod.pod.runner import PodRunner
from kvmpod.pod.spec import ResolvedApp
from kvmpod.pod.terminal import RawTerminal, window_size
from tests.unit.test_registry import dead_pid, make_pod

# -- framing -------------------------------------------------------------------------------------


def test_frames_round_trip_even_byte_by_byte():
    frames = [(Kind.JSON, json.dumps({"op": "wait"}).encode()), (Kind.STDIN, b"\0\xffbinary"), (Kind.STDOUT, b""),
              (Kind.STDERR, os.urandom(70000))]
    wire = b"".join(control.encode(k, p) for k, p in frames)
    parser = FrameParser()
    got = [f for i in range(len(wire)) for f in parser.feed(wire[i:i + 1])]
    assert got == frames and parser.pending == 0


@pytest.mark.parametrize("header, problem", [
    (control.HEADER.pack(control.MAX_FRAME + 1, Kind.STDIN), "exceeds"),
    (control.HEADER.pack(1, 99), "unknown control frame kind 99"),
])
def test_bad_frames_are_refused_before_reading_their_payload(header, problem):
    with pytest.raises(ControlError, match=problem):
        list(FrameParser().feed(header))


@pytest.mark.parametrize("payload, problem", [(b"{", "not valid JSON"), (b"[1]", "not a JSON object")])
def test_json_frames_must_hold_an_object(payload, problem):
    with pytest.raises(ControlError, match=problem):
        control.decode_json(payload)


def test_async_reader_tells_clean_eof_from_a_cut_frame():
    async def read(data: bytes):
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        return await control.read_frame(reader)

    assert asyncio.run(read(control.encode_json({"a": 1}))) == (Kind.JSON, b'{"a":1}')
    assert asyncio.run(read(b"")) is None
    with pytest.raises(ControlError, match="middle of a frame"):
        asyncio.run(read(control.encode(Kind.STDIN, b"abc")[:-1]))


# -- what enter runs -------------------------------------------------------------------------------


def app(name: str, **changes) -> ResolvedApp:
    fields = dict(name=name, image=None, disk=Path("/d"), disk_serial="img0", argv=["/bin/app"],
                  env=["PATH=/bin", f"AC_APP_NAME={name}", "A=app"], working_dir="/srv", user="app", group="staff",
                  supplementary_gids=[7], readonly_rootfs=True, isolators=Isolators(caps_retain=("CAP_CHOWN",)))
    fields.update(changes)
    return ResolvedApp(**fields)  # type: ignore[arg-type]


def test_enter_runs_in_the_apps_root_as_the_app_with_its_environment():
    spec = control.enter_spec([app("web")], {"argv": ["ls", "-l"], "env": ["A=user", "B=2", "AC_APP_NAME=x"]})
    assert (spec.app_name, spec.disk_serial, spec.argv) == ("web", "img0", ["ls", "-l"])
    assert spec.env == ["PATH=/bin", "AC_APP_NAME=web", "A=user", "B=2"]
    assert (spec.workdir, spec.user, spec.group, spec.supplementary_gids) == ("/srv", "app", "staff", [7])
    assert spec.enter and spec.stdin and spec.tty is None
    assert spec.isolators == Isolators() and not spec.pre_start and not spec.post_stop  # like rkt enter
    from kvmpod.agent import protocol as p
    assert spec.message().start_flags == p.StartFlag.ENTER | p.StartFlag.STDIN


def test_enter_overrides_and_terminal_size():
    spec = control.enter_spec([app("web")], {"argv": ["/bin/sh"], "user": "0", "group": "0", "workdir": "/tmp",
                                             "tty": {"rows": 0, "cols": 100000}})
    assert (spec.user, spec.group, spec.workdir, spec.tty) == ("0", "0", "/tmp", (1, 65535))
    from kvmpod.agent import protocol as p
    start = spec.message()
    assert (start.tty_rows, start.tty_cols) == (1, 65535)
    assert start.start_flags is not None and start.start_flags & p.StartFlag.TTY


@pytest.mark.parametrize("apps, name, problem", [
    (["a", "b"], None, r"several apps \(a, b\): choose one with --app"),
    (["a", "b"], "c", r"no app 'c' \(its apps: a, b\)"),
])
def test_enter_names_the_apps_when_the_choice_is_unclear(apps, name, problem):
    with pytest.raises(KvmpodError, match=problem):
        control.enter_spec([app(n) for n in apps], {"argv": ["/bin/sh"], "app": name})


@pytest.mark.parametrize("request_, problem", [
    ({"argv": []}, "argv must name a command"),
    ({"argv": "sh"}, "argv must be a list"),
    ({"argv": ["/bin/sh"], "env": ["NOEQUALS"]}, "not NAME=VALUE"),
    ({"argv": ["/bin/sh"], "workdir": "rel"}, "not absolute"),
    ({"argv": ["/bin/sh"], "tty": {"rows": "x", "cols": 1}}, "integer rows and cols"),
])
def test_malformed_enter_requests_are_refused(request_, problem):
    with pytest.raises(KvmpodError, match=problem):
        control.enter_spec([app("web")], request_)


# -- the server, with a stand-in for the pod's runner --------------------------------------------


class FakeRunner:
    def __init__(self, path: Path):
        self.pod = PodDir("1234", path, {"state": "booting"})
        self.apps = [app("web")]
        self.accepts_enter = False
        self.stops: list[tuple[float, bool]] = []

    def request_stop(self, timeout: float, force: bool) -> None:
        self.stops.append((timeout, force))


def talk(path: Path, *frames: bytes) -> list[tuple[Kind, bytes]]:
    """Connect, send, read until the server hangs up (blocking: run it in a thread)."""
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(path))
        for frame in frames:
            s.sendall(frame)
        parser, got = FrameParser(), []
        while data := s.recv(65536):
            got += parser.feed(data)
        return got


async def serve(tmp_path: Path, *conversations: tuple[bytes, ...], close_after: float = 0.3):
    runner = FakeRunner(tmp_path)
    server = control.ControlServer(tmp_path / "control.sock", runner)  # type: ignore[arg-type]
    await server.start()
    mode = stat.S_IMODE(os.stat(tmp_path / "control.sock").st_mode)
    loop = asyncio.get_running_loop()
    talks = [loop.run_in_executor(None, talk, tmp_path / "control.sock", *frames) for frames in conversations]
    await asyncio.sleep(close_after)
    await server.close()
    results = await asyncio.gather(*talks)
    return runner, mode, results


def test_server_stop_and_wait_hold_the_connection_until_the_pod_is_gone(tmp_path):
    runner, mode, (stop, wait) = asyncio.run(serve(
        tmp_path, (control.encode_json({"op": "stop", "timeout": 3, "force": True}),),
        (control.encode_json({"op": "wait"}),)))
    assert mode == 0o600 and not (tmp_path / "control.sock").exists()
    assert runner.stops == [(3.0, True)]
    assert [json.loads(p) for _, p in stop] == [{"ok": True, "uuid": "1234"}]
    assert [json.loads(p) for _, p in wait] == [{"ok": True, "uuid": "1234"}]


def test_server_refuses_bad_requests_with_one_line(tmp_path):
    _, _, results = asyncio.run(serve(
        tmp_path, (control.encode_json({"op": "dance"}),), (control.encode(Kind.STDIN, b"x"),),
        (control.encode_json({"op": "enter", "argv": ["/bin/sh"]}),),
        (control.encode_json({"op": "stop", "timeout": "soon"}),)))
    replies = [json.loads(frames[0][1]) for frames in results]
    assert [r["ok"] for r in replies] == [False] * 4
    assert "unknown control request 'dance'" in replies[0]["error"]
    assert "must be a JSON request" in replies[1]["error"]
    assert "pod 1234 is booting: its apps are not running" == replies[2]["error"]
    assert "timeout must be a number" in replies[3]["error"]


def test_peers_must_be_the_same_user_or_root():
    assert control.peer_allowed(os.getuid()) and control.peer_allowed(0)
    assert not control.peer_allowed(os.getuid() + 12345 or 1)


# -- the client's enter session, against a scripted pod ---------------------------------------------


EOF_FRAME = (Kind.JSON, b'{"eof":true}')


def scripted_pod(sock: socket.socket, script: list[bytes], seen: list, after_eof: list[bytes] = ()) -> threading.Thread:
    """Reads the request, answers with `script` (and `after_eof` once the client's stdin has ended),
    recording what the client sends until it hangs up."""
    def run():
        parser = FrameParser()
        while data := sock.recv(65536):
            for frame in parser.feed(data):
                seen.append(frame)
                for out in script if len(seen) == 1 else after_eof if frame == EOF_FRAME else ():
                    sock.sendall(out)
        sock.close()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_enter_session_relays_stdio_and_returns_the_exit_code(tmp_path):
    ours, theirs = socket.socketpair()
    stdin_r, stdin_w = os.pipe()
    os.write(stdin_w, b"typed")
    os.close(stdin_w)
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    seen: list = []
    script = [control.encode_json({"ok": True, "pid": 42}), control.encode(Kind.STDOUT, b"out"),
              control.encode(Kind.STDERR, b"err")]
    thread = scripted_pod(theirs, script, seen, after_eof=[control.encode_json({"exit": {"code": 3}})])
    session = client.EnterSession(ours, tty=False, stdin_fd=stdin_r, stdout_fd=out_w, stderr_fd=err_w)
    assert session.run(client.EnterRequest(["/bin/cat"], app="web", env=["A=1"])) == 3
    ours.close()
    thread.join(5)
    request = json.loads(seen[0][1])
    assert request == {"op": "enter", "app": "web", "argv": ["/bin/cat"], "env": ["A=1"], "user": None,
                       "group": None, "workdir": None, "tty": None}
    assert os.read(out_r, 100) == b"out" and os.read(err_r, 100) == b"err"
    assert seen[1:] == [(Kind.STDIN, b"typed"), EOF_FRAME]


def test_enter_session_reports_a_refusal_and_a_lost_pod():
    for script, problem, code in (
            ([control.encode_json({"ok": False, "error": "exec nope: No such file", "exit_code": 127})],
             "exec nope", 127),
            ([control.encode_json({"ok": True}), control.encode_json({"error": "the pod ended before the command did"})],
             "the pod ended", 125)):
        ours, theirs = socket.socketpair()
        scripted_pod(theirs, script, [])
        r, w = os.pipe()
        os.close(w)
        with pytest.raises(KvmpodError, match=problem) as info:
            client.EnterSession(ours, tty=False, stdin_fd=r).run(client.EnterRequest(["/x"]))
        assert info.value.exit_code == code
        ours.close()


def test_first_signal_is_forwarded_the_second_gives_up():
    ours, theirs = socket.socketpair()
    session = client.EnterSession(ours, tty=False)
    session._on_signal(signal.SIGWINCH)  # no terminal: nothing to resize
    session._on_signal(signal.SIGTERM)
    assert theirs.recv(100) == control.encode_json({"signal": signal.SIGTERM})
    with pytest.raises(Interrupted) as info:
        session._on_signal(signal.SIGINT)
    assert info.value.exit_code == 128 + signal.SIGINT


@pytest.mark.parametrize("message, code", [({"exit": {"code": 7}}, 7), ({"exit": {"code": 256 + 3}}, 3),
                                           ({"exit": {"signal": 9}}, 137)])
def test_exit_status_like_a_shell(message, code):
    assert client.exit_status(message) == code


# -- the local terminal --------------------------------------------------------------------------


def test_raw_mode_is_undone_however_the_block_ends():
    master, slave = pty.openpty()
    try:
        before = termios.tcgetattr(slave)
        with pytest.raises(RuntimeError):
            with RawTerminal(slave):
                lflag, oflag = termios.tcgetattr(slave)[3], termios.tcgetattr(slave)[1]
                assert not lflag & (termios.ICANON | termios.ECHO | termios.ISIG) and not oflag & termios.OPOST
                raise RuntimeError("boom")
        assert termios.tcgetattr(slave) == before
        terminal = RawTerminal(slave).__enter__()
        terminal.restore()
        terminal.restore()  # a second restore (a signal path, then the context's exit) is harmless
        assert termios.tcgetattr(slave) == before
    finally:
        os.close(master)
        os.close(slave)


def test_window_size_of_a_terminal_and_of_a_pipe():
    import fcntl
    import struct

    master, slave = pty.openpty()
    r, w = os.pipe()
    try:
        fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 132, 0, 0))
        assert window_size(slave) == (24, 132)
        assert window_size(r) is None
    finally:
        for fd in (master, slave, r, w):
            os.close(fd)


# -- stop: SIGTERM, the timeout, SIGKILL, power-off ---------------------------------------------------


class FakeProcess:
    def __init__(self, exits_on: set[int]):
        self.exits_on = exits_on
        self.signals: list[int] = []
        self.exited: asyncio.Future = asyncio.get_running_loop().create_future()

    async def signal(self, signo: int) -> None:
        self.signals.append(signo)
        if signo in self.exits_on and not self.exited.done():
            self.exited.set_result(ExitStatus(signal=signo))


class FakeVM:
    pid = 1

    def __init__(self):
        self.ended: asyncio.Future = asyncio.get_running_loop().create_future()
        self.stopped = False

    async def stop(self, grace: float):
        self.stopped = True
        if not self.ended.done():
            self.ended.set_result(None)


def test_stop_escalates_from_sigterm_to_sigkill_to_power_off(tmp_path, monkeypatch):
    from kvmpod.pod import runner as run_module

    monkeypatch.setattr(run_module, "KILL_WAIT", 0.05)

    async def scenario(exits_on: list[set[int]]):
        vm = FakeVM()
        runner = PodRunner(PodDir("u", tmp_path, {"state": "running"}), vm, [], RunOptions(), {"apps_started": 1.0})  # type: ignore[arg-type]
        runner.processes = [FakeProcess(e) for e in exits_on]  # type: ignore[list-item]
        runner.request_stop(0.05, force=False)
        await runner.stop_task
        return [p.signals for p in runner.processes], vm.stopped, runner.stop_reason

    polite, stubborn, hung = signal.SIGTERM, {signal.SIGKILL}, set()
    assert asyncio.run(scenario([{polite}, stubborn])) == (
        [[signal.SIGTERM], [signal.SIGTERM, signal.SIGKILL]], False, None)
    signals, stopped, reason = asyncio.run(scenario([hung]))
    assert signals == [[signal.SIGTERM, signal.SIGKILL]] and stopped and "did not report" in reason[0]


def test_stop_before_the_apps_started_ends_the_vm(tmp_path):
    async def scenario():
        vm = FakeVM()
        runner = PodRunner(PodDir("u", tmp_path, {}), vm, [], RunOptions(), {})  # type: ignore[arg-type]
        runner.request_stop(10, force=False)
        await runner.stop_task
        return vm.stopped, runner.stop_reason

    assert asyncio.run(scenario()) == (True, ("stopped before its apps started", 128 + signal.SIGTERM))


# -- registry and command lines -----------------------------------------------------------------------


def test_rm_refuses_a_running_pod_and_removes_an_ended_one(run_dir, owner, capsys):
    running = make_pod(run_dir, "aaaa1111", "running", owner)
    ended = make_pod(run_dir, "bbbb2222", "exited", dead_pid())
    assert cli.main(["rm", "aaaa", "bbbb"]) == 125
    out, err = capsys.readouterr()
    assert out == "bbbb2222\n" and "pod aaaa1111 is running: stop it first" in err
    assert running.exists() and not ended.exists()


def test_stop_of_an_ended_pod_is_not_an_error(run_dir, capsys):
    make_pod(run_dir, "cccc3333", "exited", dead_pid())
    make_pod(run_dir, "dddd4444", "running", dead_pid())  # abandoned: its kvmpod was SIGKILLed
    assert cli.main(["stop", "cccc", "dddd"]) == 0
    assert capsys.readouterr().out == "cccc3333\ndddd4444\n"


def test_logs_of_a_pod_that_was_not_detached(run_dir):
    make_pod(run_dir, "eeee5555", "exited", dead_pid())
    with pytest.raises(KvmpodError, match="only pods run with --detach"):
        client.print_logs(registry.find_pod("eeee"), None, False)


def test_enter_command_line():
    parser = cli.build_parser()
    ns = parse(parser, ["enter", "abc", "--app", "web", "--set-env", "A=1", "--", "ls", "--app", "-l"])
    assert (ns.func, ns.uuid, ns.app, ns.set_env, ns.command) == ("interact:cmd_enter", "abc", "web", [("A", "1")],
                                                                  ["ls", "--app", "-l"])
    ns = parse(parser, ["enter", "abc"])
    assert interact.enter_command(ns.command) == ["/bin/sh"]
    ns = parse(parser, ["stop", "--force", "--timeout", "3", "a", "b"])
    assert (ns.uuids, ns.force, ns.timeout) == (["a", "b"], True, 3.0)
    assert parse(parser, ["logs", "-f", "a"]).follow


def test_run_detach_and_interactive_exclude_each_other():
    with pytest.raises(UsageError, match="--interactive and --detach"):
        cli_run.cmd_run(parse(cli.build_parser(), ["run", "-i", "-d", "img.aci"]))
