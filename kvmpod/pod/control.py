"""The pod control socket: how other kvmpod commands reach a running pod (docs/control.md).

The `kvmpod run` process that owns a pod listens on `<pod dir>/control.sock` (mode 0600 in the
0700 pod directory; peers must be the same uid or root, checked with SO_PEERCRED). One connection
carries one request: `enter` (a process in an app, its stdio relayed both ways), `stop` (end the
pod) or `wait` (learn when the pod has ended). The end of the pod closes every connection, so a
connection's EOF is the event "the pod is gone: QEMU has exited".

Frames, both directions: `u32 length (LE) | u8 kind | payload`. JSON frames carry one JSON object;
STDIN/STDOUT/STDERR frames carry raw bytes. The framing is here once, for both ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import os
import signal
import socket
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Protocol

from kvmpod.agent.session import GuestProcess, OutputSink, ProcessSpec
from kvmpod.errors import KvmpodError
from kvmpod.pod.poddir import PodDir
from kvmpod.pod.spec import ResolvedApp

log = logging.getLogger(__name__)

HEADER = struct.Struct("<IB")
MAX_FRAME = 1 << 20             # largest payload either end accepts
DATA_CHUNK = 65536              # largest STDIN payload a client sends
REQUEST_TIMEOUT = 10.0          # seconds a new connection has to send its request
MAX_PENDING_OUTPUT = 64 << 20   # output queued for a client that does not read: beyond it, hang up
CLOSE_GRACE = 2.0               # seconds connections get to finish when the pod ends


class Kind(enum.IntEnum):
    JSON = 1
    STDIN = 2
    STDOUT = 3
    STDERR = 4


class ControlError(KvmpodError):
    """The control connection broke or carried something that breaks docs/control.md."""


def encode(kind: Kind, payload: bytes = b"") -> bytes:
    if len(payload) > MAX_FRAME:
        raise ValueError(f"control frame of {len(payload)} bytes exceeds {MAX_FRAME}")
    return HEADER.pack(len(payload), kind) + payload


def encode_json(message: dict[str, Any]) -> bytes:
    return encode(Kind.JSON, json.dumps(message, separators=(",", ":")).encode())


def decode_header(header: bytes) -> tuple[Kind, int]:
    length, kind = HEADER.unpack(header)
    if length > MAX_FRAME:
        raise ControlError(f"control frame of {length} bytes exceeds the {MAX_FRAME}-byte limit")
    try:
        return Kind(kind), length
    except ValueError as e:
        raise ControlError(f"unknown control frame kind {kind}") from e


def decode_json(payload: bytes) -> dict[str, Any]:
    try:
        message = json.loads(payload)
    except ValueError as e:
        raise ControlError("control frame is not valid JSON") from e
    if not isinstance(message, dict):
        raise ControlError("control message is not a JSON object")
    return message


class FrameParser:
    """Incremental decoding for a blocking or selector-driven reader: feed bytes, take frames."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> Iterator[tuple[Kind, bytes]]:
        self._buf += data
        while len(self._buf) >= HEADER.size:
            kind, length = decode_header(bytes(self._buf[:HEADER.size]))
            if len(self._buf) < HEADER.size + length:
                return
            payload = bytes(self._buf[HEADER.size:HEADER.size + length])
            del self._buf[:HEADER.size + length]
            yield kind, payload

    @property
    def pending(self) -> int:
        return len(self._buf)


async def read_frame(reader: asyncio.StreamReader) -> tuple[Kind, bytes] | None:
    """The next frame, or None at a clean EOF (between frames)."""
    try:
        header = await reader.readexactly(HEADER.size)
    except asyncio.IncompleteReadError as e:
        if e.partial:
            raise ControlError("control connection closed in the middle of a frame") from e
        return None
    kind, length = decode_header(header)
    try:
        return kind, await reader.readexactly(length) if length else b""
    except asyncio.IncompleteReadError as cause:
        raise ControlError("control connection closed in the middle of a frame") from cause


def peer_uid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid


def peer_allowed(uid: int) -> bool:
    return uid in (0, os.getuid())


# -- what `enter` runs -------------------------------------------------------------------------

def choose_app(apps: list[ResolvedApp], name: str | None) -> ResolvedApp:
    """The app a request names; without a name, the pod's only app."""
    names = ", ".join(a.name for a in apps)
    if name is None:
        if len(apps) == 1:
            return apps[0]
        raise KvmpodError(f"the pod has several apps ({names}): choose one with --app")
    for app in apps:
        if app.name == name:
            return app
    raise KvmpodError(f"the pod has no app {name!r} (its apps: {names})")


def _str_list(request: dict[str, Any], key: str) -> list[str]:
    value = request.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ControlError(f"enter: {key} must be a list of strings")
    return value


def _opt_str(request: dict[str, Any], key: str) -> str | None:
    value = request.get(key)
    if value is not None and not isinstance(value, str):
        raise ControlError(f"enter: {key} must be a string")
    return value


def tty_size(value: Any) -> tuple[int, int] | None:
    """A {"rows": R, "cols": C} object as (rows, cols), each 1..65535; None when absent."""
    if value is None:
        return None
    rows, cols = (value.get("rows"), value.get("cols")) if isinstance(value, dict) else (None, None)
    if not (isinstance(rows, int) and isinstance(cols, int)) or isinstance(rows, bool) or isinstance(cols, bool):
        raise ControlError("a terminal size needs integer rows and cols")
    return max(1, min(rows, 0xFFFF)), max(1, min(cols, 0xFFFF))


def merge_env(base: list[str], extra: list[str]) -> list[str]:
    """`base` (NAME=value entries) with `extra` added, a later NAME replacing an earlier one in place."""
    merged: dict[str, str] = {}
    for entry in [*base, *extra]:
        name, sep, _ = entry.partition("=")
        if not sep or not name:
            raise ControlError(f"enter: environment entry {entry!r} is not NAME=VALUE")
        merged[name] = entry
    return list(merged.values())


def enter_spec(apps: list[ResolvedApp], request: dict[str, Any]) -> ProcessSpec:
    """The START for an `enter` request: the app's root, environment, user, group and working
    directory, each replaceable; no event handlers; the default capability set, no seccomp filter."""
    app = choose_app(apps, _opt_str(request, "app"))
    argv = _str_list(request, "argv")
    if not argv or not argv[0]:
        raise ControlError("enter: argv must name a command")
    # the user's variables win over the app's, except AC_APP_NAME (as for the app itself)
    env = merge_env(app.env, [*_str_list(request, "env"), f"AC_APP_NAME={app.name}"])
    workdir = _opt_str(request, "workdir") or app.working_dir
    if not workdir.startswith("/"):
        raise KvmpodError(f"enter: working directory {workdir!r} is not absolute")
    return ProcessSpec(app.name, app.disk_serial, argv, env, workdir, _opt_str(request, "user") or app.user,
                       _opt_str(request, "group") or app.group, app.supplementary_gids, stdin=True,
                       tty=tty_size(request.get("tty")), enter=True)


# -- the server --------------------------------------------------------------------------------

@dataclass
class _Output:
    """A client's output frames; drops them once the client has gone or stopped reading. Output that
    comes before the process's reply is sent (the agent's first STDOUT can follow STARTED in the
    same read) is held until release()."""

    writer: asyncio.StreamWriter
    gone: bool = False
    held: list[bytes] | None = field(default_factory=list)

    def release(self, reply: dict[str, Any]) -> None:
        held, self.held = self.held or [], None
        for data in (encode_json(reply), *held):
            self.send(data)

    def send(self, data: bytes) -> None:
        if self.held is not None:
            self.held.append(data)
            return
        if self.gone or self.writer.is_closing():
            self.gone = True
            return
        self.writer.write(data)
        if self.writer.transport.get_write_buffer_size() > MAX_PENDING_OUTPUT:
            log.debug("control: a client stopped reading its output: hanging up")
            self.gone = True
            self.writer.transport.abort()

    def stdout(self, data: bytes) -> None:
        self.send(encode(Kind.STDOUT, data))

    def stderr(self, data: bytes) -> None:
        self.send(encode(Kind.STDERR, data))


class ControlTarget(Protocol):
    """What the control socket asks of a pod's runner (runner.py); docs/control.md has the requests."""
    pod: PodDir
    apps: list[ResolvedApp]

    @property
    def accepts_enter(self) -> bool: ...

    async def start_process(self, spec: ProcessSpec, on_stdout: OutputSink, on_stderr: OutputSink) -> GuestProcess:
        ...

    def request_stop(self, timeout: float, force: bool) -> None: ...

    def request_start(self) -> None: ...

    async def signal_apps(self, signo: int) -> None: ...

    async def set_paused(self, paused: bool) -> None: ...


class ControlServer:
    """Serves one pod's control socket inside its `kvmpod run` process."""

    def __init__(self, path: Path, runner: ControlTarget):
        self.path = path
        self.runner = runner
        self._listener: socket.socket | None = None
        self._closing: asyncio.Event | None = None
        self._tasks: set[asyncio.Task] = set()   # one per connection, from its accept() to its close

    async def start(self, listener: socket.socket | None = None) -> None:
        """Listen on the socket path, or go on with `listener`, bound there before an exec (relay.py).
        Connections are accepted here rather than by asyncio's server, so that each one is known from
        the moment it exists: no connection may be open, unseen, when the pod's process execs."""
        self._closing = asyncio.Event()
        if listener is None:
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                listener.bind(str(self.path))
                os.chmod(self.path, 0o600)
                listener.listen(64)
            except BaseException:
                listener.close()
                raise
        listener.setblocking(False)
        self._listener = listener
        asyncio.get_running_loop().add_reader(listener.fileno(), self._accept)

    def _accept(self) -> None:
        assert self._listener is not None
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # out of fds, say: the client sees its connection closed
                log.debug("control: accept: %s", e)
                return
            self._tasks.add(loop.create_task(self._connection(conn)))

    def hand_over(self) -> int | None:
        """The listening socket's fd, for kvmpod-relay to watch; None while a connection is open (its
        state lives in this process) or the server is closing."""
        if self._listener is None or self._closing is None or self._closing.is_set() or self._tasks:
            return None
        return self._listener.fileno()

    async def close(self) -> None:
        """The pod is gone: stop listening and end every connection (their EOF says so)."""
        if self._closing is None or self._closing.is_set():
            return
        self._closing.set()
        if self._listener is not None:
            asyncio.get_running_loop().remove_reader(self._listener.fileno())
            self._listener.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        tasks = {t for t in self._tasks if not t.done()}
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=CLOSE_GRACE)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def _connection(self, conn: socket.socket) -> None:
        try:
            try:
                reader, writer = await asyncio.open_connection(sock=conn, limit=1 << 20)
            except OSError as e:
                conn.close()
                log.debug("control connection: %s", e)
                return
            await self._serve(reader, writer)
        finally:
            self._tasks.discard(asyncio.current_task())

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self._closing is not None
        try:
            sock = writer.get_extra_info("socket")
            if not peer_allowed(peer_uid(sock)):
                await self._reply(writer, {"ok": False, "error": "permission denied: the pod belongs to another user"})
                return
            frame = await asyncio.wait_for(read_frame(reader), REQUEST_TIMEOUT)
            if frame is None:
                return
            kind, payload = frame
            if kind is not Kind.JSON:
                raise ControlError("the first control frame must be a JSON request")
            await self._handle(decode_json(payload), reader, writer)
        except KvmpodError as e:
            log.debug("control connection: %s", e)
            with contextlib.suppress(ConnectionError, OSError):
                await self._reply(writer, {"ok": False, "error": str(e), "exit_code": e.exit_code})
        except (asyncio.TimeoutError, ConnectionError, OSError) as e:
            log.debug("control connection: %s", e or type(e).__name__)
        except Exception:  # a bug here must never take the pod down
            log.debug("control connection failed", exc_info=True)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1)

    @staticmethod
    async def _reply(writer: asyncio.StreamWriter, message: dict[str, Any]) -> None:
        writer.write(encode_json(message))
        await writer.drain()

    async def _handle(self, request: dict[str, Any], reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        assert self._closing is not None
        op = request.get("op")
        if op == "enter":
            await self._enter(request, reader, writer)
        elif op == "stop":
            timeout, force = request.get("timeout", 10.0), request.get("force", False)
            if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout < 0 \
                    or not isinstance(force, bool):
                raise ControlError("stop: timeout must be a number >= 0 and force a boolean")
            self.runner.request_stop(float(timeout), force)
            await self._reply(writer, {"ok": True, "uuid": self.runner.pod.uuid})
            await self._until_closed(reader)
        elif op == "wait":
            await self._reply(writer, {"ok": True, "uuid": self.runner.pod.uuid})
            await self._until_closed(reader)
        elif op == "start":
            self.runner.request_start()
            await self._reply(writer, {"ok": True, "uuid": self.runner.pod.uuid})
        elif op == "signal":
            signo = request.get("signal")
            if not isinstance(signo, int) or isinstance(signo, bool) or not 0 < signo < signal.NSIG:
                raise ControlError("signal: signal must be a signal number")
            await self.runner.signal_apps(signo)
            await self._reply(writer, {"ok": True, "uuid": self.runner.pod.uuid})
        elif op in ("pause", "resume"):
            await self.runner.set_paused(op == "pause")
            await self._reply(writer, {"ok": True, "uuid": self.runner.pod.uuid})
        else:
            raise ControlError(f"unknown control request {op!r}")

    async def _until_closed(self, reader: asyncio.StreamReader) -> None:
        """Hold the connection until the pod is gone (or the client hangs up)."""
        assert self._closing is not None
        closing = asyncio.ensure_future(self._closing.wait())
        hangup = asyncio.ensure_future(reader.read())
        try:
            await asyncio.wait({closing, hangup}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for fut in (closing, hangup):
                fut.cancel()

    async def _enter(self, request: dict[str, Any], reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        runner = self.runner
        if not runner.accepts_enter:
            raise KvmpodError(f"pod {runner.pod.uuid} is {runner.pod.state.get('state', 'starting')}: "
                              "its apps are not running")
        spec = enter_spec(runner.apps, request)
        out = _Output(writer)
        proc = await runner.start_process(spec, out.stdout, out.stderr)
        log.debug("enter %s: %s as pid %s", spec.app_name, spec.argv[0], proc.pid)
        out.release({"ok": True, "pid": proc.pid})
        with contextlib.suppress(ConnectionError, OSError):
            await writer.drain()  # a client that has gone already: the pump hangs up on the process
        hangup = signal.SIGKILL if request.get("kill_on_hangup") is True else signal.SIGHUP
        pump = asyncio.ensure_future(self._pump_client(reader, proc, out, hangup))
        try:
            status = await proc.wait()
            result: dict[str, Any] = {"exit": {"signal": status.signal} if status.signal is not None
                                      else {"code": status.code}}
        except KvmpodError:
            result = {"error": "the pod ended before the command did"}
        finally:
            pump.cancel()
            with contextlib.suppress(BaseException):
                await pump
        out.send(encode_json(result))
        if not out.gone:
            with contextlib.suppress(ConnectionError, OSError):
                await writer.drain()

    async def _pump_client(self, reader: asyncio.StreamReader, proc: GuestProcess, out: _Output,
                           hangup: int = signal.SIGHUP) -> None:
        """The client's stdin, EOF, resizes and signals to the process. A client that goes away
        before the process ends hangs up on it: stdin closed, SIGHUP (SIGKILL for an OCI exec, whose
        process must not outlive its host process)."""
        eof_sent = False
        try:
            while (frame := await read_frame(reader)) is not None:
                kind, payload = frame
                if kind is Kind.STDIN:
                    await proc.write_stdin(payload)
                    continue
                if kind is not Kind.JSON:
                    raise ControlError(f"a client may not send {kind.name} frames")
                message = decode_json(payload)
                if message.get("eof") is True and not eof_sent:
                    eof_sent = True
                    await proc.close_stdin()
                elif "resize" in message:
                    size = tty_size(message["resize"])
                    if size:
                        await proc.resize(*size)
                elif isinstance(message.get("signal"), int) and 0 < message["signal"] < signal.NSIG:
                    await proc.signal(message["signal"])
        except (KvmpodError, ConnectionError, OSError) as e:
            log.debug("enter: client connection: %s", e)
        out.gone = True
        with contextlib.suppress(KvmpodError, ConnectionError, OSError):
            if not eof_sent:
                await proc.close_stdin()
            await proc.signal(hangup)
