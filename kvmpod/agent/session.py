"""The host end of the agent channel: handshake, processes multiplexed by stream, flow control.

The guest is untrusted. Every frame is checked (protocol.decode_header, the messages' decode), a frame
that breaks the protocol fails the whole session with ProtocolError, and every waiter wakes up
with that error: nothing hangs and no traceback escapes.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, cast

from kvmpod.agent import protocol as p
from kvmpod.agent.isolators import Isolators
from kvmpod.errors import (EXIT_CANNOT_INVOKE, EXIT_KVMPOD_FAILURE, EXIT_NOT_FOUND, EXIT_SIGNAL_BASE,
                           AgentError, AppStartError, ProtocolError, printable)

OutputSink = Callable[[bytes], None]
THAW_ENTROPY_WORDS = 8   # 512 bits for the restored guest's random generator


@dataclass(frozen=True)
class ProcessSpec:
    app_name: str
    disk_serial: str
    argv: list[str]
    env: list[str]
    workdir: str = "/"
    user: str = "0"
    group: str = "0"
    supplementary_gids: list[int] = field(default_factory=list)
    stdin: bool = False
    readonly_rootfs: bool = False
    pre_start: list[str] = field(default_factory=list)     # event handlers' exec; [] : none
    post_stop: list[str] = field(default_factory=list)
    isolators: Isolators = field(default_factory=Isolators)
    tty: tuple[int, int] | None = None    # (rows, cols): stdin/stdout/stderr are one pty of that size
    enter: bool = False                    # run in the app's existing root (kvmpod enter)
    volume_mounts: list[str] = field(default_factory=list)   # VOLUME_MOUNT values (kvmpod/pod/volumes.py)
    root_tag: str = ""    # the app's root is this virtio-fs share (a host directory), not an image disk
    keep_etc: bool = False   # no executor /etc/hosts or resolv.conf: the root brings its own (OCI bundles)
    rlimits: tuple[tuple[int, int, int], ...] = ()   # (RLIMIT_* number, soft, hard) set before exec
    oom_score_adj: int | None = None
    exec_path: bool = False   # a bare argv[0] is looked up in the PATH in the guest (OCI processes)

    def message(self) -> p.Start:
        """The START that runs this process (protocol.toml says its fields and their order)."""
        iso = self.isolators
        flags = ((p.StartFlag.STDIN if self.stdin else 0) | (p.StartFlag.READONLY_ROOTFS if self.readonly_rootfs else 0)
                 | (p.StartFlag.NO_NEW_PRIVS if iso.no_new_privileges else 0)
                 | (p.StartFlag.TTY if self.tty else 0) | (p.StartFlag.ENTER if self.enter else 0)
                 | (p.StartFlag.KEEP_ETC if self.keep_etc else 0)
                 | (p.StartFlag.EXEC_PATH if self.exec_path else 0)
                 | (p.StartFlag.SECCOMP_SKIP_UNKNOWN if iso.seccomp_skip_unknown else 0))
        return p.Start(
            app_name=self.app_name.encode(), disk_serial=self.disk_serial.encode(),
            arg=_encoded(self.argv), env=_encoded(self.env),
            workdir=self.workdir.encode(), user=self.user.encode(), group=self.group.encode(),
            supp_gid=list(self.supplementary_gids), start_flags=int(flags),
            pre_start=_encoded(self.pre_start), post_stop=_encoded(self.post_stop),
            caps_retain=_encoded(iso.caps_retain), caps_remove=_encoded(iso.caps_remove),
            seccomp_retain=_encoded(iso.seccomp_retain), seccomp_remove=_encoded(iso.seccomp_remove),
            seccomp_errno=iso.seccomp_errno.encode() if iso.seccomp_errno else None,
            tty_rows=self.tty[0] if self.tty else None, tty_cols=self.tty[1] if self.tty else None,
            volume_mount=_encoded(self.volume_mounts),
            root_tag=self.root_tag.encode() if self.root_tag else None,
            rlimit=[f"{resource} {soft} {hard}".encode() for resource, soft, hard in self.rlimits],
            oom_score_adj=self.oom_score_adj)


def _encoded(values: Iterable[str] | None) -> list[bytes]:
    """A repeated str field's values (a None isolator set: none)."""
    return [v.encode() for v in values or ()]


@dataclass(frozen=True)
class ExitStatus:
    code: int | None = None
    signal: int | None = None

    @property
    def shell_code(self) -> int:
        """The status a shell would report: the exit code, or 128 + the terminating signal."""
        return EXIT_SIGNAL_BASE + self.signal if self.signal is not None else (self.code or 0) & 0xFF

    def describe(self) -> str:
        return f"killed by signal {self.signal}" if self.signal is not None else f"exited with code {self.code}"


@dataclass(frozen=True)
class Hello:
    version: int
    agent_version: str
    boot_ns: int


def _text(value: bytes | None) -> str:
    """A str field the guest sent, for a message (not necessarily UTF-8): control characters escaped,
    so that a hostile guest can neither break kvmpod's one-line error nor drive the terminal."""
    return printable(value.decode("utf-8", "replace")) if value is not None else ""


def _strerror(err: int) -> str:
    """The text of an errno the guest sent: a u32, so possibly beyond what os.strerror takes (a C int)."""
    try:
        return os.strerror(err)
    except (OverflowError, ValueError):
        return f"errno {err}"


def _start_error(stage: str, err: int | None, message: str) -> AppStartError:
    code = EXIT_KVMPOD_FAILURE
    if stage == "exec" and err == errno.ENOENT:
        code = EXIT_NOT_FOUND
    elif stage == "exec" and err in (errno.EACCES, errno.ENOEXEC, errno.EPERM, errno.EISDIR):
        code = EXIT_CANNOT_INVOKE
    return AppStartError(message or f"{stage} failed" + (f": {_strerror(err)}" if err else ""), code)


class GuestProcess:
    """A process running in the guest, as seen through its stream."""

    def __init__(self, session: "AgentSession", stream: int, on_stdout: OutputSink, on_stderr: OutputSink,
                 early_output: bool = False):
        self.session = session
        self.stream = stream
        self.early_output = early_output  # a pre-start handler runs first: its output precedes STARTED
        self.pid: int | None = None
        self.on_stdout = on_stdout
        self.on_stderr = on_stderr
        loop = asyncio.get_running_loop()
        self.started: asyncio.Future[int] = loop.create_future()
        self.exited: asyncio.Future[ExitStatus] = loop.create_future()
        self._window = p.STDIN_WINDOW
        self._window_open = asyncio.Event()
        self._window_open.set()

    async def write_stdin(self, data: bytes) -> None:
        """Send stdin bytes, never more than the agent's window allows."""
        view = memoryview(data)
        while view:
            if self.exited.done():
                return
            await self._window_open.wait()
            self.session.raise_if_failed()
            n = min(len(view), self._window, p.DATA_CHUNK)
            await self.session.send(p.Frame(p.MessageType.STDIN, self.stream, bytes(view[:n])))
            self._window -= n
            if self._window == 0:
                self._window_open.clear()
            view = view[n:]

    async def close_stdin(self) -> None:
        if not self.exited.done():
            await self.session.send(p.Frame(p.MessageType.STDIN_EOF, self.stream))

    async def signal(self, signo: int) -> None:
        if not self.exited.done():
            await self.session.send(p.frame(p.Signal(signo=signo), self.stream))

    async def resize(self, rows: int, cols: int) -> None:
        """A new terminal size for a process started with a TTY (the agent ignores it otherwise)."""
        if not self.exited.done():
            await self.session.send(p.frame(p.Resize(tty_rows=rows, tty_cols=cols), self.stream))

    async def wait(self) -> ExitStatus:
        return await self.exited

    def _grant(self, nbytes: int) -> None:
        if nbytes > p.STDIN_WINDOW - self._window:
            raise ProtocolError(f"stream {self.stream}: WINDOW returns {nbytes} bytes that were never sent")
        self._window += nbytes
        self._window_open.set()

    def _fail(self, error: BaseException) -> None:
        for fut in (self.started, self.exited):
            if not fut.done():
                fut.set_exception(error)
                fut.exception()  # mark retrieved: the session's own failure is what gets reported
        self._window_open.set()


class AgentSession:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 on_log: Callable[[str], None] | None = None):
        self._reader = reader
        self._writer = writer
        self._on_log = on_log
        self._processes: dict[int, GuestProcess] = {}
        self._finished: set[int] = set()
        self._next_stream = 1
        self._write_lock = asyncio.Lock()
        loop = asyncio.get_running_loop()
        self.hello: asyncio.Future[Hello] = loop.create_future()
        self.failed: asyncio.Future[AgentError] = loop.create_future()  # resolves (not raises) on failure
        self._reader_task: asyncio.Task | None = None
        self._prepared: asyncio.Future[None] = loop.create_future()
        self._mid_frame = False   # a header is read, its payload not yet
        self.quiet_since = time.monotonic()   # the last frame sent, or received other than app output

    @classmethod
    async def adopt(cls, sock: socket.socket, unread: bytes, hello: Hello, next_stream: int, finished: set[int],
                    on_log: Callable[[str], None] | None = None) -> "AgentSession":
        """A session whose handshake happened before this process exec'd (kvmpod/pod/relay.py): `unread`
        is what was read from `sock` but not dispatched. Add its processes, then call dispatch()."""
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=1 << 20, loop=loop)
        reader.feed_data(unread)
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        transport, _ = await loop.create_connection(lambda: protocol, sock=sock)
        session = cls(reader, asyncio.StreamWriter(transport, protocol, reader, loop), on_log)
        session.hello.set_result(hello)
        session._next_stream, session._finished = next_stream, set(finished)
        return session

    def adopt_process(self, stream: int, pid: int, on_stdout: OutputSink, on_stderr: OutputSink,
                      status: "ExitStatus | None") -> GuestProcess:
        """A process started before the exec; `status` if it has ended already."""
        proc = GuestProcess(self, stream, on_stdout, on_stderr)
        proc.pid = pid
        proc.started.set_result(pid)
        if status is None:
            self._processes[stream] = proc
        else:
            proc.exited.set_result(status)
        return proc

    def dispatch(self) -> None:
        """Start dispatching frames (handshake() does this itself)."""
        self._reader_task = asyncio.get_running_loop().create_task(self._dispatch_forever())

    @property
    def open_streams(self) -> set[int]:
        return set(self._processes)

    @property
    def streams(self) -> tuple[int, set[int]]:
        """The next stream number and the streams that have ended, for adopt()."""
        return self._next_stream, set(self._finished)

    def hand_over(self) -> tuple[int, bytes] | None:
        """The channel's fd and the bytes read from it but not dispatched yet, for kvmpod-relay, with
        reading paused; None unless the session is quiet between two frames with nothing left to send.
        The caller execs next, or calls take_back()."""
        if self._mid_frame or self.failed.done() or self._reader_task is None \
                or self._writer.transport.get_write_buffer_size():
            return None
        self._transport().pause_reading()
        # StreamReader offers no public look at what it has buffered
        unread = bytes(self._reader._buffer)  # type: ignore[attr-defined]
        return self._writer.get_extra_info("socket").fileno(), unread

    def take_back(self) -> None:
        """The exec after hand_over() failed: go on reading."""
        self._transport().resume_reading()

    def _transport(self) -> asyncio.Transport:
        """The channel's transport: a socket's, which reads as well as writes (the writer types it as a
        WriteTransport only)."""
        return cast(asyncio.Transport, self._writer.transport)

    # -- lifecycle -------------------------------------------------------------------------

    async def handshake(self) -> Hello:
        """Wait for HELLO, agree on a version, and start dispatching frames."""
        mtype, stream, payload = await self._read_frame()
        while mtype is p.MessageType.LOG:  # a thawed agent may have logged already (kvmpod.debug=1)
            self._dispatch(mtype, stream, payload)
            mtype, stream, payload = await self._read_frame()
        if mtype is not p.MessageType.HELLO:
            raise ProtocolError(f"agent sent {mtype.name} before HELLO")
        h = p.Hello.decode(payload)
        lo, hi = h.proto_min, h.proto_max
        version = min(hi, p.VERSION)
        if version < max(lo, p.MIN_VERSION):
            raise AgentError(f"guest agent speaks protocol {lo}..{hi}, kvmpod speaks {p.MIN_VERSION}..{p.VERSION}: "
                             "rebuild the initrd (make agent)")
        await self.send(p.frame(p.HelloAck(proto_version=version)))
        hello = Hello(version, _text(h.agent_version), h.boot_ns or 0)
        self.hello.set_result(hello)
        self.dispatch()
        return hello

    async def thaw(self, hostname: str) -> None:
        """The first frame to a VM restored from a boot snapshot (docs/snapshot.md): the pod's hostname,
        fresh entropy for the guest kernel, the time. The agent then says HELLO again: call handshake()."""
        words = os.urandom(8 * THAW_ENTROPY_WORDS)
        await self.send(p.frame(p.Thaw(
            hostname=hostname.encode(),
            entropy=[int.from_bytes(words[i:i + 8], "little") for i in range(0, len(words), 8)],
            realtime_ns=time.time_ns())))

    async def prepare_snapshot(self, disk_serials: list[str]) -> None:
        """Have the agent mount the image disks and go idle, so the VM can be saved (after handshake())."""
        await self.send(p.frame(p.Prepare(disk_serial=[s.encode() for s in disk_serials])))
        await self._first(self._prepared)

    async def start(self, spec: ProcessSpec, on_stdout: OutputSink, on_stderr: OutputSink) -> GuestProcess:
        """Start a process; returns once it runs. Raises AppStartError if the agent could not start it."""
        self.raise_if_failed()
        if len(self._processes) >= p.MAX_STREAMS:
            raise AgentError(f"too many processes in one pod (the agent serves {p.MAX_STREAMS})")
        stream = self._next_stream
        self._next_stream += 1
        proc = GuestProcess(self, stream, on_stdout, on_stderr, early_output=bool(spec.pre_start))
        self._processes[stream] = proc
        await self.send(p.frame(spec.message(), stream))
        await self._first(proc.started)
        return proc

    async def shutdown(self) -> None:
        """Ask the agent to kill everything, sync and power off. The VM's end tells when it is done."""
        if not self.failed.done():
            try:
                await self.send(p.Frame(p.MessageType.SHUTDOWN, 0))
            except (AgentError, ConnectionError):
                pass

    async def close(self) -> None:
        if self._reader_task:
            self._reader_task.cancel()
        self._writer.close()

    # -- I/O -------------------------------------------------------------------------------

    async def send(self, frame: p.Frame) -> None:
        self.quiet_since = time.monotonic()
        async with self._write_lock:
            self.raise_if_failed()
            try:
                self._writer.write(frame.encode())
                await self._writer.drain()
            except (ConnectionError, OSError) as e:
                self._fail(AgentError(f"agent channel broke while sending: {e}"))
                self.raise_if_failed()

    def raise_if_failed(self) -> None:
        if self.failed.done():
            raise self.failed.result()

    async def _first(self, fut: asyncio.Future):
        """Await `fut`, or raise the session's failure if that comes first."""
        done, _ = await asyncio.wait({fut, self.failed}, return_when=asyncio.FIRST_COMPLETED)
        if fut in done:
            return fut.result()
        raise self.failed.result()

    async def _read_frame(self) -> tuple[p.MessageType, int, bytes]:
        try:
            header = await self._reader.readexactly(p.HEADER_SIZE)
            self._mid_frame = True
            mtype, stream, length = p.decode_header(header)
            payload = await self._reader.readexactly(length) if length else b""
            self._mid_frame = False
        except asyncio.IncompleteReadError as e:
            raise AgentError("agent channel closed" + (" in the middle of a frame" if e.partial else "")) from None
        except (ConnectionError, OSError) as e:
            raise AgentError(f"agent channel broke: {e}") from None
        if p.MESSAGE_SPECS[mtype].sender != "guest":
            raise ProtocolError(f"guest sent {mtype.name}, a host-to-guest message")
        return mtype, stream, payload

    async def _dispatch_forever(self) -> None:
        try:
            while True:
                self._dispatch(*await self._read_frame())
        except AgentError as e:
            self._fail(e)
        except asyncio.CancelledError:
            self._fail(AgentError("agent session closed"))
            raise

    def _dispatch(self, mtype: p.MessageType, stream: int, payload: bytes) -> None:
        T = p.MessageType
        if mtype not in (T.STDOUT, T.STDERR):
            self.quiet_since = time.monotonic()
        if mtype is T.LOG:
            if self._on_log:
                self._on_log(_text(p.Log.decode(payload).message))
            return
        if mtype is T.HELLO:
            raise ProtocolError("agent sent HELLO twice")
        if mtype is T.PREPARED:
            if self._prepared.done():
                raise ProtocolError("agent sent PREPARED twice")
            self._prepared.set_result(None)
            return
        if mtype is T.ERROR and stream == 0:
            e = p.Error.decode(payload)
            raise AgentError(f"guest agent failed: {_text(e.stage)}: {_text(e.message)}")
        proc = self._processes.get(stream)
        if proc is None:
            state = "has ended" if stream in self._finished else "was never started"
            raise ProtocolError(f"{mtype.name} for stream {stream}, which {state}")
        if mtype is T.STARTED:
            pid = p.Started.decode(payload).pid
            if proc.started.done():
                raise ProtocolError(f"stream {stream}: unexpected STARTED")
            proc.pid = pid
            proc.started.set_result(pid)
        elif mtype is T.ERROR:
            e = p.Error.decode(payload)
            error = _start_error(_text(e.stage), e.errno, _text(e.message))
            if proc.started.done():
                raise ProtocolError(f"stream {stream}: ERROR after the process started")
            proc.started.set_exception(error)
            self._finish(stream)
        elif not proc.started.done() and not (proc.early_output and mtype in (T.STDOUT, T.STDERR)):
            raise ProtocolError(f"{mtype.name} for stream {stream} before STARTED")
        elif mtype is T.STDOUT:
            proc.on_stdout(payload)
        elif mtype is T.STDERR:
            proc.on_stderr(payload)
        elif mtype is T.WINDOW:
            proc._grant(p.Window.decode(payload).bytes)
        elif mtype is T.EXIT:
            x = p.Exit.decode(payload)
            if (x.exit_code is None) == (x.term_signal is None):
                raise ProtocolError(f"stream {stream}: EXIT needs exactly one of EXIT_CODE and TERM_SIGNAL")
            proc.exited.set_result(ExitStatus(code=x.exit_code, signal=x.term_signal))
            self._finish(stream)
        else:  # every guest-sent type is handled above
            raise ProtocolError(f"unexpected {mtype.name}")

    def _finish(self, stream: int) -> None:
        del self._processes[stream]
        self._finished.add(stream)

    def _fail(self, error: AgentError) -> None:
        if not self.failed.done():
            self.failed.set_result(error)
        for proc in list(self._processes.values()):
            proc._fail(error)
