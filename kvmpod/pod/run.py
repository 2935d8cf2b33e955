"""`kvmpod run`: prepare images and boot assets, boot the VM, run the apps, relay their I/O, tear down.

Teardown is unconditional: whatever happens (app exit, guest death, Ctrl-C, a bug), QEMU is gone
and the pod directory is removed (unless --keep) before run_pod returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Awaitable, Callable, TypeVar

from kvmpod.agent.session import AgentSession, ExitStatus, GuestProcess, Hello, OutputSink, ProcessSpec
from kvmpod.errors import EXIT_SIGNAL_BASE, AgentError, AppStartError, Interrupted, KvmpodError, VMError
from kvmpod.fsutil import write_atomically
from kvmpod.image.manifest import Isolator
from kvmpod.net.spec import NetRequest
from kvmpod.pod import audit
from kvmpod.pod.control import ControlServer
from kvmpod.pod.metadata import MetadataSecrets, PodMetadata
from kvmpod.pod.poddir import PodDir
from kvmpod.pod.resources import app_resources, size_vm
from kvmpod.pod.spec import AppOverrides, ResolvedApp, isolator_notices, pod_manifest, resolve_app
from kvmpod.pod.volumes import PodVolumes, Volume, app_mounts, host_transport, pod_volumes, unique_volumes
from kvmpod.store import Store, StoredImage
from kvmpod.store.locks import SharedLocks
from kvmpod.vm.backend import VMBackend, VMExit

if TYPE_CHECKING:
    from kvmpod.boot.snapshot import BootSnapshot, SnapshotUse
    from kvmpod.net.attach import PodNetwork
    from kvmpod.vm.config import VMConfig

log = logging.getLogger(__name__)
T = TypeVar("T")

SHUTDOWN_GRACE = 10.0   # seconds the guest gets to power off after SHUTDOWN
STOP_TIMEOUT = 10.0     # seconds the apps get to end after SIGTERM (a signal or `kvmpod stop`) before SIGKILL
KILL_WAIT = 5.0         # seconds the agent gets to report the apps' ends after SIGKILL before power-off
STDIN_CHUNK = 65536


@dataclass
class RunOptions:
    memory_mib: int | None = None   # None: sized from the apps' resource isolators (pod/resources.py)
    cpus: int | None = None
    hostname: str | None = None     # default kvmpod-<first 8 of the UUID>
    annotations: dict[str, str] = field(default_factory=dict)   # the pod manifest's annotations
    pod_isolators: list[Isolator] = field(default_factory=list)  # --pod-manifest's; resource ones bound the apps
    uuid_file: str | None = None    # --uuid-file-save: the UUID is written here once the pod exists
    kernel: str | None = None
    accel: str = "auto"
    agent_transport: str = "auto"   # --agent-transport (kvmpod/vm/transport.py)
    boot: str | None = None         # --boot snapshot|cold; None: [run] boot (kvmpod/boot/snapshot.py)
    debug: bool = False
    interactive: bool = False
    keep: bool = False
    boot_timeout: float = 60.0
    pod_env: dict[str, str] = field(default_factory=dict)
    kernel_args: list[str] = field(default_factory=list)
    detach: bool = False    # app output to <pod dir>/logs/, the directory stays once the apps have started
    stop_timeout: float = STOP_TIMEOUT
    on_started: Callable[[PodDir], None] | None = None   # called once every app runs (detach's report)
    volumes: list[Volume] = field(default_factory=list)  # --volume / the pod manifest's (pod/volumes.py)
    network: NetRequest = field(default_factory=NetRequest)  # --net, --port, --dns… (kvmpod/net/); default: none


def notice(message: str) -> None:
    print(f"kvmpod: notice: {message}", file=sys.stderr, flush=True)


class GuestDied(VMError):
    """The VM ended while kvmpod still expected something of it."""


class FdSink:
    """Writes app output to one of kvmpod's own fds, byte-exact; a closed reader silences it."""

    def __init__(self, fd: int):
        self.fd = fd
        self.broken = False

    def __call__(self, data: bytes) -> None:
        view = memoryview(data)
        while view and not self.broken:
            try:
                view = view[os.write(self.fd, view):]
            except BrokenPipeError:
                self.broken = True


class LogSink(FdSink):
    """Appends app output to its log file (--detach); a full disk silences it instead of ending the pod."""

    def __call__(self, data: bytes) -> None:
        try:
            super().__call__(data)
        except OSError as e:
            log.debug("app log: %s", e)
            self.broken = True


def run(apps: list[AppOverrides], options: RunOptions) -> int:
    if options.detach:
        from kvmpod.pod.detach import run_detached
        return run_detached(apps, options)
    return asyncio.run(run_pod(apps, options))


def prepare_apps(store: Store, apps: list[AppOverrides], pod_env: dict[str, str],
                 claims: SharedLocks, metadata_url: str = "") -> list[ResolvedApp]:
    """Find or import every image, claim it against `image rm`, and build (or reuse) its rootfs disk."""
    from kvmpod.image.manifest import check_runnable

    serials: dict[str, str] = {}
    resolved = []
    for overrides in apps:
        image = store.resolve(overrides.image)
        try:
            check_runnable(image.manifest)
        except KvmpodError as e:
            raise KvmpodError(f"{overrides.image}: {e}") from None
        with store.claim([image]) as held:
            disk = store.rootfs_disk(image)
            claims.take_over(held)
        serial = serials.setdefault(image.id, f"img{len(serials)}")
        resolved.append(resolve_app(image, keep_docker_entrypoint(image, overrides), pod_env, disk, serial,
                                    metadata_url))
    names = [a.name for a in resolved]
    if len(set(names)) != len(names):
        raise KvmpodError(f"two apps are named {sorted(n for n in names if names.count(n) > 1)[0]!r}: "
                          "give them distinct --name values")
    return resolved


def keep_docker_entrypoint(image: StoredImage, overrides: AppOverrides) -> AppOverrides:
    """`-- ARGS` replace a converted Docker image's CMD but keep its ENTRYPOINT, as with docker run
    (the converter records the ENTRYPOINT in the appc.io/docker/entrypoint annotation, as docker2aci
    does). An explicit --exec means the user takes over the command line: then the appc rule applies."""
    if overrides.args is None or overrides.exec is not None:
        return overrides
    try:
        entrypoint = json.loads(image.manifest.annotations.get("appc.io/docker/entrypoint", "null"))
    except ValueError:
        return overrides
    if not isinstance(entrypoint, list) or not entrypoint or not all(isinstance(w, str) for w in entrypoint):
        return overrides
    # app.exec[0] is ENTRYPOINT[0] already resolved in the image's PATH by the converter
    return dataclasses.replace(overrides, args=[*entrypoint[1:], *overrides.args])


def attach_volumes(resolved: list[ResolvedApp], volumes: list[Volume]) -> tuple[list[ResolvedApp], PodVolumes]:
    """Each app's mounts (explicit, else its mountPoints by name) and the pod's volumes in use,
    checked before anything boots; notices for mount points no volume satisfies."""
    by_name = unique_volumes(volumes)
    out = []
    for app in resolved:
        mounts, notices = app_mounts(app.name, by_name, app.explicit_mounts, app.mount_points)
        for line in notices:
            notice(line)
        out.append(dataclasses.replace(app, mounts=mounts))
    return out, pod_volumes(by_name, [a.mounts for a in out])


async def run_pod(apps: list[AppOverrides], options: RunOptions) -> int:
    timings = {"start": time.time()}
    with SharedLocks() as claims:  # the pod's images stay in the store until the pod is gone
        return await _run_claimed(apps, options, timings, claims)


async def _run_claimed(apps: list[AppOverrides], options: RunOptions, timings: dict[str, float],
                       claims: SharedLocks) -> int:
    from kvmpod.boot.initrd import build_initrd, find_agent
    from kvmpod.boot.kernel import find_kernel
    from kvmpod.vm.accel import choose_accelerator
    from kvmpod.vm.config import Disk, FsDevice, NinePShare, VMConfig
    from kvmpod.vm.virtiofs import FsShare, Virtiofsd, find_virtiofsd
    from kvmpod.vm.machine import plan_boot
    from kvmpod.vm.qemu import QemuVM, check_socket_path
    from kvmpod.net.attach import AppPorts, needs_netlink, setup as setup_network

    metadata_secrets = MetadataSecrets.generate()  # the URL goes into every app's environment
    resolved = prepare_apps(Store(), apps, options.pod_env, claims, metadata_secrets.url)
    resolved, volumes = attach_volumes(resolved, options.volumes)
    for line in isolator_notices(resolved, options.pod_isolators):  # spec/ace.md: ignored ones are made known
        notice(line)
    pod_limits = app_resources("pod", options.pod_isolators) if options.pod_isolators else None
    size = size_vm([app_resources(a.name, a.app_isolators) for a in resolved], pod_limits,
                   memory_mib=options.memory_mib, cpus=options.cpus)
    for line in size.notices:
        notice(line)
    log.debug("VM size: %d MiB, %d vCPUs (%s)", size.memory_mib, size.cpus, size.reason)
    kernel = find_kernel(options.kernel)
    initrd = build_initrd(find_agent(), kernel)
    accel = choose_accelerator(options.accel)
    if accel.name == "tcg" and accel.automatic:
        notice(f"using TCG software emulation (slow): {accel.reason}")
    plan = plan_boot(kernel, size.cpus, options.debug, accel.name, options.kernel_args)
    from kvmpod.boot.snapshot import boot_setting
    from kvmpod.vm.transport import choose_transport
    boot = options.boot or boot_setting()
    # what rules a snapshot out before the VM is even described (kvmpod/boot/snapshot.py unfit())
    snapshot_possible = boot == "snapshot" and not volumes.host and options.network.mode == "none"
    agent_transport = choose_transport(options.agent_transport, kernel, snapshot=snapshot_possible)
    if agent_transport.notice:
        notice(agent_transport.notice)
    disks = list({app.disk_serial: Disk(app.disk, app.disk_serial) for app in resolved}.values())
    if volumes.host:
        try:
            find_virtiofsd()
            have_virtiofsd = True
        except VMError:
            have_virtiofsd = False
        transport, why = host_transport(have_virtiofsd, os.geteuid() == 0)
        if transport == "virtiofs" and not have_virtiofsd:
            find_virtiofsd()  # forced: fail before the pod exists, saying why
        if why:
            notice(why)
        volumes = dataclasses.replace(volumes, transport=transport)

    pod = PodDir.create()
    network = None
    try:
        hostname = options.hostname or f"kvmpod-{pod.uuid[:8]}"
        if options.uuid_file:
            write_atomically(Path(options.uuid_file), pod.uuid.encode())
        manifest = pod_manifest(resolved, options.annotations, options.pod_isolators, volumes.volumes)
        shares = [FsShare(volumes.tag(v), Path(v.source or ""), pod.file(f"{volumes.tag(v)}.sock"), v.read_only)
                  for v in volumes.host if volumes.transport == "virtiofs"]
        shares_9p = [NinePShare(volumes.tag(v), Path(v.source or ""), v.read_only,
                                "passthrough" if os.geteuid() == 0 else "none")
                     for v in volumes.host if volumes.transport == "9p"]
        pod.write_json("pod-manifest", manifest)
        metadata_secrets.save_key(pod.path)
        metadata = PodMetadata.build(pod.uuid, manifest, resolved, metadata_secrets)
        app_ports = [AppPorts(a.name, a.image.manifest.app.ports if a.image.manifest.app else []) for a in resolved]
        if needs_netlink(options.network):  # in a thread: pyroute2's synchronous API runs its own event loop
            network = await asyncio.to_thread(setup_network, options.network, pod.uuid, pod.path, app_ports, notice)
        else:
            network = setup_network(options.network, pod.uuid, pod.path, app_ports, notice)
        if network.attachments:
            pod.update(networks=network.summary())
        config = VMConfig(
            name=f"kvmpod-{pod.uuid}", kernel=kernel.image, initrd=initrd,
            cmdline=f"{plan.cmdline} kvmpod.hostname={hostname} {agent_transport.kernel_arg()}",
            console_log=pod.file("console.log"), agent_transport=agent_transport.kind,
            vhost_user_vsock=pod.file("vhost-vsock.sock") if agent_transport.kind == "vsock-user" else None,
            machine=plan.machine,
            machine_options=plan.machine_options, firmware=plan.firmware, accel=accel.name,
            memory_mib=size.memory_mib, cpus=size.cpus, disks=disks,
            filesystems=[FsDevice(s.tag, s.socket) for s in shares], shares_9p=shares_9p, nics=network.nics())
        vsock_front = pod.file("vsock.sock") if agent_transport.kind == "vsock-user" else None
        for sock in (config.vhost_user_vsock, vsock_front, *(s.socket for s in shares)):
            if sock:
                check_socket_path(Path(f"{sock}_4294967295") if sock == vsock_front else sock)
        log.debug("pod %s: kernel %s (%s), machine %s, accel %s (%s)", pod.uuid, kernel.image, kernel.kind,
                  plan.machine_arg, accel.name, accel.reason)
        log.debug("kernel cmdline: %s", plan.cmdline)
        log.debug("agent transport %s (%s)", agent_transport.kind, agent_transport.reason)
        restore = None
        if snapshot_possible:
            restore = await use_snapshot(dataclasses.replace(
                config, cmdline=f"{plan.cmdline} {agent_transport.kernel_arg()}"), options.boot_timeout)
        log.debug("boot: %s", f"from snapshot {restore.snapshot.key}" if restore else "cold")

        def cold_vm() -> QemuVM:
            return QemuVM(config, pod.file("qemu.log"), connect_timeout=options.boot_timeout, vsock_front=vsock_front)

        vm = cold_vm() if restore is None else QemuVM(
            restore.snapshot.restore_config(dataclasses.replace(config, cmdline=restore.cmdline)),
            pod.file("qemu.log"), connect_timeout=options.boot_timeout, restore_from=restore.snapshot.state)
        audit.pod_started(pod.uuid, [{"name": a.name, "image": a.image.id, "image_name": a.image.manifest.name,
                                      "labels": a.image.manifest.labels, "signature": a.image.signature}
                                     for a in resolved])
        timings["qemu_spawn"] = time.time()
        runner = PodRunner(pod, vm, resolved, options, timings, metadata,
                           [Virtiofsd(s, pod.file(f"{s.tag}.log")) for s in shares], volumes, network,
                           restore=restore, cold_vm=cold_vm, hostname=hostname)
        return await runner.run()
    except KvmpodError as e:
        with contextlib.suppress(OSError):
            pod.update(error=str(e))
        if options.keep:
            raise KvmpodError(f"{e} (pod directory kept: {pod.path})") from None
        raise
    finally:
        released = (await asyncio.to_thread(release_network, network, pod) if needs_netlink(options.network)
                    else release_network(network, pod))
        # a detached pod's directory outlives it (status, logs) once its UUID was given out; one whose
        # network could not be released stays for `kvmpod gc` to try again
        if released and not (options.keep or (options.detach and "apps_started" in timings)):
            pod.remove()


async def use_snapshot(config: "VMConfig", timeout: float) -> "SnapshotClaim | None":
    """A claim on the boot snapshot for `config` (made now if needed), or None with a notice when it
    cannot be made (the pod then boots cold)."""
    from kvmpod.boot.snapshot import find_or_make, unfit
    from kvmpod.vm.qemu import qemu_binary

    if why := unfit(config):
        log.debug("boot: cold, %s", why)
        return None
    try:
        use, took = await find_or_make(config, qemu_binary(), timeout=timeout,
                                       on_making=lambda: log.debug("boot: making a boot snapshot first"))
    except (KvmpodError, OSError) as e:
        notice(f"booting cold: {e}")
        return None
    if took:
        log.debug("boot snapshot %s made in %.2f s", use.snapshot.key, took)
    return SnapshotClaim(use.snapshot, use, config.cmdline)


@dataclass
class SnapshotClaim:
    """The snapshot a pod starts from, held until QEMU has started from it."""
    snapshot: "BootSnapshot"
    use: "SnapshotUse"
    cmdline: str


def release_network(network: "PodNetwork | None", pod: PodDir) -> bool:
    """The pod's taps, leases, port forwards and CNI namespaces, once the VM is gone. A failure is
    reported (it must not hide the apps' exit status) and leaves net.json for `kvmpod gc`."""
    from kvmpod.net.attach import release

    try:
        if network is not None:
            network.close_fds()
        release(pod.path)
        return True
    except KvmpodError as e:
        print(f"kvmpod: error: pod {pod.uuid}: {e} (`kvmpod gc` tries again)", file=sys.stderr, flush=True)
        with contextlib.suppress(OSError):
            pod.update(error=str(e))
        return False


class PodRunner:
    """One pod's life from QEMU start to power-off."""

    def __init__(self, pod: PodDir, vm: VMBackend, apps: list[ResolvedApp], options: RunOptions,
                 timings: dict[str, float], metadata: PodMetadata | None = None,
                 fs_daemons: list | None = None, volumes: PodVolumes | None = None,
                 network: "PodNetwork | None" = None, restore: SnapshotClaim | None = None,
                 cold_vm: Callable[[], VMBackend] | None = None, hostname: str = ""):
        self.pod = pod
        self.restore = restore    # `vm` starts from this boot snapshot; cold_vm() is the fallback
        self.cold_vm = cold_vm
        self.hostname = hostname
        self.network = network
        self.fs_daemons = fs_daemons or []   # virtiofsd per host volume (kvmpod/vm/virtiofs.py)
        self.volumes = volumes or PodVolumes()
        self.metadata = metadata
        self.vm = vm
        self.apps = apps
        self.options = options
        self.timings = timings
        self.session: AgentSession | None = None
        self.processes: list[GuestProcess] = []
        self.signals_seen = 0
        self.killed_by_user: int | None = None
        self.control: ControlServer | None = None
        self.stop_task: asyncio.Task | None = None
        self.stop_reason: tuple[str, int] | None = None   # why kvmpod ended the VM itself, and the exit status
        self.log_sinks: list[LogSink] = []

    async def run(self) -> int:
        try:
            return await self._run()
        except VMError as e:  # GuestDied, or QEMU killed while it was starting
            if self.killed_by_user is not None:
                raise Interrupted(f"pod killed after a second signal {self.killed_by_user}",
                                  EXIT_SIGNAL_BASE + self.killed_by_user) from None
            if self.stop_reason is not None and self.apps_started:
                return self._record_exit(self._statuses_after_kill())  # `stop --force`, or SIGKILL went unanswered
            if self.stop_reason is not None:
                raise Interrupted(f"pod {self.stop_reason[0]}", self.stop_reason[1]) from None
            if isinstance(e, GuestDied):
                raise VMError(self._explain_death(e.args[0])) from None
            raise
        finally:
            await self._teardown()

    async def _run(self) -> int:
        self.control = ControlServer(self.pod.file("control.sock"), self)
        await self.control.start()
        sinks = self._sinks()
        for daemon in self.fs_daemons:  # QEMU connects to their sockets: they come first
            await daemon.start()
            self.pod.update(virtiofsd_pids=[d.pid for d in self.fs_daemons if d.pid])
        hello = await self._boot()
        self.timings["agent_ready"] = time.time()
        log.debug("agent %s speaks protocol %d (guest boot to agent: %.3f s guest clock)",
                  hello.agent_version, hello.version, hello.boot_ns / 1e9)
        if self.network and (frame := self.network.guest.frame()):  # interfaces, DNS, hosts entries
            await self._until(self.session.send(frame))
        if self.metadata:  # served by the agent from before the first app starts (docs/metadata.md)
            for frame in self.metadata.frames():
                await self._until(self.session.send(frame))
        self._install_signal_handlers()
        tty = self._local_tty()
        for i, app in enumerate(self.apps):
            spec = ProcessSpec(app.name, app.disk_serial, app.argv, app.env, app.working_dir, app.user,
                               app.group, app.supplementary_gids, stdin=self.options.interactive and i == 0,
                               readonly_rootfs=app.readonly_rootfs,
                               pre_start=app.event_handlers.get("pre-start", []),
                               post_stop=app.event_handlers.get("post-stop", []), isolators=app.isolators,
                               tty=tty if i == 0 else None,
                               volume_mounts=[m.field(self.volumes.tag(m.volume), self.volumes.transport)
                                              for m in app.mounts])
            self.processes.append(await self._until(self.session.start(spec, *sinks[app.name])))
        self.timings["apps_started"] = time.time()
        self.pod.update(state="running", apps=[{"name": a.name, "image": a.image.id} for a in self.apps])
        if self.options.on_started:
            self.options.on_started(self.pod)
        stdin_task = None
        if self.options.interactive:
            stdin_task = asyncio.get_running_loop().create_task(self._pump_stdin(self.processes[0]))
        try:
            with self._terminal(self.processes[0] if tty else None):
                statuses: list[ExitStatus] = [await self._until(p.wait()) for p in self.processes]
        finally:
            if stdin_task:
                stdin_task.cancel()
        return self._record_exit(statuses)

    async def _boot(self) -> Hello:
        """Start QEMU and shake hands with the agent. A VM restored from a boot snapshot gets THAW first;
        one that fails to restore costs its snapshot (removed, to be made anew) and the pod boots cold."""
        try:
            return await self._start_vm()
        except (VMError, AgentError) as e:
            if self.restore is None or self.cold_vm is None or self.stop_reason is not None:
                raise
            failed, self.restore = self.restore, None
            failed.use.discard()
            if self.session:
                await self.session.close()
                self.session = None
            if self.vm.pid is not None:
                with contextlib.suppress(KvmpodError):
                    await self.vm.stop(grace=0)
            notice(f"boot snapshot {failed.snapshot.key} did not restore ({e}): booting cold")
            self.vm = self.cold_vm()
            return await self._start_vm()

    async def _start_vm(self) -> Hello:
        try:
            channel = await self.vm.start()
        finally:
            if self.restore:  # QEMU has mapped the snapshot (or failed to): eviction may take it now
                self.restore.use.release()
        if self.network:
            self.network.close_fds()  # QEMU holds the taps now: they end with it
        if self.stop_reason is not None:  # stopped while QEMU was being spawned
            await self.vm.stop(grace=0)
            raise GuestDied(await self.vm.wait())
        self.pod.update(state="booting", qemu_pid=self.vm.pid, boot="snapshot" if self.restore else "cold",
                        **({"snapshot": self.restore.snapshot.key} if self.restore else {}),
                        **getattr(self.vm, "transport_info", {}))
        self.session = AgentSession(*channel, on_log=lambda line: log.debug("agent: %s", line))
        if self.restore:
            await self._until(self.session.thaw(self.hostname))
        return await self._until(self.session.handshake(), self.options.boot_timeout,
                                 "the guest agent did not answer")

    def _record_exit(self, statuses: list[ExitStatus]) -> int:
        """state.json's final word on the apps; returns kvmpod run's exit status."""
        self.timings["apps_exited"] = time.time()
        self.pod.update(state="exited", apps=[{"name": a.name, "image": a.image.id, "exit": s.describe(),
                                               "exit_code": s.shell_code} for a, s in zip(self.apps, statuses)])
        for app, status in zip(self.apps, statuses):
            log.debug("app %s %s", app.name, status.describe())
        failing = [s.shell_code for s in statuses if s.shell_code]
        return failing[0] if failing else 0

    def _statuses_after_kill(self) -> list[ExitStatus]:
        """The apps' statuses once kvmpod has killed the VM: those the agent reported, SIGKILL for the rest."""
        statuses = []
        for proc in self.processes:
            fut = proc.exited
            done = fut.done() and not fut.cancelled() and fut.exception() is None
            statuses.append(fut.result() if done else ExitStatus(signal=signal.SIGKILL))
        return statuses

    # -- what the control socket asks for (kvmpod/pod/control.py) ------------------------------

    @property
    def apps_started(self) -> bool:
        return "apps_started" in self.timings

    @property
    def accepts_enter(self) -> bool:
        return (self.apps_started and self.stop_task is None and self.stop_reason is None
                and self.session is not None and not self.session.failed.done())

    async def start_process(self, spec: ProcessSpec, on_stdout: OutputSink, on_stderr: OutputSink) -> GuestProcess:
        """Start one more process in the pod (kvmpod enter); raises if the VM or the session ends first."""
        if self.session is None:
            raise AgentError("the pod's agent is not up yet")
        return await self._until(self.session.start(spec, on_stdout, on_stderr))

    def request_stop(self, timeout: float, force: bool) -> None:
        """`kvmpod stop`: SIGTERM to the apps, `timeout` seconds, SIGKILL, power-off. `force`: kill QEMU now."""
        loop = asyncio.get_running_loop()
        if force:
            self.stop_reason = self.stop_reason or ("stopped with --force", EXIT_SIGNAL_BASE + signal.SIGKILL)
            loop.create_task(self._kill_vm())
        elif self.stop_task is None:
            self.stop_task = loop.create_task(self._stop_apps(signal.SIGTERM, timeout))

    async def _kill_vm(self) -> None:
        if self.vm.pid is not None:  # else QEMU is being spawned: _run stops it once it is
            with contextlib.suppress(KvmpodError):
                await self.vm.stop(grace=0)

    async def _stop_apps(self, signo: int, timeout: float) -> None:
        """`signo` to every app, `timeout` seconds, SIGKILL to what still runs, and if the agent does not
        report their ends either, power-off. Before the apps have all started: the VM goes at once."""
        if not self.apps_started:
            self.stop_reason = self.stop_reason or ("stopped before its apps started", EXIT_SIGNAL_BASE + signo)
            await self._kill_vm()
            return
        for sig, wait in ((signo, timeout), (signal.SIGKILL, KILL_WAIT)):
            running = [p for p in self.processes if not p.exited.done()]
            with contextlib.suppress(KvmpodError, ConnectionError):
                for proc in running:
                    await proc.signal(sig)
            if await self._all_exited(wait):
                return
            log.debug("apps still running %.0f s after signal %d", wait, sig)
        self.stop_reason = self.stop_reason or ("killed: the guest did not report the apps' ends",
                                                EXIT_SIGNAL_BASE + signal.SIGKILL)
        await self._kill_vm()

    async def _all_exited(self, timeout: float) -> bool:
        waits = [asyncio.shield(p.exited) for p in self.processes if not p.exited.done()]
        if not waits:
            return True
        every = asyncio.gather(*waits, return_exceptions=True)
        await asyncio.wait({every, self.vm.ended}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if not every.done():
            every.cancel()
            with contextlib.suppress(BaseException):
                await every
            return self.vm.ended.done()
        return True

    # -- the local side: output sinks, the terminal -------------------------------------------

    def _sinks(self) -> dict[str, tuple[OutputSink, OutputSink]]:
        """Where each app's stdout and stderr go: kvmpod's own, or with --detach one log file per app
        (<pod dir>/logs/<app>.log, both streams in arrival order)."""
        if not self.options.detach:
            stdout, stderr = FdSink(sys.stdout.fileno()), FdSink(sys.stderr.fileno())
            return {app.name: (stdout, stderr) for app in self.apps}
        logs = self.pod.file("logs")
        logs.mkdir(mode=0o700, exist_ok=True)
        sinks: dict[str, tuple[OutputSink, OutputSink]] = {}
        for app in self.apps:
            fd = os.open(logs / f"{app.name}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
            sink = LogSink(fd)
            self.log_sinks.append(sink)
            sinks[app.name] = (sink, sink)
        return sinks

    def _local_tty(self) -> tuple[int, int] | None:
        """--interactive on a terminal: the app gets a pty of the terminal's size."""
        from kvmpod.pod.terminal import is_terminal, window_size

        if not self.options.interactive or not is_terminal(sys.stdin.fileno()):
            return None
        return window_size(sys.stdin.fileno()) or (24, 80)

    @contextlib.contextmanager
    def _terminal(self, proc: GuestProcess | None):
        """Raw mode and window-size changes while the app has the terminal; restored however it ends."""
        if proc is None:
            yield
            return
        from kvmpod.pod.terminal import RawTerminal, window_size

        loop = asyncio.get_running_loop()
        fd = sys.stdin.fileno()

        def resized() -> None:
            if size := window_size(fd):
                loop.create_task(proc.resize(*size))

        loop.add_signal_handler(signal.SIGWINCH, resized)
        try:
            with RawTerminal(fd):
                yield
        finally:
            loop.remove_signal_handler(signal.SIGWINCH)

    async def _until(self, aw: Awaitable[T], timeout: float | None = None, what: str = "") -> T:
        """Await `aw` unless the VM dies, the agent session fails, or `timeout` passes first."""
        task = asyncio.ensure_future(aw)
        waits: set[asyncio.Future] = {task, self.vm.ended}
        if self.session:
            waits.add(self.session.failed)
        done, _ = await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if task in done and not self._failed_with_session(task):
            return task.result()
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        if self.vm.ended.done():
            raise GuestDied(self.vm.ended.result())
        if self.session and self.session.failed.done():
            # the channel usually closes because the VM is going down: prefer that explanation
            with contextlib.suppress(asyncio.TimeoutError):
                raise GuestDied(await asyncio.wait_for(asyncio.shield(self.vm.ended), 2.0))
            raise self.session.failed.result()
        raise AgentError(f"{what} within {timeout:.0f} s (console log: {self.pod.file('console.log')})")

    def _failed_with_session(self, task: asyncio.Future) -> bool:
        """True when `task` failed only because the whole session did (explained below, not by the task)."""
        error = task.exception()
        return (error is not None and not isinstance(error, AppStartError)
                and self.session is not None and self.session.failed.done())

    def _explain_death(self, vm_exit: VMExit) -> str:
        from kvmpod.vm.console import explain

        detail = explain(self.pod.file("console.log"))
        what = vm_exit.failure or detail or vm_exit.describe()
        return f"the VM ended before the app finished: {what}"

    async def _pump_stdin(self, proc: GuestProcess) -> None:
        """Relay kvmpod's stdin to the app. A thread reads it: stdin may be a file, a pipe or a tty."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=4)
        fd = sys.stdin.fileno()

        def reader() -> None:
            while True:
                try:
                    data = os.read(fd, STDIN_CHUNK)
                except OSError:
                    data = b""
                try:
                    asyncio.run_coroutine_threadsafe(queue.put(data), loop).result()
                except (RuntimeError, asyncio.CancelledError):
                    return  # the loop is gone: the app has finished
                if not data:
                    return

        threading.Thread(target=reader, name="kvmpod-stdin", daemon=True).start()
        with contextlib.suppress(AgentError):
            while data := await queue.get():
                await proc.write_stdin(data)
            await proc.close_stdin()

    def _install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for signo in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.add_signal_handler(signo, self._on_signal, signo)

    def _on_signal(self, signo: int) -> None:
        """First SIGINT/SIGTERM/SIGHUP: forward it to the apps, SIGKILL after the stop timeout. Second
        (or one during `kvmpod stop`): kill the VM."""
        self.signals_seen += 1
        loop = asyncio.get_running_loop()
        if self.signals_seen == 1 and self.stop_task is None:
            self.stop_task = loop.create_task(self._stop_apps(signo, self.options.stop_timeout))
        else:
            self.killed_by_user = signo
            loop.create_task(self.vm.stop(grace=0))

    async def _teardown(self) -> None:
        loop = asyncio.get_running_loop()
        for signo in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(signo)
        if self.vm.pid is None:
            await self._stop_fs_daemons()
            await self._close_local()
            return  # QEMU never started: nothing else to stop
        try:
            # the guest writes through to the host only on host volumes: without them there is nothing
            # to sync or unmount, and QEMU can be told to quit at once
            if self.session and not self.vm.ended.done() and self.volumes.host:
                await self.session.shutdown()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(asyncio.shield(self.vm.ended), SHUTDOWN_GRACE)
            if not self.vm.ended.done():
                await self.vm.stop(grace=2.0)
        finally:
            if self.options.debug:
                from kvmpod.vm.console import tail
                for line in tail(self.pod.file("console.log")):
                    log.debug("console: %s", line)
            if self.session:
                await self.session.close()
            await self._stop_fs_daemons()
            self.timings["vm_ended"] = time.time()
            self.pod.update(state="exited" if self.pod.state.get("state") == "exited" else "failed",
                            timings=self.timings)
            audit.pod_ended(self.pod.uuid, self.pod.state["state"], self.pod.state.get("apps", []))
            await self._close_local()

    async def _stop_fs_daemons(self) -> None:
        """virtiofsd after QEMU: killed and waited for, so none outlives the pod."""
        for daemon in self.fs_daemons:
            with contextlib.suppress(Exception):
                await daemon.stop()

    async def _close_local(self) -> None:
        """The pod is gone: stop the stop task, close the app logs, and last the control socket, whose
        connections' EOF tells `kvmpod stop` and `logs --follow` that the pod has ended."""
        if self.stop_task:
            self.stop_task.cancel()
        for sink in self.log_sinks:
            with contextlib.suppress(OSError):
                os.close(sink.fd)
        self.log_sinks.clear()
        if self.control:
            await self.control.close()


