"""The commands' end of a pod's control socket (docs/control.md): `enter`, `stop`, `logs --follow`.

These run in short-lived kvmpod processes, so they are plain blocking code around one poll loop;
the pod's own process (kvmpod/pod/control.py) is the asyncio end.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import selectors
import signal
import socket
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from kvmpod.errors import EXIT_KVMPOD_FAILURE, EXIT_SIGNAL_BASE, Interrupted, KvmpodError
from kvmpod.pod import control as c
from kvmpod.pod.registry import FINISHED, PodInfo, kill_stray_qemu
from kvmpod.pod.terminal import RawTerminal, is_terminal, window_size

CONNECT_WAIT = 10.0     # seconds a pod still being prepared may take to open its control socket
OWNER_EXIT_WAIT = 10.0  # seconds `stop` waits for the pod's kvmpod to exit once the pod is gone
STOP_SLACK = 60.0       # beyond --timeout: the SIGKILL wait, power-off and QEMU's exit
READ_CHUNK = 65536
MAX_QUEUED_INPUT = 256 * 1024  # stdin read ahead of the socket: beyond it, stdin is not read


class PodGone(KvmpodError):
    """The pod has ended (or its kvmpod process has gone): there is nobody to talk to."""


def control_path(pod: PodInfo) -> Path:
    return pod.path / "control.sock"


def connect(pod: PodInfo) -> socket.socket:
    """A connection to the pod's kvmpod process. A pod being prepared gets CONNECT_WAIT seconds
    to open its socket; a pod that has ended raises PodGone."""
    deadline = time.monotonic() + CONNECT_WAIT
    while True:
        if pod.status in FINISHED or not pod.owner_alive:
            raise PodGone(f"pod {pod.uuid} is not running (state {pod.status})")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(str(control_path(pod)))
            return sock
        except (FileNotFoundError, ConnectionRefusedError) as e:
            sock.close()
            if time.monotonic() > deadline:
                raise KvmpodError(f"pod {pod.uuid} does not answer on {control_path(pod)}: {e.strerror}") from e
        except OSError as e:
            sock.close()
            raise KvmpodError(f"{control_path(pod)}: {e.strerror}") from e
        time.sleep(0.05)
        pod = pod.reloaded()


def _recv_frames(sock: socket.socket, parser: c.FrameParser, timeout: float | None = None) -> list[tuple[c.Kind, bytes]]:
    """At least one frame (blocking), or [] at EOF."""
    sock.settimeout(timeout)
    while True:
        try:
            data = sock.recv(READ_CHUNK)
        except socket.timeout as e:
            raise KvmpodError("the pod's kvmpod process did not answer") from e
        if not data:
            if parser.pending:
                raise c.ControlError("control connection closed in the middle of a frame")
            return []
        frames = list(parser.feed(data))
        if frames:
            return frames


def request(sock: socket.socket, message: dict[str, Any], parser: c.FrameParser,
            timeout: float | None = 30.0) -> tuple[dict[str, Any], list[tuple[c.Kind, bytes]]]:
    """Send a request and read its reply; returns the reply and any frames that came with it.
    An error reply raises KvmpodError with the exit code it carries."""
    sock.sendall(c.encode_json(message))
    frames = _recv_frames(sock, parser, timeout)
    if not frames:
        raise KvmpodError("the pod's kvmpod process hung up without answering")
    kind, payload = frames[0]
    if kind is not c.Kind.JSON:
        raise c.ControlError(f"the pod answered with a {kind.name} frame instead of a reply")
    reply = c.decode_json(payload)
    if reply.get("ok") is not True:
        error = KvmpodError(str(reply.get("error", "the pod refused the request")))
        code = reply.get("exit_code")
        error.exit_code = code if isinstance(code, int) and 0 < code < 256 else EXIT_KVMPOD_FAILURE
        raise error
    return reply, frames[1:]


def _wait_for_eof(sock: socket.socket, timeout: float | None) -> bool:
    sock.settimeout(timeout)
    try:
        while sock.recv(READ_CHUNK):
            pass
    except socket.timeout:
        return False
    except OSError:
        pass
    return True


def process_ended(pid: int) -> bool:
    """True once `pid` has exited: gone, or a zombie its (new) parent has not reaped yet."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rfind(")") + 2:][:1] in ("Z", "X")


def _wait_for_owner_exit(pod: PodInfo, timeout: float) -> None:
    """The pod's kvmpod has closed the control socket as its last act; let it finish exiting."""
    pid = pod.state.get("kvmpod_pid")
    deadline = time.monotonic() + timeout
    while isinstance(pid, int) and pod.owner_alive and not process_ended(pid) and time.monotonic() < deadline:
        time.sleep(0.02)


# -- stop ----------------------------------------------------------------------------------------

def stop(pod: PodInfo, timeout: float, force: bool) -> None:
    """SIGTERM to the apps, `timeout` seconds, SIGKILL, power-off; --force: QEMU killed at once.
    Returns once QEMU is gone and the pod's kvmpod has exited. A pod that has ended already is fine."""
    if pod.status == "abandoned":
        kill_stray_qemu(pod)
        return
    try:
        sock = connect(pod)
    except PodGone:
        return
    with sock:
        try:
            request(sock, {"op": "stop", "timeout": timeout, "force": force}, c.FrameParser())
        except (ConnectionError, c.ControlError):
            pass  # it ended as we asked: the same outcome
        if not _wait_for_eof(sock, timeout + STOP_SLACK):
            raise KvmpodError(f"pod {pod.uuid} did not stop within {timeout + STOP_SLACK:.0f} s")
    _wait_for_owner_exit(pod, OWNER_EXIT_WAIT)


# -- waiting for the end (logs --follow) ----------------------------------------------------------

def watch_end(pod: PodInfo) -> socket.socket | None:
    """A connection whose EOF says the pod has ended; None if it has already."""
    try:
        sock = connect(pod)
        request(sock, {"op": "wait"}, c.FrameParser())
        return sock
    except (PodGone, ConnectionError, c.ControlError):
        return None


# -- enter ---------------------------------------------------------------------------------------

@dataclass
class EnterRequest:
    argv: list[str]
    app: str | None = None
    env: list[str] = field(default_factory=list)
    user: str | None = None
    group: str | None = None
    workdir: str | None = None
    kill_on_hangup: bool = False   # the process gets SIGKILL, not SIGHUP, if this client goes (OCI exec)

    def message(self, tty: tuple[int, int] | None) -> dict[str, Any]:
        env = self.env
        if tty and (term := os.environ.get("TERM")):
            env = [f"TERM={term}", *env]  # the terminal's type travels with it, as with ssh
        return {"op": "enter", "app": self.app, "argv": self.argv, "env": env, "user": self.user,
                "group": self.group, "workdir": self.workdir,
                "tty": {"rows": tty[0], "cols": tty[1]} if tty else None,
                **({"kill_on_hangup": True} if self.kill_on_hangup else {})}


def exit_status(message: dict[str, Any]) -> int:
    """The shell-style exit status of an {"exit": {...}} message."""
    status = message.get("exit")
    if isinstance(status, dict):
        if isinstance(status.get("signal"), int):
            return EXIT_SIGNAL_BASE + status["signal"]
        if isinstance(status.get("code"), int):
            return status["code"] & 0xFF
    raise c.ControlError("malformed exit message")


FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class EnterSession:
    """Relays one entered process's stdio over its control connection until it exits."""

    def __init__(self, sock: socket.socket, tty: bool, stdin_fd: int = 0, stdout_fd: int = 1, stderr_fd: int = 2):
        self.sock = sock
        self.tty = tty
        self.stdin_fd, self.stdout_fd, self.stderr_fd = stdin_fd, stdout_fd, stderr_fd
        self.parser = c.FrameParser()
        self.outgoing = bytearray()
        self.stdin_open = True
        self.signals_seen = 0
        self.broken: set[int] = set()
        self.pid = 0   # the process's pid in the guest, once started

    def start(self, req: EnterRequest) -> deque[tuple[c.Kind, bytes]]:
        size = (window_size(self.stdin_fd) or (24, 80)) if self.tty else None
        reply, early = request(self.sock, req.message(size), self.parser, timeout=None)
        pid = reply.get("pid")
        self.pid = pid if isinstance(pid, int) else 0
        return deque(early)

    def run(self, req: EnterRequest, on_started: Callable[[int], None] | None = None) -> int:
        """Start the process (`on_started` gets its guest pid), relay until it ends; its exit status."""
        pending = self.start(req)
        if on_started is not None:
            on_started(self.pid)
        with _Signals(self.tty) as signals, \
                (RawTerminal(self.stdin_fd) if self.tty else contextlib.nullcontext()):
            return self._loop(pending, signals)

    def _loop(self, pending: deque[tuple[c.Kind, bytes]], signals: "_Signals") -> int:
        self.sock.setblocking(False)
        sel = selectors.PollSelector()  # poll, not epoll: stdin may be a regular file
        sel.register(self.sock, selectors.EVENT_READ)
        sel.register(signals.fd, selectors.EVENT_READ)
        try:
            while True:
                while pending:
                    status = self._on_frame(*pending.popleft())
                    if status is not None:
                        return status
                self._register(sel)
                for key, mask in sel.select():
                    if key.fileobj is self.sock:
                        if mask & selectors.EVENT_WRITE:
                            self._flush()
                        if mask & selectors.EVENT_READ:
                            pending.extend(self._read_socket())
                    elif key.fileobj == signals.fd:
                        for signo in signals.take():
                            self._on_signal(signo)
                    elif key.fileobj == self.stdin_fd:
                        self._read_stdin()
        finally:
            sel.close()

    def _register(self, sel: selectors.BaseSelector) -> None:
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if self.outgoing else 0)
        sel.modify(self.sock, events)
        want_stdin = self.stdin_open and len(self.outgoing) < MAX_QUEUED_INPUT
        registered = self.stdin_fd in {k.fileobj for k in sel.get_map().values()}
        if want_stdin and not registered:
            sel.register(self.stdin_fd, selectors.EVENT_READ)
        elif registered and not want_stdin:
            sel.unregister(self.stdin_fd)

    def _send(self, frame: bytes) -> None:
        self.outgoing += frame
        self._flush()

    def _flush(self) -> None:
        while self.outgoing:
            try:
                n = self.sock.send(self.outgoing)
            except BlockingIOError:
                return
            except OSError:
                self.outgoing.clear()  # the pod has gone: its EOF comes next
                return
            del self.outgoing[:n]

    def _read_socket(self) -> list[tuple[c.Kind, bytes]]:
        try:
            data = self.sock.recv(READ_CHUNK)
        except BlockingIOError:
            return []
        except OSError:
            data = b""
        if not data:
            raise KvmpodError("the pod's kvmpod process went away before the command ended")
        return list(self.parser.feed(data))

    def _read_stdin(self) -> None:
        try:
            data = os.read(self.stdin_fd, READ_CHUNK)
        except BlockingIOError:
            return
        except OSError as e:
            if e.errno == errno.EINTR:
                return
            data = b""
        if data:
            self._send(c.encode(c.Kind.STDIN, data))
        else:
            self._stdin_eof()

    def _stdin_eof(self) -> None:
        if self.stdin_open:
            self.stdin_open = False
            self._send(c.encode_json({"eof": True}))

    def _write(self, fd: int, data: bytes) -> None:
        view = memoryview(data)
        while view and fd not in self.broken:
            try:
                view = view[os.write(fd, view):]
            except BlockingIOError:
                select.select([], [fd], [])
            except OSError:
                self.broken.add(fd)  # a closed reader: the rest of the output goes nowhere

    def _on_frame(self, kind: c.Kind, payload: bytes) -> int | None:
        if kind is c.Kind.STDOUT:
            self._write(self.stdout_fd, payload)
        elif kind is c.Kind.STDERR:
            self._write(self.stderr_fd, payload)
        elif kind is c.Kind.JSON:
            message = c.decode_json(payload)
            if "exit" in message:
                return exit_status(message)
            if "error" in message:
                raise KvmpodError(str(message["error"]))
        else:
            raise c.ControlError(f"the pod sent a {kind.name} frame")
        return None

    def _on_signal(self, signo: int) -> None:
        if signo == signal.SIGWINCH:
            if self.tty and (size := window_size(self.stdin_fd)):
                self._send(c.encode_json({"resize": {"rows": size[0], "cols": size[1]}}))
            return
        self.signals_seen += 1
        if self.signals_seen == 1:
            self._send(c.encode_json({"signal": signo}))
            return
        raise Interrupted(f"gave up on the command after a second signal {signo}", EXIT_SIGNAL_BASE + signo)


def fill_std_fds() -> None:
    """/dev/null on any of fds 0-2 that is closed, so no socket lands there (a closed stdin reads as empty)."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            opened = os.open(os.devnull, os.O_RDWR)
            if opened != fd:
                os.dup2(opened, fd)
                os.close(opened)


class _Signals:
    """SIGINT, SIGTERM, SIGHUP (and SIGWINCH for a terminal) as bytes on a pipe the poll loop
    watches (signal.set_wakeup_fd); the previous handlers come back on exit."""

    def __init__(self, tty: bool):
        self.signals = (*FORWARDED_SIGNALS, *((signal.SIGWINCH,) if tty else ()))
        self._saved: dict[int, Any] = {}
        self._rfd = self._wfd = -1
        self._old_wakeup = -1

    @property
    def fd(self) -> int:
        return self._rfd

    def __enter__(self) -> "_Signals":
        self._rfd, self._wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._old_wakeup = signal.set_wakeup_fd(self._wfd, warn_on_full_buffer=False)
        for signo in self.signals:
            self._saved[signo] = signal.signal(signo, _noop)
        return self

    def take(self) -> Iterator[int]:
        try:
            data = os.read(self._rfd, 512)
        except BlockingIOError:
            return iter(())
        return iter(data)

    def __exit__(self, *exc: object) -> None:
        for signo, handler in self._saved.items():
            signal.signal(signo, handler)
        signal.set_wakeup_fd(self._old_wakeup)
        os.close(self._rfd)
        os.close(self._wfd)


def _noop(signo: int, frame: object) -> None:
    """The C-level handler writes the signal number to the wakeup fd; nothing else to do here."""


def enter(pod: PodInfo, req: EnterRequest, tty: bool | None = None) -> int:
    """Run req.argv in an app of `pod`; returns its exit status (128+N when killed by signal N)."""
    fill_std_fds()
    if tty is None:
        tty = is_terminal(0)
    try:
        sock = connect(pod)
    except PodGone as e:
        raise KvmpodError(str(e)) from e
    with sock:
        return EnterSession(sock, tty).run(req)


# -- logs ----------------------------------------------------------------------------------------

FOLLOW_POLL = 0.2  # seconds between looks at a followed log file (there is no event for a write)


def choose_app_name(pod: PodInfo, name: str | None) -> str:
    names = pod.app_names
    if name is None and len(names) == 1:
        return names[0]
    if name is None:
        raise KvmpodError(f"pod {pod.uuid} has several apps ({', '.join(names)}): choose one with --app")
    if name not in names:
        raise KvmpodError(f"pod {pod.uuid} has no app {name!r} (its apps: {', '.join(names)})")
    return name


def _copy_new(f, out) -> None:
    while chunk := f.read(READ_CHUNK):
        out.write(chunk)
    out.flush()


def print_logs(pod: PodInfo, app: str | None, follow: bool) -> None:
    """Print an app's log (<pod dir>/logs/<app>.log); with `follow`, go on until the pod has ended."""
    logs = pod.path / "logs"
    if not logs.is_dir():
        raise KvmpodError(f"pod {pod.uuid} has no logs: only pods run with --detach keep their apps' output")
    path = logs / f"{choose_app_name(pod, app)}.log"
    watcher = watch_end(pod) if follow else None
    out = sys.stdout.buffer
    try:
        with open(path, "rb") as f:
            _copy_new(f, out)
            while watcher is not None:
                readable, _, _ = select.select([watcher], [], [], FOLLOW_POLL)
                _copy_new(f, out)
                if readable and not watcher.recv(READ_CHUNK):
                    break  # the pod has ended: its kvmpod has written everything
            _copy_new(f, out)
    except FileNotFoundError as e:
        raise KvmpodError(f"{path}: no such log (the pod has no app by that name)") from e
    finally:
        if watcher is not None:
            watcher.close()
