"""The direct-QEMU backend: spawn QEMU without a shell, drive it over QMP with qemu.qmp."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from collections.abc import Mapping
from typing import TYPE_CHECKING

from kvmpod.agent.protocol import VSOCK_PORT
from kvmpod.errors import KvmpodError, VMError
from kvmpod.vm.backend import AgentChannel, VMBackend, VMExit
from kvmpod.vm.cgroup import Cgroup
from kvmpod.vm.cid import CidLease, allocate_cid
from kvmpod.vm.config import VMConfig
from kvmpod.vm.spawn import RESTORE_ANSWERS, SpawnedQemu, spawn_qemu
from kvmpod.vm.vsock_channel import connect_kernel_vsock

if TYPE_CHECKING:
    from qemu.qmp import QMPClient

    from kvmpod.vsock.device import VsockDevice

log = logging.getLogger(__name__)
# Until the agent listens on its vsock port the guest answers kvmpod's connection with RST; kvmpod
# asks again after this long (nothing in the guest announces the listener). Bounded by the boot timeout.
VSOCK_RETRY = 0.01
TEST_QMP_ENV = "KVMPOD_TEST_QMP"   # test-only: a QMP command to send once QEMU runs the guest
# kvmpod's QEMU build only (kvmpod/vm/data/qemu-patches/0001-*, docs/qemu.md): a TCG flush that gives
# the translation buffer's pages back. Debian's QEMU answers CommandNotFound.
RELEASE_TRANSLATIONS = "x-kvmpod-tb-flush"
RELEASE_TIMEOUT = 5.0   # s; the command returns at once (the flush itself runs on the vCPU)


async def negotiate_qmp(client: "QMPClient", sock: socket.socket) -> None:
    """Connect `client` over `sock` and leave capabilities negotiation. qemu.qmp's own negotiation takes
    the first message after `qmp_capabilities` for its answer, but QEMU 7.2 may emit an event first: it
    switches the monitor to command mode, then yields before it answers, and a restore finishing meanwhile
    says RESUME (one `kvmpod run` in 32 at once failed with "Negotiation failed:", docs/reliability.md).
    Sent through the running session instead, the answer is matched by its id and events go to the
    event listener."""
    client.negotiate = False   # the greeting is still awaited and checked
    await client.connect(sock)
    await client.execute("qmp_capabilities")


class QemuVM(VMBackend):
    def __init__(self, config: VMConfig, stderr_log: Path, connect_timeout: float = 30.0,
                 vsock_front: Path | None = None, restore_from: Path | None = None,
                 spawned: SpawnedQemu | None = None, cgroup: Cgroup | None = None):
        self.config = config
        self.cgroup = cgroup or (spawned.cgroup if spawned else None)   # QEMU's (kvmpod/vm/cgroup.py)
        self._oom_before = 0   # the cgroup's OOM kills before this QEMU: a new cgroup has none
        self.restore_from = restore_from  # a boot snapshot's device state (config.incoming; kvmpod/boot/snapshot.py)
        self.vsock_front = vsock_front   # vsock-user: the Firecracker-style socket host programs use
        self._vsock: VsockDevice | None = None
        self._cid: CidLease | None = None
        self._failure = ""
        self.stderr_log = stderr_log
        self.connect_timeout = connect_timeout
        self._spawned = spawned   # QEMU already running (kvmpod/vm/spawn.py), else start() spawns it
        self._popen: "subprocess.Popen | AdoptedProcess | None" = spawned.process if spawned else None
        if spawned:
            self.config = spawned.config
        self._qmp: QMPClient | None = None
        self._qmp_sock: socket.socket | None = None
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
        return self._popen.pid if self._popen else None

    @property
    def ended(self) -> asyncio.Future[VMExit]:
        assert self._ended is not None, "VM not started"
        return self._ended

    async def start(self) -> AgentChannel:
        """Spawn QEMU (unless it was spawned already), connect QMP and the agent channel, and for a
        restored VM check that QEMU took the snapshot."""
        from qemu.qmp import QMPClient  # lazy: keeps `kvmpod --help` fast

        if self._spawned is None:
            if self.config.agent_transport != "serial":
                self._start_vsock()  # QEMU connects to the vhost-user socket as it starts
            try:
                if self.cgroup is not None:
                    self._oom_before = self.cgroup.oom_kills()
                self._spawned = spawn_qemu(self.config, self.stderr_log, self.restore_from, cgroup=self.cgroup)
            except BaseException:
                self._release_vsock()
                raise
            self._popen, self.config = self._spawned.process, self._spawned.config
        self._remember_sockets()
        spawned = self._spawned
        # its errors surface as ours; and a connect cancelled because QEMU died meanwhile trips an assertion
        # in its cleanup, logged as CRITICAL with a traceback (tests/e2e/test_faults.py: kill-qemu at spawn)
        logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL + 1)
        loop = asyncio.get_running_loop()
        self._watch()
        self._qmp = QMPClient(self.config.name)
        self._qmp_sock = spawned.take("qmp")
        assert self._qmp_sock is not None  # spawn_qemu always makes the QMP pair
        try:
            await self._race(negotiate_qmp(self._qmp, self._qmp_sock), "QEMU did not answer on QMP")
            self._events_task = loop.create_task(self._watch_events())
            if (restore_monitor := spawned.take("restore_monitor")) is not None:
                await self._race(self._restore_answers(restore_monitor),
                                 "QEMU did not take the boot snapshot")
            if spawned.agent is not None:
                channel = await asyncio.open_connection(sock=spawned.take("agent"), limit=1 << 20)
            else:
                channel = await self._race(self._connect_vsock(), "the guest agent did not accept a vsock connection")
        except BaseException:
            await self.stop(grace=0)
            raise
        if command := os.environ.get(TEST_QMP_ENV):
            await self._test_command(command)
        return channel

    async def _test_command(self, text: str) -> None:
        """Test-only ($KVMPOD_TEST_QMP, docs/security.md): one QMP command, sent once QEMU runs the guest, to
        try what a compromised QEMU would do (tests/e2e/test_sandbox.py: exec a helper). Its answer is
        printed; a QEMU that dies of it ends the pod the usual way."""
        assert self._qmp is not None
        message = json.loads(text)
        try:
            answer = await asyncio.wait_for(self._qmp.execute(message["execute"], message.get("arguments")), 10)
        except Exception as e:  # noqa: BLE001 - whatever it is, it is the test's answer
            answer = f"{type(e).__name__}: {e}"
        print(f"kvmpod: test QMP {message['execute']}: {answer}", file=sys.stderr, flush=True)

    # -- across an exec into kvmpod-relay and back (kvmpod/pod/relay.py) -------------------------

    def hand_over(self) -> "QemuHandover | None":
        """What the next kvmpod process needs to drive this QEMU, or None if it cannot be handed over
        now (not fully started, ending, or with kvmpod's own vsock device, which lives in this process)."""
        if (self._qmp_sock is None or self._popen is None or self._vsock is not None or self._ended is None
                or self._ended.done()):
            return None
        return QemuHandover(self.config, self.stderr_log, self.connect_timeout, self._popen.pid,
                            self._qmp_sock.fileno(), self._panicked, self._shutdown_reason)

    @classmethod
    async def adopt(cls, handover: "QemuHandover", qmp: socket.socket, cgroup: Cgroup | None = None) -> "QemuVM":
        """The QEMU a previous kvmpod process (this pid, before an exec) started: still this process's
        child, and its QMP connection already negotiated."""
        from qemu.qmp import QMPClient

        vm = cls(handover.config, handover.stderr_log, handover.connect_timeout, cgroup=cgroup)
        vm._popen = AdoptedProcess(handover.pid)
        vm._panicked, vm._shutdown_reason = handover.panicked, handover.shutdown_reason
        logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)
        vm._watch()
        vm._qmp, vm._qmp_sock = QMPClient(vm.config.name), qmp
        vm._qmp.await_greeting = vm._qmp.negotiate = False  # done by the first process
        with contextlib.suppress(Exception):  # QEMU may have ended meanwhile: `ended` tells, and why
            await vm._qmp.connect(qmp)
        vm._events_task = asyncio.get_running_loop().create_task(vm._watch_events())
        return vm

    def _watch(self) -> None:
        """Watch the QEMU process from this event loop (once)."""
        if self._ended is None:
            self._ended = asyncio.get_running_loop().create_future()
            asyncio.get_running_loop().create_task(self._watch_process())

    async def _restore_answers(self, sock: socket.socket) -> None:
        """Read the restore monitor's answers (kvmpod/vm/spawn.py restore_commands): an error there is why
        the VM did not start. The snapshot was saved from a running VM, so QEMU runs the guest as soon as
        the load is done, without waiting for kvmpod; a load that fails ends QEMU, which the caller sees."""
        reader, writer = await asyncio.open_connection(sock=sock)
        try:
            answers = 0
            while answers < RESTORE_ANSWERS:
                line = await reader.readline()
                if not line:
                    raise EOFError("QEMU closed its restore monitor")
                message = json.loads(line)
                if "error" in message:
                    raise VMError(f"QEMU did not take the boot snapshot: {message['error'].get('desc', message)}")
                answers += "return" in message
        finally:
            writer.close()  # QEMU drops the monitor; QMP proper goes on

    def _release_vsock(self) -> None:
        if self._vsock is not None:
            self._vsock.close()
            self._vsock = None
        if self._cid is not None:
            self._cid.release()
            self._cid = None

    async def _pass_file(self, path: Path, flags: int, fdname: str) -> None:
        """Open `path` here and hand the fd to QEMU as `fdname` (QEMU 7.2 has no file: migration URI)."""
        assert self._qmp is not None
        fd = os.open(path, flags | os.O_CLOEXEC, 0o600)
        try:
            self._qmp.send_fd_scm(fd)
            await self._qmp.execute("getfd", {"fdname": fdname})
        finally:
            os.close(fd)

    async def _migrate(self, command: str, what: str) -> None:
        """Run `command` (migrate or migrate-incoming, to or from fd "snapshot") until QEMU reports the end."""
        from qemu.qmp import EventListener

        assert self._qmp is not None
        listener = EventListener("MIGRATION")
        with self._qmp.listen(listener):
            await self._qmp.execute(command, {"uri": "fd:snapshot"})
            async for event in listener:
                status = _field(event, "data", "status")
                if status == "completed":
                    return
                if status in ("failed", "cancelled"):
                    desc = _field(await self._qmp.execute("query-migrate"), "error-desc")
                    raise VMError(f"{what} failed: {status if desc is None else desc}")

    async def save_snapshot(self, state: Path) -> None:
        """Write the guest's device state to `state`; the guest is stopped after. Guest RAM is not
        written: it already is the shared memory file (config.memory_file_shared), which x-ignore-shared
        leaves out."""
        from qemu.qmp import QMPError

        if self._qmp is None:
            raise VMError("VM was never started")
        # no `stop` first: QEMU stops the guest itself to save the devices, and a state saved running
        # is one QEMU resumes on its own once loaded (the agent is idle, waiting for THAW, meanwhile)
        try:
            await self._qmp.execute("migrate-set-capabilities", {"capabilities": [
                {"capability": "x-ignore-shared", "state": True}, {"capability": "events", "state": True}]})
            await self._pass_file(state, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, "snapshot")
            await self._migrate("migrate", "saving the VM")
        except QMPError as e:   # QEMU died meanwhile (ExecInterruptedError): the maker reports it as its failure
            raise VMError(f"saving the VM: {e or type(e).__name__}") from e

    def _start_vsock(self) -> None:
        """Allocate the guest's CID; for vsock-user, listen for QEMU's vhost-user connection."""
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
        if self._popen is not None and self._popen.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._popen.kill()

    async def _connect_vsock(self) -> "AgentChannel":
        """Connect to the agent's vsock port, again after each RST until it listens (the caller bounds it)."""
        while True:
            if self._vsock is not None:
                try:
                    sock = await self._vsock.connect(VSOCK_PORT)
                except ConnectionRefusedError as e:
                    if self._vsock.failure is not None:
                        raise self._vsock.failure from e
                    await asyncio.sleep(VSOCK_RETRY)
                    continue
            else:
                sock = await connect_kernel_vsock(self.config.vsock_cid)
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
                    raise VMError(f"QEMU failed to start: {vm_exit.describe()}") from e
                raise VMError(f"{what}: {e}") from e
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
                    reason = _field(event, "data", "reason")
                    self._shutdown_reason = reason if isinstance(reason, str) else None

    async def _watch_process(self) -> None:
        assert self._popen is not None and self._ended is not None
        returncode = await _exited(self._popen)
        # QEMU emits GUEST_PANICKED/SHUTDOWN just before exiting; give the reader a moment to deliver them.
        if self._events_task and not self._events_task.done():
            await asyncio.sleep(0)
        over_limit = self._over_memory_limit(returncode)
        self._ended.set_result(VMExit(returncode, self._panicked, self._shutdown_reason, self._stderr_tail(),
                                      self._failure or over_limit, over_limit=bool(over_limit)))
        await self._close_listeners()
        self._closed.set()

    def _over_memory_limit(self, returncode: int | None) -> str:
        """Why QEMU died, if the kernel's OOM killer ended it for its cgroup's memory limit (it does
        with SIGKILL, and counts it in the cgroup): the message, else ""."""
        if self.cgroup is None or returncode != -signal.SIGKILL or self.cgroup.oom_kills() <= self._oom_before:
            return ""
        return self.cgroup.oom_message()

    def _stderr_tail(self, lines: int = 3) -> str:
        try:
            text = self.stderr_log.read_text(errors="replace").strip()
        except OSError:
            return ""
        return " | ".join(text.splitlines()[-lines:])

    async def _close_listeners(self) -> None:
        if self._events_task:
            self._events_task.cancel()
        # what needs no await first: a pod's teardown need not wait for this task, and the event loop's end
        # cancels it at its first await (the QMP disconnect), which left the CID's lock file behind (test_soak)
        if self._spawned is not None:
            self._spawned.close()
        self._release_vsock()
        for path in self._socket_paths():
            # only the file this VM listened on: a VM started after it (a cold boot after a failed
            # restore) may listen at the same path by now
            with contextlib.suppress(FileNotFoundError):
                st = os.stat(path)
                if self._socket_inodes.get(path, (st.st_ino, st.st_ctime_ns)) == (st.st_ino, st.st_ctime_ns):
                    os.unlink(path)
        if self._qmp is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._qmp.disconnect(), 2)

    def _socket_paths(self) -> list[Path]:
        return [p for p in (self.config.vhost_user_vsock, self.vsock_front) if p]

    def _remember_sockets(self) -> None:
        for path in self._socket_paths():
            with contextlib.suppress(FileNotFoundError):
                st = os.stat(path)
                self._socket_inodes[path] = (st.st_ino, st.st_ctime_ns)

    async def pause(self) -> None:
        await self._vcpus("stop")

    async def resume(self) -> None:
        await self._vcpus("cont")

    async def _vcpus(self, command: str) -> None:
        from qemu.qmp import QMPError

        assert self._qmp is not None
        try:
            await self._qmp.execute(command)
        except QMPError as e:
            raise VMError(f"QMP {command}: {e}") from e

    async def release_translations(self) -> bool:
        from qemu.qmp import ExecuteError, QMPError

        if self.config.accel != "tcg" or self._qmp is None or self._ended is None or self._ended.done():
            return False
        try:
            await asyncio.wait_for(self._qmp.execute(RELEASE_TRANSLATIONS), RELEASE_TIMEOUT)
        except ExecuteError as e:   # not kvmpod's build (Debian's QEMU, a KVMPOD_QEMU binary)
            log.debug("QEMU keeps its translations: %s", e)
            return False
        except (QMPError, OSError, asyncio.TimeoutError) as e:   # QEMU is going away: its own watch reports that
            log.debug("QMP %s: %s", RELEASE_TRANSLATIONS, e or type(e).__name__)
            return False
        return True

    async def wait(self) -> VMExit:
        return await asyncio.shield(self.ended)

    async def stop(self, grace: float) -> VMExit:
        if self._popen is None:
            raise VMError("VM was never started")
        self._watch()  # spawned but never started: nothing watched it yet
        if self.ended.done():
            return self.ended.result()
        if grace > 0 and self._qmp is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._qmp.execute("quit"), grace)
            with contextlib.suppress(asyncio.TimeoutError):
                return await asyncio.wait_for(asyncio.shield(self.ended), grace)
        with contextlib.suppress(ProcessLookupError):
            self._popen.kill()
        vm_exit = await asyncio.shield(self.ended)
        await self._closed.wait()  # its socket files are gone: another VM may take the paths
        return vm_exit


@dataclasses.dataclass(frozen=True)
class QemuHandover:
    config: VMConfig
    stderr_log: Path
    connect_timeout: float
    pid: int
    qmp_fd: int          # the negotiated QMP connection (inherited across the exec)
    panicked: bool
    shutdown_reason: str | None


class AdoptedProcess:
    """The part of subprocess.Popen QemuVM uses, for a child this process inherited across an exec."""

    def __init__(self, pid: int):
        self.pid = pid
        self.returncode: int | None = None

    def wait(self) -> int:
        if self.returncode is None:
            _, status = os.waitpid(self.pid, 0)
            self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def kill(self) -> None:
        if self.returncode is None:
            os.kill(self.pid, signal.SIGKILL)


def _field(message: object, *keys: str) -> object:
    """message[key][key]... of a QMP reply or event (JSON objects); None where one is missing."""
    for key in keys:
        if not isinstance(message, Mapping):
            return None
        message = message.get(key)
    return message


async def _exited(proc: "subprocess.Popen | AdoptedProcess") -> int:
    """Wait for `proc` to end without a thread or SIGCHLD handler (it was spawned before the loop
    existed): its pidfd becomes readable when it exits."""
    loop = asyncio.get_running_loop()
    pidfd = os.pidfd_open(proc.pid)
    try:
        exited = loop.create_future()
        def readable() -> None:
            if not exited.done():
                exited.set_result(None)

        loop.add_reader(pidfd, readable)
        try:
            await exited
        finally:
            loop.remove_reader(pidfd)
    finally:
        os.close(pidfd)
    return proc.wait()
