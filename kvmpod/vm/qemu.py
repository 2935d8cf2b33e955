"""The direct-QEMU backend: spawn QEMU without a shell, drive it over QMP with qemu.qmp."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import logging
import os
import signal
import socket
from pathlib import Path
from typing import TYPE_CHECKING

from kvmpod.errors import KvmpodError, VMError
from kvmpod.vm.backend import AgentChannel, VMBackend, VMExit
from kvmpod.vm.config import VMConfig, qemu_argv

if TYPE_CHECKING:
    from kvmpod.vm.cid import CidLease
    from kvmpod.vsock.device import VsockDevice

log = logging.getLogger(__name__)
_PR_SET_PDEATHSIG = 1
# Until the agent listens on its vsock port the guest answers kvmpod's connection with RST; kvmpod
# asks again after this long (nothing in the guest announces the listener). Bounded by the boot timeout.
VSOCK_RETRY = 0.01


def _die_with_parent() -> None:
    # If kvmpod is killed (even with SIGKILL), QEMU must not outlive it.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class QemuVM(VMBackend):
    def __init__(self, config: VMConfig, stderr_log: Path, connect_timeout: float = 30.0,
                 vsock_front: Path | None = None, restore_from: Path | None = None):
        self.config = config
        self.restore_from = restore_from  # a boot snapshot's device state (config.incoming; kvmpod/boot/snapshot.py)
        self.vsock_front = vsock_front   # vsock-user: the Firecracker-style socket host programs use
        self._vsock: VsockDevice | None = None
        self._cid: CidLease | None = None
        self._failure = ""
        self.stderr_log = stderr_log
        self.connect_timeout = connect_timeout
        self._proc: asyncio.subprocess.Process | None = None
        self._qmp = None
        self._agent_server: asyncio.base_events.Server | None = None
        self._events_task: asyncio.Task | None = None
        self._panicked = False
        self._shutdown_reason: str | None = None
        self._ended: asyncio.Future[VMExit] | None = None
        self._socket_inodes: dict[Path, tuple[int, int]] = {}
        self._closed = asyncio.Event()   # set once QEMU is gone and the listeners are closed

    @property
    def transport_info(self) -> dict[str, object]:
        """For state.json: how the agent is reached, and the guest's CID on vsock (docs/layout.md)."""
        info: dict[str, object] = {"agent_transport": self.config.agent_transport}
        if self.config.vsock_cid:
            info["vsock_cid"] = self.config.vsock_cid
        return info

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def ended(self) -> asyncio.Future[VMExit]:
        assert self._ended is not None, "VM not started"
        return self._ended

    async def start(self) -> AgentChannel:
        from qemu.qmp import QMPClient  # lazy: keeps `kvmpod --help` fast

        transport = self.config.agent_transport
        if not self.config.qmp_socket or (transport == "serial" and not self.config.agent_socket):
            raise VMError("the QEMU backend needs a QMP socket, and an agent socket for the serial transport")

        logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)  # its errors surface as ours
        loop = asyncio.get_running_loop()
        agent_conn: asyncio.Future[AgentChannel] = loop.create_future()

        def on_agent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            if agent_conn.done():
                writer.close()  # only QEMU may connect, and only once
            else:
                agent_conn.set_result((reader, writer))

        # kvmpod listens and QEMU connects: every socket exists before QEMU starts, so no polling.
        if transport == "serial":
            self._agent_server = await asyncio.start_unix_server(
                on_agent, path=str(self.config.agent_socket), limit=1 << 20)
        else:
            self._start_vsock()
        self._qmp = QMPClient(self.config.name)
        try:
            await self._qmp.start_server(str(self.config.qmp_socket))
        except BaseException:
            await self._close_listeners()
            raise
        self._remember_sockets()
        argv = qemu_argv(self.config)
        log.debug("qemu argv: %s", argv)
        with open(self.stderr_log, "wb") as err:
            try:
                self._proc = await asyncio.create_subprocess_exec(
                    *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                    stderr=err, preexec_fn=_die_with_parent,
                    pass_fds=[n.tap_fd for n in self.config.nics if n.tap_fd is not None],
                    start_new_session=True)  # Ctrl-C reaches kvmpod, which decides what the apps get
            except FileNotFoundError:
                await self._close_listeners()
                raise VMError(f"{argv[0]}: not found (install qemu-system-x86: make setup)") from None
        self._ended = loop.create_future()
        loop.create_task(self._watch_process())
        try:
            await self._race(self._qmp.accept(), "QEMU did not connect to its QMP socket")
            self._events_task = loop.create_task(self._watch_events())
            if self.restore_from is not None:
                await self._race(self._load_snapshot(self.restore_from), "QEMU did not take the boot snapshot")
            if transport == "serial":
                channel = await self._race(agent_conn, "QEMU did not connect the agent channel")
            else:
                channel = await self._race(self._connect_vsock(), "the guest agent did not accept a vsock connection")
        except BaseException:
            await self.stop(grace=0)
            raise
        return channel

    async def _pass_file(self, path: Path, flags: int, fdname: str) -> None:
        """Open `path` here and hand the fd to QEMU as `fdname` (QEMU 7.2 has no file: migration URI)."""
        assert self._qmp is not None
        fd = os.open(path, flags | os.O_CLOEXEC, 0o600)
        try:
            self._qmp.send_fd_scm(fd)
            await self._qmp.execute("getfd", {"fdname": fdname})
        finally:
            os.close(fd)

    async def _load_snapshot(self, state: Path) -> None:
        """Have QEMU load the device state; guest RAM is the snapshot's memory file, mapped private
        (config.memory_file), so nothing else is read. The snapshot was saved from a running VM, so QEMU
        runs the guest as soon as the load is done, without waiting for kvmpod; a load that fails ends
        QEMU, which the caller sees."""
        assert self._qmp is not None
        await self._qmp.execute("migrate-set-capabilities", {"capabilities": [
            {"capability": "x-ignore-shared", "state": True}]})
        await self._pass_file(state, os.O_RDONLY, "snapshot")
        await self._qmp.execute("migrate-incoming", {"uri": "fd:snapshot"})

    async def _migrate(self, command: str, what: str) -> None:
        """Run `command` (migrate or migrate-incoming, to or from fd "snapshot") until QEMU reports the end."""
        from qemu.qmp import EventListener

        assert self._qmp is not None
        listener = EventListener("MIGRATION")
        with self._qmp.listen(listener):
            await self._qmp.execute(command, {"uri": "fd:snapshot"})
            async for event in listener:
                status = event.get("data", {}).get("status")
                if status == "completed":
                    return
                if status in ("failed", "cancelled"):
                    info = await self._qmp.execute("query-migrate")
                    raise VMError(f"{what} failed: {info.get('error-desc', status)}")

    async def save_snapshot(self, state: Path) -> None:
        """Write the guest's device state to `state`; the guest is stopped after. Guest RAM is not
        written: it already is the shared memory file (config.memory_file_shared), which x-ignore-shared
        leaves out."""
        if self._qmp is None:
            raise VMError("VM was never started")
        # no `stop` first: QEMU stops the guest itself to save the devices, and a state saved running
        # is one QEMU resumes on its own once loaded (the agent is idle, waiting for THAW, meanwhile)
        await self._qmp.execute("migrate-set-capabilities", {"capabilities": [
            {"capability": "x-ignore-shared", "state": True}, {"capability": "events", "state": True}]})
        await self._pass_file(state, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, "snapshot")
        await self._migrate("migrate", "saving the VM")

    def _start_vsock(self) -> None:
        """Allocate the guest's CID; for vsock-user, listen for QEMU's vhost-user connection."""
        from kvmpod.vm.cid import allocate_cid

        kernel = self.config.agent_transport == "vhost-vsock"
        self._cid = allocate_cid(self.config.name, probe=kernel)
        self.config = dataclasses.replace(self.config, vsock_cid=self._cid.cid)
        if kernel:
            return
        from kvmpod.vsock.device import VsockDevice  # lazy: only pods on the userspace backend load it

        if self.config.vhost_user_vsock is None:
            raise VMError("the vsock-user transport needs a vhost-user socket path")
        self._vsock = VsockDevice(self._cid.cid, self.vsock_front, on_failure=self._device_failed)
        try:
            self._vsock.listen_vhost_user(self.config.vhost_user_vsock)
            self._vsock.listen_front()
        except BaseException:
            self._vsock.close()
            self._cid.release()
            raise

    def _device_failed(self, error: KvmpodError) -> None:
        """The guest broke the userspace vsock device: it is cut off, and so is its VM."""
        self._failure = str(error)
        if self._proc is not None and self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()

    async def _connect_vsock(self) -> "AgentChannel":
        """Connect to the agent's vsock port, again after each RST until it listens (the caller bounds it)."""
        from kvmpod.agent.protocol import VSOCK_PORT

        loop = asyncio.get_running_loop()
        while True:
            if self._vsock is not None:
                try:
                    sock = await self._vsock.connect(VSOCK_PORT)
                except ConnectionRefusedError:
                    if self._vsock.failure is not None:
                        raise self._vsock.failure from None
                    await asyncio.sleep(VSOCK_RETRY)
                    continue
            else:
                sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
                sock.setblocking(False)
                try:
                    await loop.sock_connect(sock, (self.config.vsock_cid, VSOCK_PORT))
                except (ConnectionResetError, ConnectionRefusedError, TimeoutError):
                    sock.close()  # RST: nothing listens yet; a timeout: the guest's driver is not up yet
                    await asyncio.sleep(VSOCK_RETRY)
                    continue
                except BaseException:
                    sock.close()
                    raise
            return await asyncio.open_connection(sock=sock, limit=1 << 20)

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
        self._ended.set_result(VMExit(returncode, self._panicked, self._shutdown_reason, self._stderr_tail(),
                                      self._failure))
        await self._close_listeners()
        self._closed.set()

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
        if self._vsock is not None:
            self._vsock.close()
        if self._cid is not None:
            self._cid.release()
        for path in self._socket_paths():
            # only the file this VM listened on: a VM started after it (a cold boot after a failed
            # restore) may listen at the same path by now
            with contextlib.suppress(FileNotFoundError):
                st = os.stat(path)
                if self._socket_inodes.get(path, (st.st_ino, st.st_ctime_ns)) == (st.st_ino, st.st_ctime_ns):
                    os.unlink(path)

    def _socket_paths(self) -> list[Path]:
        return [p for p in (self.config.agent_socket, self.config.qmp_socket, self.config.vhost_user_vsock,
                            self.vsock_front) if p]

    def _remember_sockets(self) -> None:
        for path in self._socket_paths():
            with contextlib.suppress(FileNotFoundError):
                st = os.stat(path)
                self._socket_inodes[path] = (st.st_ino, st.st_ctime_ns)

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
        vm_exit = await asyncio.shield(self.ended)
        await self._closed.wait()  # its socket files are gone: another VM may take the paths
        return vm_exit


def qemu_binary(name: str = "qemu-system-x86_64") -> Path:
    """The QEMU binary the VMs run (by PATH, as spawning it does)."""
    import shutil

    found = shutil.which(name)
    if found is None:
        raise VMError(f"{name}: not found (install qemu-system-x86: make setup)")
    return Path(found)


def check_socket_path(path: Path) -> None:
    """sockaddr_un holds 107 bytes of path: fail clearly now instead of with EINVAL later."""
    if len(os.fsencode(path)) >= 108:
        raise VMError(f"{path}: socket path too long for a unix socket (use a shorter runtime dir)")
