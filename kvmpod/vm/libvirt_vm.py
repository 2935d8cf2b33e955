"""The libvirt backend: a pod's VM as a transient libvirt domain (docs/libvirt.md).

The domain is the pod's VMConfig rendered as XML (kvmpod/vm/domain_xml.py) and created with
virDomainCreateXML: nothing persists in libvirt once it is gone. libvirt starts QEMU (as its own
QEMU user, in its own cgroup, confined as qemu.conf says) and kvmpod learns how it ended from the
domain's lifecycle events, delivered on the pod's asyncio loop through libvirtaio. The agent's
virtio-serial port is a unix socket libvirt listens on in the pod directory; kvmpod connects to it.

libvirt-python is an optional extra (`pip install 'kvmpod[libvirt]'`): imported only here, and only
when a pod asks for this backend.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

from kvmpod.errors import KvmpodError, VMError
from kvmpod.vm.backend import AgentChannel, VMBackend, VMExit
from kvmpod.vm.backend_choice import INSTALL_HINT
from kvmpod.vm.cid import CidLease, allocate_cid
from kvmpod.vm.config import VMConfig
from kvmpod.vm.domain_xml import DOMAIN_PREFIX, METADATA_NS, DomainSpec, render
from kvmpod.vm.vsock_channel import connect_kernel_vsock

log = logging.getLogger(__name__)

# where libvirt keeps a running domain's QEMU pid (system, then session instances)
PID_DIRS = (Path("/run/libvirt/qemu"), Path(os.path.expanduser("~/.cache/libvirt/qemu/run")))
QEMU_LOG_DIR = Path("/var/log/libvirt/qemu")   # the system instance's log of each domain's QEMU
# libvirt's STOPPED event follows QEMU's exit once libvirt has reaped it and cleaned up (a second or
# more where init reaps orphans late); this long kvmpod waits for it before it says what it knows
EVENT_AFTER_EXIT = 1.0
# the asyncio loop libvirtaio dispatches libvirt's events on: libvirt takes one event implementation per
# process (a second registration is ignored), so one loop: a `kvmpod run` process has one pod's
_registered: list[asyncio.AbstractEventLoop] = []


def _libvirt() -> Any:
    try:
        import libvirt  # noqa: PLC0415 - optional and heavy: only libvirt pods load it
    except ImportError as e:
        raise KvmpodError(INSTALL_HINT) from e
    return libvirt


def _message(error: Exception) -> str:
    get = getattr(error, "get_error_message", None)
    return (get() if get else None) or str(error)


def connect(uri: str, read_only: bool = False) -> Any:
    """A connection to the libvirt daemon at `uri`; VMError naming the URI if there is none."""
    libvirt = _libvirt()
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)   # errors are raised, not printed
    try:
        return libvirt.openReadOnly(uri) if read_only else libvirt.open(uri)
    except libvirt.libvirtError as e:
        raise VMError(f"libvirt {uri}: {_message(e)}") from e


def libvirt_version(uri: str) -> str:
    """The version of the libvirt daemon at `uri` ("9.0.0"), over a read-only connection (`kvmpod doctor`)."""
    conn = connect(uri, read_only=True)
    try:
        number = conn.getLibVersion()
    except Exception as e:
        raise VMError(f"libvirt {uri}: {_message(e)}") from e
    finally:
        with contextlib.suppress(Exception):
            conn.close()
    return f"{number // 1000000}.{number // 1000 % 1000}.{number % 1000}"


def _register_loop() -> None:
    loop = asyncio.get_running_loop()
    if not _registered:
        import libvirtaio  # noqa: PLC0415

        libvirtaio.virEventRegisterAsyncIOImpl(loop=loop)
        _registered.append(loop)
    elif _registered[0] is not loop:
        raise VMError("libvirt's events go to the first asyncio loop of this process: one libvirt pod loop per process")


def pod_of(xml: str) -> tuple[str, str] | None:
    """The pod UUID and directory in a domain's kvmpod metadata, or None if it has none."""
    try:
        root = ElementTree.fromstring(xml)
    except ElementTree.ParseError:
        return None
    pod = root.find(f"metadata/{{{METADATA_NS}}}pod")
    if pod is None:
        return None
    uuid, directory = pod.findtext(f"{{{METADATA_NS}}}uuid"), pod.findtext(f"{{{METADATA_NS}}}dir")
    return (uuid, directory) if uuid and directory else None


def destroy_pod_domains(uri: str, pod_uuid: str, pod_dir: Path) -> list[str]:
    """Destroy the running domains whose kvmpod metadata names this pod (UUID and directory both; the name
    is never enough): those of a pod whose kvmpod process is gone (`kvmpod gc`). Returns their names."""
    libvirt = _libvirt()
    conn = connect(uri)
    destroyed = []
    try:
        for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
            if not dom.name().startswith(DOMAIN_PREFIX):
                continue
            try:
                owner = pod_of(dom.XMLDesc(0))
                if owner == (pod_uuid, str(pod_dir)):
                    dom.destroy()
                    destroyed.append(dom.name())
            except libvirt.libvirtError as e:
                if e.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:   # gone meanwhile: what gc wanted
                    raise VMError(f"libvirt {uri}: destroy {dom.name()}: {_message(e)}") from e
    finally:
        with contextlib.suppress(Exception):
            conn.close()
    return destroyed


def qemu_user(capabilities: str, accel: str) -> tuple[int, int] | None:
    """The uid and gid libvirt runs QEMU as: the DAC security model's base label for the domain type in
    the host capabilities (`+64055:+107` for Debian's libvirt-qemu), or None if it has none."""
    try:
        root = ElementTree.fromstring(capabilities)
    except ElementTree.ParseError:
        return None
    domain_type = "kvm" if accel == "kvm" else "qemu"
    for model in root.iter("secmodel"):
        if model.findtext("model") != "dac":
            continue
        for label in model.iter("baselabel"):
            if label.get("type") == domain_type and label.text:
                uid, _, gid = label.text.partition(":")
                with contextlib.suppress(ValueError):
                    return int(uid.lstrip("+")), int(gid.lstrip("+"))
    return None


def unreachable(path: Path, uid: int, gid: int) -> Path | None:
    """The first directory above `path` that user `uid` (primary group `gid`, and its supplementary
    groups) may not search, or `path` itself if it may not read it; None if it can get there."""
    import pwd

    try:
        groups = set(os.getgrouplist(pwd.getpwuid(uid).pw_name, gid))
    except KeyError:
        groups = {gid}

    def allowed(st: os.stat_result, bit: int) -> bool:   # bit: 1 search, 4 read
        if st.st_uid == uid:
            return bool(st.st_mode & (bit << 6))
        if st.st_gid in groups:
            return bool(st.st_mode & (bit << 3))
        return bool(st.st_mode & bit)

    path = path.absolute()
    for directory in reversed(path.parents):
        try:
            if not allowed(directory.stat(), 1):
                return directory
        except OSError:
            return directory
    try:
        return None if allowed(path.stat(), 4) else path
    except OSError:
        return path


@dataclass(frozen=True)
class DomainInfo:
    """What state.json records of a libvirt pod (docs/layout.md): `kvmpod gc` reconnects with it."""
    uri: str
    name: str

    def record(self) -> dict[str, str]:
        return {"backend": "libvirt", "libvirt_uri": self.uri, "domain": self.name}


class LibvirtVM(VMBackend):
    def __init__(self, config: VMConfig, spec: DomainSpec, uri: str, connect_timeout: float = 30.0):
        self.config = config
        self.spec = spec
        self.uri = uri
        self.connect_timeout = connect_timeout
        self._conn: Any = None
        self._dom: Any = None
        self._callbacks: list[int] = []
        self._ended: asyncio.Future[VMExit] | None = None
        self._panicked = False
        self._reset = False        # the guest reset itself (libvirt's REBOOT event; on_reboot destroys it)
        self._destroying = False   # kvmpod ends the domain itself (stop): not a failure
        self._pid: int | None = None
        self._cid: CidLease | None = None   # the guest's vsock CID (agent transport vhost-vsock)

    @property
    def info(self) -> DomainInfo:
        return DomainInfo(self.uri, self.spec.name)

    @property
    def transport_info(self) -> dict[str, object]:
        """For state.json: the agent transport, the backend and the domain (`kvmpod status`, gc)."""
        return {"agent_transport": self.config.agent_transport, **self.info.record()}

    @property
    def pid(self) -> int | None:
        return self._pid

    @property
    def ended(self) -> asyncio.Future[VMExit]:
        assert self._ended is not None, "VM not started"
        return self._ended

    def _domain_config(self) -> VMConfig:
        """The VMConfig as libvirt gets it: the kernel and initrd as copies in the pod directory, since
        libvirt's DAC driver chowns them to its QEMU user for the domain's life (the shared cache's
        files must keep their owner); the store's disk images are marked relabel='no' instead."""
        copies = {}
        for what, source in (("kernel", self.config.kernel), ("initrd", self.config.initrd)):
            target = self.spec.pod_dir / f"libvirt-{what}"
            try:
                shutil.copyfile(source, target)
            except OSError as e:
                raise VMError(f"{source}: cannot copy it for libvirt: {e.strerror}") from e
            copies[what] = target
        return dataclasses.replace(self.config, kernel=copies["kernel"], initrd=copies["initrd"])

    async def start(self) -> AgentChannel:
        if self.config.agent_transport == "vhost-vsock":   # host-wide CIDs: probed, held while the VM lives
            self._cid = allocate_cid(self.config.name, probe=True)
            self.config = dataclasses.replace(self.config, vsock_cid=self._cid.cid)
        try:
            return await self._start()
        except BaseException:
            self._release_cid()
            raise

    def _release_cid(self) -> None:
        if self._cid is not None:
            self._cid.release()

    async def _start(self) -> AgentChannel:
        libvirt = _libvirt()
        try:
            domain_config = self._domain_config()
            xml = render(domain_config, self.spec)
        except ValueError as e:
            raise VMError(f"--backend libvirt: {e}") from e
        log.debug("libvirt %s: domain XML:\n%s", self.uri, xml)
        _register_loop()
        loop = asyncio.get_running_loop()
        self._ended = loop.create_future()
        self._conn = await asyncio.to_thread(connect, self.uri)
        self._callbacks.append(self._conn.domainEventRegisterAny(
            None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle, None))
        self._callbacks.append(self._conn.domainEventRegisterAny(
            None, libvirt.VIR_DOMAIN_EVENT_ID_REBOOT, self._on_reboot, None))
        with contextlib.suppress(libvirt.libvirtError):
            self._conn.registerCloseCallback(self._on_close, None)
        user = qemu_user(self._conn.getCapabilities(), self.config.accel)
        try:
            self._check_reach(user, domain_config)
            self._hand_sockets(user)
        except VMError:
            await self._disconnect()
            raise
        try:
            self._dom = await asyncio.to_thread(self._conn.createXML, xml, 0)
        except libvirt.libvirtError as e:
            self._finish(VMExit(None, failure=f"libvirt {self.uri} did not start the domain: {_message(e)}"))
            await self._disconnect()
            raise VMError(f"libvirt {self.uri} did not start domain {self.spec.name}: {_message(e)}") from e
        self._pid = self._read_pid()
        if self._pid:
            loop.create_task(self._watch_qemu(self._pid))
        log.debug("libvirt %s: domain %s started (QEMU pid %s)", self.uri, self.spec.name, self._pid)
        try:
            return await self._connect_agent()
        except BaseException:
            await self.stop(grace=0)
            raise

    def _check_reach(self, user: tuple[int, int] | None, config: VMConfig) -> None:
        """QEMU opens the kernel, initrd and disk images itself, as libvirt's QEMU user (the store's images
        keep their owner: relabel='no'): every directory on the way must let that user through. Said in
        one line, naming the path, before the domain is created."""
        if user is None or os.geteuid() != 0:
            return
        for path in (config.kernel, config.initrd, *(d.path for d in config.disks)):
            if (blocked := unreachable(path, *user)) is not None:
                raise VMError(f"libvirt's QEMU user (uid {user[0]}) cannot reach {path}: {blocked} is not "
                              "searchable by it (make the store and run directories world-searchable, e.g. 0711)")

    def _hand_sockets(self, user: tuple[int, int] | None) -> None:
        """virtiofsd's sockets (root's, 0755: nobody else may connect) to the user libvirt runs QEMU as,
        who connects to them: QEMU starts as that user here, unlike the QEMU backend's, which opens
        everything as root before it switches user."""
        if user is None or os.geteuid() != 0:
            return
        for fs in self.config.filesystems:
            try:
                os.chown(fs.socket, *user)
                os.chmod(fs.socket, 0o600)
            except OSError as e:
                raise VMError(f"{fs.socket}: cannot hand virtiofsd's socket to libvirt's QEMU user: {e.strerror}") from e

    def _read_pid(self) -> int:
        for directory in PID_DIRS:
            with contextlib.suppress(OSError, ValueError):
                return int((directory / f"{self.spec.name}.pid").read_text().strip())
        return 0   # unknown (another libvirt layout): the domain still runs, state.json says which

    async def _watch_qemu(self, pid: int) -> None:
        """QEMU's exit, seen at once through a pidfd (it is libvirt's child, not ours): the pod ends
        promptly even when libvirt's STOPPED event comes late, and says why as well as it can."""
        loop = asyncio.get_running_loop()
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            return   # gone already, or not ours to watch: the STOPPED event tells
        try:
            exited = loop.create_future()
            loop.add_reader(pidfd, lambda: None if exited.done() else exited.set_result(None))
            try:
                await asyncio.wait({exited, self.ended}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                loop.remove_reader(pidfd)
        finally:
            os.close(pidfd)
        if self.ended.done():
            return
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.ended), EVENT_AFTER_EXIT)
            return
        self._finish(self._exit_without_event())

    def _exit_without_event(self) -> VMExit:
        """How QEMU ended when libvirt has not said yet: its own last words in libvirt's log."""
        name = self.spec.name
        if self._destroying:
            return VMExit(-9)
        if self._panicked:
            return VMExit(None, panicked=True)
        log_file = QEMU_LOG_DIR / f"{name}.log"
        try:
            lines = log_file.read_text(errors="replace").splitlines()[-5:]
        except OSError:
            lines = []
        for line in reversed(lines):
            if "terminating on signal" in line:
                return VMExit(None, failure=f"libvirt destroyed domain {name} (QEMU: {line.split(': ', 1)[-1].strip()})")
        tail = f": {' | '.join(lines[-2:])}" if lines else ""
        return VMExit(None, failure=f"QEMU of domain {name} ended (libvirt's log {log_file}{tail})")

    async def _open_agent(self) -> AgentChannel:
        """The agent's channel: the kernel's vsock to the guest's CID, else libvirt's unix socket for the
        virtio-serial port."""
        if self.config.agent_transport == "vhost-vsock":
            sock = await connect_kernel_vsock(self.config.vsock_cid)
            return await asyncio.open_connection(sock=sock, limit=1 << 20)
        return await asyncio.open_unix_connection(str(self.spec.agent_socket), limit=1 << 20)

    async def _connect_agent(self) -> AgentChannel:
        connecting = asyncio.ensure_future(self._open_agent())
        waits: set[asyncio.Future[Any]] = {connecting, self.ended}
        done, _ = await asyncio.wait(waits, timeout=self.connect_timeout,
                                     return_when=asyncio.FIRST_COMPLETED)
        if connecting in done:
            try:
                return connecting.result()
            except OSError as e:
                where = (f"vsock CID {self.config.vsock_cid}" if self.config.agent_transport == "vhost-vsock"
                         else str(self.spec.agent_socket))
                raise VMError(f"domain {self.spec.name}: cannot connect to the agent's port "
                              f"{where}: {e.strerror}") from e
        connecting.cancel()
        with contextlib.suppress(BaseException):
            await connecting
        if self.ended.done():
            raise VMError(f"domain {self.spec.name} failed to start: {self.ended.result().describe()}")
        raise VMError(f"domain {self.spec.name}: the agent's port did not answer within {self.connect_timeout:.0f} s")

    # -- events (called on the loop by libvirtaio) -------------------------------------------------

    def _on_lifecycle(self, _conn: Any, dom: Any, event: int, detail: int, _opaque: Any) -> None:
        libvirt = _libvirt()
        try:
            if dom.UUIDString() != self.spec.pod_uuid:
                return
        except libvirt.libvirtError:
            return
        if event == libvirt.VIR_DOMAIN_EVENT_CRASHED:
            self._panicked = True
        elif event == libvirt.VIR_DOMAIN_EVENT_STOPPED:
            self._finish(self._exit_for(detail))

    def _on_reboot(self, _conn: Any, dom: Any, _opaque: Any) -> None:
        with contextlib.suppress(Exception):
            if dom.UUIDString() == self.spec.pod_uuid:
                self._reset = True

    def _exit_for(self, detail: int) -> VMExit:
        libvirt = _libvirt()
        name = self.spec.name
        if detail == libvirt.VIR_DOMAIN_EVENT_STOPPED_CRASHED or self._panicked:
            return VMExit(None, panicked=True)
        if detail == libvirt.VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN:
            return VMExit(0, shutdown_reason="guest-shutdown")
        if detail == libvirt.VIR_DOMAIN_EVENT_STOPPED_DESTROYED:
            if self._reset and not self._destroying:   # as the QEMU backend's -no-reboot exit
                return VMExit(0, shutdown_reason="guest-reset")
            if self._destroying:
                return VMExit(-9)   # as a QEMU kvmpod killed: the runner knows why it did
            return VMExit(None, failure=f"libvirt destroyed domain {name} (virsh destroy, or its daemon)")
        if detail == libvirt.VIR_DOMAIN_EVENT_STOPPED_FAILED:
            return VMExit(None, failure=f"QEMU of domain {name} failed (libvirt's log: /var/log/libvirt/qemu/{name}.log)")
        return VMExit(None, failure=f"domain {name} stopped (libvirt event detail {detail})")

    def _on_close(self, _conn: Any, reason: int, _opaque: Any) -> None:
        self._finish(VMExit(None, failure=f"lost the connection to libvirt {self.uri} (reason {reason})"))

    def _finish(self, vm_exit: VMExit) -> None:
        if self._ended is not None and not self._ended.done():
            self._release_cid()
            self._ended.set_result(vm_exit)
            asyncio.get_running_loop().create_task(self._disconnect())

    async def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        for callback in self._callbacks:
            with contextlib.suppress(Exception):
                conn.domainEventDeregisterAny(callback)
        self._callbacks.clear()
        with contextlib.suppress(Exception):
            conn.unregisterCloseCallback()
        with contextlib.suppress(Exception):
            conn.close()

    # -- control -----------------------------------------------------------------------------------

    async def wait(self) -> VMExit:
        return await asyncio.shield(self.ended)

    async def stop(self, grace: float) -> VMExit:
        """Destroy the domain (as the QEMU backend's QMP quit: no guest cooperation); `grace` bounds the
        wait for libvirt's STOPPED event."""
        if self._ended is None:
            raise VMError("VM was never started")
        if self.ended.done():
            return self.ended.result()
        libvirt = _libvirt()
        self._destroying = True
        if self._dom is not None:
            try:
                await asyncio.to_thread(self._dom.destroy)
            except libvirt.libvirtError as e:
                if e.get_error_code() not in (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_OPERATION_INVALID):
                    self._finish(VMExit(None, failure=f"libvirt {self.uri}: destroy {self.spec.name}: {_message(e)}"))
        else:
            self._finish(VMExit(-9))
        with contextlib.suppress(asyncio.TimeoutError):
            return await asyncio.wait_for(asyncio.shield(self.ended), max(grace, 5.0))
        self._finish(VMExit(-9, failure=f"libvirt {self.uri} did not report the end of {self.spec.name}"))
        return self.ended.result()

    async def pause(self) -> None:
        await self._call("suspend")

    async def resume(self) -> None:
        await self._call("resume")

    async def _call(self, method: str) -> None:
        libvirt = _libvirt()
        if self._dom is None:
            raise VMError("VM was never started")
        try:
            await asyncio.to_thread(getattr(self._dom, method))
        except libvirt.libvirtError as e:
            raise VMError(f"libvirt {method} {self.spec.name}: {_message(e)}") from e
