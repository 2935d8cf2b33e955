"""The direct-QEMU backend: spawn QEMU without a shell, drive it over QMP with qemu.qmp."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
from pathlib import Path

from kvmpod.errors import VMError
from kvmpod.vm.backend import AgentChannel, VMBackend, VMExit
from kvmpod.vm.config import VMConfig, qemu_argv

log = logging.getLogger(__name__)
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    # If kvmpod is killed (even with SIGKILL), QEMU must not outlive it.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class QemuVM(VMBackend):
    def __init__(self, config: VMConfig, stderr_log: Path, connect_timeout: float = 30.0):
        self.config = config
        self.stderr_log = stderr_log
        self.connect_timeout = connect_timeout
        self._proc: asyncio.subprocess.Process | None = None
        self._qmp = None
        self._agent_server: asyncio.base_events.Server | None = None
        self._events_task: asyncio.Task | None = None
        self._panicked = False
        self._shutdown_reason: str | None = None
        self._ended: asyncio.Future[VMExit] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def ended(self) -> asyncio.Future[VMExit]:
        assert self._ended is not None, "VM not started"
        return self._ended

    async def start(self) -> AgentChannel:
        from qemu.qmp import QMPClient  # lazy: keeps `kvmpod --help` fast

        if not (self.config.agent_socket and self.config.qmp_socket):
            raise VMError("the QEMU backend needs both an agent socket and a QMP socket")

        logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)  # its errors surface as ours
        loop = asyncio.get_running_loop()
        agent_conn: asyncio.Future[AgentChannel] = loop.create_future()

        def on_agent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            if agent_conn.done():
                writer.close()  # only QEMU may connect, and only once
            else:
                agent_conn.set_result((reader, writer))

        # kvmpod listens and QEMU connects: both sockets exist before QEMU starts, so no polling.
        self._agent_server = await asyncio.start_unix_server(
            on_agent, path=str(self.config.agent_socket), limit=1 << 20)
        self._qmp = QMPClient(self.config.name)
        await self._qmp.start_server(str(self.config.qmp_socket))
        argv = qemu_argv(self.config)
        log.debug("qemu argv: %s", argv)
        with open(self.stderr_log, "wb") as err:
            try:
                self._proc = await asyncio.create_subprocess_exec(
                    *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                    stderr=err, preexec_fn=_die_with_parent,
                    start_new_session=True)  # Ctrl-C reaches kvmpod, which decides what the apps get
            except FileNotFoundError:
                await self._close_listeners()
                raise VMError(f"{argv[0]}: not found (install qemu-system-x86: make setup)") from None
        self._ended = loop.create_future()
        loop.create_task(self._watch_process())
        try:
            await self._race(self._qmp.accept(), "QEMU did not connect to its QMP socket")
            self._events_task = loop.create_task(self._watch_events())
            channel = await self._race(agent_conn, "QEMU did not connect the agent channel")
        except BaseException:
            await self.stop(grace=0)
            raise
        return channel

    async def _race(self, awaitable, what: str):
        """Await `awaitable` unless QEMU ends first or the connect timeout passes."""
        task = asyncio.ensure_future(awaitable)
        done, _ = await asyncio.wait({task, self.ended}, timeout=self.connect_timeout,
                                     return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            try:
                return task.result()
            except Exception as e:  # the connection broke: usually because QEMU is exiting, so say why
                with contextlib.suppress(asyncio.TimeoutError):
                    vm_exit = await asyncio.wait_for(asyncio.shield(self.ended), 5)
                    raise VMError(f"QEMU failed to start: {vm_exit.describe()}") from None
                raise VMError(f"{what}: {e}") from None
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        if self.ended.done():
            raise VMError(f"QEMU failed to start: {self.ended.result().describe()}")
        raise VMError(f"{what} within {self.connect_timeout:.0f} s")

    async def _watch_events(self) -> None:
        assert self._qmp is not None
        with contextlib.suppress(Exception):
            async for event in self._qmp.events:
                name = event["event"]
                if name == "GUEST_PANICKED":
                    self._panicked = True
                elif name == "SHUTDOWN":
                    self._shutdown_reason = event.get("data", {}).get("reason")

    async def _watch_process(self) -> None:
        assert self._proc is not None and self._ended is not None
        returncode = await self._proc.wait()
        # QEMU emits GUEST_PANICKED/SHUTDOWN just before exiting; give the reader a moment to deliver them.
        if self._events_task and not self._events_task.done():
            await asyncio.sleep(0)
        self._ended.set_result(VMExit(returncode, self._panicked, self._shutdown_reason, self._stderr_tail()))
        await self._close_listeners()

    def _stderr_tail(self, lines: int = 3) -> str:
        try:
            text = self.stderr_log.read_text(errors="replace").strip()
        except OSError:
            return ""
        return " | ".join(text.splitlines()[-lines:])

    async def _close_listeners(self) -> None:
        if self._events_task:
            self._events_task.cancel()
        if self._qmp is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._qmp.disconnect(), 2)
        if self._agent_server is not None:
            self._agent_server.close()
        for path in (self.config.agent_socket, self.config.qmp_socket):
            if path:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)

    async def wait(self) -> VMExit:
        return await asyncio.shield(self.ended)

    async def stop(self, grace: float) -> VMExit:
        if self._proc is None:
            raise VMError("VM was never started")
        if self.ended.done():
            return self.ended.result()
        if grace > 0 and self._qmp is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._qmp.execute("quit"), grace)
            with contextlib.suppress(asyncio.TimeoutError):
                return await asyncio.wait_for(asyncio.shield(self.ended), grace)
        with contextlib.suppress(ProcessLookupError):
            self._proc.kill()
        return await asyncio.shield(self.ended)


def check_socket_path(path: Path) -> None:
    """sockaddr_un holds 107 bytes of path: fail clearly now instead of with EINVAL later."""
    if len(os.fsencode(path)) >= 108:
        raise VMError(f"{path}: socket path too long for a unix socket (use a shorter runtime dir)")
