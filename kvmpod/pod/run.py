"""`kvmpod run`, second half (the first plans the pod: launch.py): the pod's manifest, metadata and
network, QEMU (unless planning spawned it from a boot snapshot), a PodRunner (runner.py) for its
life, and the release of what the pod held. Also the way back from the idle relay: a runner rebuilt
from the hand-over record (handover.py).

Teardown is unconditional: whatever happens (app exit, guest death, Ctrl-C, a bug), QEMU is gone
and the pod directory is removed (unless --keep) before these return.

Imports point one way: run → runner → control, relay, handover → options, state.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

from kvmpod.agent.session import AgentSession
from kvmpod.boot.snapshot import find as find_snapshot
from kvmpod.boot.snapshot import make_missing
from kvmpod.boot.snapshot import unfit as snapshot_unfit
from kvmpod.errors import KvmpodError
from kvmpod.fsutil import write_atomically
from kvmpod.net.attach import PodNetwork, needs_netlink, release
from kvmpod.net.attach import setup as setup_network
from kvmpod.pod import audit
from kvmpod.pod.control import ControlServer
from kvmpod.pod.handover import RelayState
from kvmpod.pod.launch import PodPlan, SnapshotClaim, app_ports, plan_pod
from kvmpod.pod.metadata import PodMetadata
from kvmpod.pod.options import RunOptions, notice
from kvmpod.pod.poddir import PodDir
from kvmpod.pod.relay import find_relay
from kvmpod.pod.relay import unfit as relay_unfit
from kvmpod.pod.output import FdSink, LogSink
from kvmpod.pod.runner import PodRunner
from kvmpod.pod.spec import AppOverrides, pod_manifest
from kvmpod.store.locks import SharedLocks
from kvmpod.vm.backend import VMBackend
from kvmpod.vm.cgroup import Cgroup
from kvmpod.vm.config import VMConfig
from kvmpod.vm.qemu import QemuVM
from kvmpod.vm.spawn import qemu_binary
from kvmpod.vm.virtiofsd import Virtiofsd

log = logging.getLogger(__name__)


async def run_pod(apps: list[AppOverrides], options: RunOptions) -> int:
    """Plan and run a pod from an event loop that already runs (a --detach'ed pod's child)."""
    timings = {"start": time.time()}
    with SharedLocks() as claims:  # the pod's images stay in the store until the pod is gone
        return await run_planned(plan_pod(apps, options, claims, timings), options, timings, claims)


async def run_planned(plan: PodPlan, options: RunOptions, timings: dict[str, float],
                      claims: SharedLocks | None = None) -> int:
    """The second half of `kvmpod run` (the first: kvmpod/pod/launch.py): the pod's manifest, metadata
    and network, QEMU (unless planning spawned it from a boot snapshot), the apps, and teardown."""
    pod, resolved, volumes = plan.pod, plan.apps, plan.volumes
    network = plan.network   # --net user or default: set up while planning (launch.py); released at the end here
    maker: asyncio.Task | None = None   # the boot snapshot, made alongside a first pod that boots cold

    def freeing_the_slot(then: Callable[[PodDir], None] | None) -> Callable[[PodDir], None]:
        def callback(ready: PodDir) -> None:
            plan.release_start_slot()
            if then is not None:
                then(ready)
        return callback

    # the start slot (admission.py) goes once the apps run, or once an OCI-created pod waits for `start`
    # (a runtime may create several containers before it starts any); the backend as chosen
    options = dataclasses.replace(
        options, backend=plan.backend.name, on_started=freeing_the_slot(options.on_started),
        on_created=freeing_the_slot(options.on_created) if options.hold_apps else options.on_created)
    try:
        relay = relay_for(options, bool(plan.shares), plan.config.agent_transport)
        if options.uuid_file:
            try:
                write_atomically(Path(options.uuid_file), pod.uuid.encode())
            except OSError as e:
                raise KvmpodError(f"--uuid-file-save {options.uuid_file}: {e.strerror}") from e
        manifest = pod_manifest(resolved, options.annotations, options.pod_isolators, volumes.volumes)
        pod.write_json("pod-manifest", manifest)
        plan.metadata_secrets.save_key(pod.path)
        metadata = PodMetadata.build(pod.uuid, manifest, resolved, plan.metadata_secrets)
        if network is None and needs_netlink(options.network):  # in a thread: pyroute2's synchronous API
            network = await asyncio.to_thread(setup_network, options.network, pod.uuid, pod.path,  # runs its own
                                              app_ports(resolved), notice)                       # event loop
        elif network is None:
            network = setup_network(options.network, pod.uuid, pod.path, app_ports(resolved), notice)
        if network.attachments:
            pod.update(networks=network.summary())
        if plan.backend.name == "libvirt":   # libvirt opens the bridge's tap by name: it must outlive kvmpod's fd
            network.persist_taps()
        config = dataclasses.replace(plan.config, nics=network.nics())
        restore = plan.restore
        if plan.snapshot_possible and restore is None:
            restore, maker = use_snapshot(dataclasses.replace(config, cmdline=plan.snapshot_cmdline),
                                          options.boot_timeout)
        if plan.spawned is None:
            log.debug("boot: %s", f"from snapshot {restore.snapshot.key}" if restore else "cold")

        def cold_vm() -> VMBackend:
            if plan.backend.name == "libvirt":
                return libvirt_vm(plan, config, options.boot_timeout)
            return QemuVM(config, pod.file("qemu.log"), connect_timeout=options.boot_timeout,
                          vsock_front=plan.vsock_front, cgroup=plan.cgroup)

        vm: VMBackend
        if restore is None:
            vm = cold_vm()
        else:
            vm = QemuVM(restore.snapshot.restore_config(dataclasses.replace(config, cmdline=restore.cmdline)),
                        pod.file("qemu.log"), connect_timeout=options.boot_timeout,
                        restore_from=restore.snapshot.state, spawned=plan.spawned, cgroup=plan.cgroup)
            plan.spawned = None  # the VM's now: the runner's teardown ends it
        audit.pod_started(pod.uuid, [{"name": a.name, "image": a.image.id, "image_name": a.image.manifest.name,
                                      "labels": a.image.manifest.labels, "signature": a.image.signature}
                                     for a in resolved])
        timings.setdefault("qemu_spawn", time.time())
        runner = PodRunner(pod, vm, resolved, options, timings, metadata,
                           [Virtiofsd(s, pod.file(f"{s.tag}.log"), plan.cgroup) for s in plan.shares], volumes, network,
                           restore=restore, cold_vm=cold_vm, hostname=plan.hostname,
                           claim_fds=claims.fds if claims else (), relay=relay, side_task=maker)
        return await runner.run()
    except KvmpodError as e:
        raise _failed(pod, options, e)
    finally:
        plan.abandon()  # what no runner took: a spawned QEMU, the snapshot claim
        if maker is not None:
            await _finish_maker(maker, failed=sys.exc_info()[0] is not None)
        await _release(network, pod, options, timings)


async def run_after_relay(state: RelayState, unread: bytes, broken: set[int], signo: int | None) -> int:
    """The pod's kvmpod process back from kvmpod-relay (kvmpod/pod/resume.py): the runner rebuilt,
    and the rest of its life as if it had never left."""
    with SharedLocks.adopt(list(state.claim_fds)):  # still the pod's claims on its images
        runner = None
        try:
            runner = await restore_runner(state, unread, broken)
            return await runner.run(resumed_by=signo or 0)
        except KvmpodError as e:
            raise _failed(state.pod, state.options, e)
        finally:
            if runner is None:  # QEMU is this process's child: it must not outlive a failed comeback
                with contextlib.suppress(ProcessLookupError):
                    os.kill(state.qemu.pid, signal.SIGKILL)
            await _release(state.network, state.pod, state.options, state.timings)


def libvirt_vm(plan: PodPlan, config: VMConfig, timeout: float) -> VMBackend:
    """The pod's VM as a transient libvirt domain (kvmpod/vm/libvirt_vm.py). libvirt runs QEMU as its own
    user, which must reach the pod directory's kernel copy, console log and agent socket: the pods
    directory and the pod's become searchable (0711, not listable; docs/libvirt.md)."""
    from kvmpod.vm.domain_xml import DomainSpec, domain_name
    from kvmpod.vm.libvirt_vm import LibvirtVM

    pod = plan.pod
    for directory in (pod.path.parent, pod.path):
        os.chmod(directory, os.stat(directory).st_mode & 0o777 | 0o711)
    memory_limit = plan.limits is not None and can_raise_rlimits()
    if plan.limits is not None and not memory_limit:
        notice("libvirt domain without a memory limit: libvirt raises its QEMU's locked-memory rlimit to the "
               "limit, which needs CAP_SYS_RESOURCE, and this host's root lacks it (docs/libvirt.md)")
    spec = DomainSpec(domain_name(pod.uuid), pod.uuid, pod.path, pod.file("agent.sock"), qemu_binary(), plan.limits,
                      memory_limit)
    pod.update(backend="libvirt", libvirt_uri=plan.backend.uri, domain=spec.name)   # for gc, before it exists
    return LibvirtVM(config, spec, plan.backend.uri, connect_timeout=timeout)


def can_raise_rlimits() -> bool:
    """CAP_SYS_RESOURCE (capability 24) in this process's effective set: on a host whose root lacks it, so
    does the libvirtd it starts."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> 24 & 1)
    except (OSError, ValueError):
        pass
    return False


def relay_for(options: RunOptions, virtiofs: bool, agent_transport: str) -> Path | None:
    """kvmpod-relay for this pod, or None (kvmpod/pod/relay.py says which pods stay in Python)."""
    if why := relay_unfit(options, virtiofs, agent_transport):
        log.debug("idle relay: not for this pod: %s", why)
        return None
    return find_relay()


def _failed(pod: PodDir, options: RunOptions, error: KvmpodError) -> KvmpodError:
    """The error a failed pod ends with, recorded in state.json."""
    with contextlib.suppress(OSError):
        pod.update(error=str(error))
    if options.keep:
        return KvmpodError(f"{error} (pod directory kept: {pod.path})")
    return error


async def _release(network: PodNetwork | None, pod: PodDir, options: RunOptions, timings: dict[str, float]) -> None:
    """The pod is over: its cgroup goes (QEMU and virtiofsd are gone: it is empty), its network, and its
    directory unless it is to stay."""
    if (cgroup := Cgroup.from_record(pod.state.get("cgroup"))) is not None:  # state.json's: after the relay too
        cgroup.remove()
    released = (await asyncio.to_thread(release_network, network, pod) if needs_netlink(options.network)
                else release_network(network, pod))
    # a detached pod's directory outlives it (status, logs) once its UUID was given out; one whose
    # network could not be released stays for `kvmpod gc` to try again
    if released and not (options.keep or (options.detach and "apps_started" in timings)):
        pod.remove()


def use_snapshot(config: VMConfig, timeout: float) -> tuple[SnapshotClaim | None, asyncio.Task | None]:
    """A claim on the boot snapshot for `config` if it exists; if not, the pod boots cold and the second
    value is a task making the snapshot alongside it (docs/snapshot.md, "The first pod"), which the pod's
    process finishes before it exits."""
    if why := snapshot_unfit(config):
        log.debug("boot: cold, %s", why)
        return None, None
    try:
        use = find_snapshot(config, qemu_binary())
    except OSError as e:
        notice(f"booting cold: boot snapshots: {e}")
        return None, None
    if use is not None:
        return SnapshotClaim(use.snapshot, use, config.cmdline), None
    log.debug("boot: cold, the boot snapshot is made alongside")
    return None, asyncio.get_running_loop().create_task(make_alongside(config, timeout))


async def make_alongside(config: VMConfig, timeout: float) -> None:
    """The first pod's boot snapshot, made while that pod boots cold; a failure is a notice (the next pod
    tries again)."""
    try:
        took = await make_missing(config, qemu_binary(), timeout=timeout)
    except (KvmpodError, OSError) as e:
        notice(f"no boot snapshot made: {e}")
        return
    if took is None:
        log.debug("boot snapshot: another process is making it")
    elif took:
        log.debug("boot snapshot made in %.2f s, alongside the pod", took)


async def _finish_maker(maker: asyncio.Task, failed: bool) -> None:
    """Before the pod's process exits: the snapshot being made is finished (its VM would die with this
    process), or given up when the pod failed or was interrupted."""
    if failed and not maker.done():
        maker.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await maker


def release_network(network: PodNetwork | None, pod: PodDir) -> bool:
    """The pod's taps, leases, port forwards and CNI namespaces, once the VM is gone. A failure is
    reported (it must not hide the apps' exit status) and leaves net.json for `kvmpod gc`."""
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




async def restore_runner(state: RelayState, unread: bytes, broken: set[int]) -> PodRunner:
    """The runner of the pod this process held before it exec'd kvmpod-relay, with its VM, agent
    session, apps' processes and control socket adopted."""
    vm = await QemuVM.adopt(state.qemu, socket.socket(fileno=state.qemu.qmp_fd),
                            cgroup=Cgroup.from_record(state.pod.state.get("cgroup")))
    runner = PodRunner(state.pod, vm, state.apps, state.options, state.timings, volumes=state.volumes,
                       network=state.network, hostname=state.hostname, claim_fds=state.claim_fds)
    runner.handovers = state.handovers
    runner.relay = find_relay()
    runner.broken_output = state.broken | broken
    session = await AgentSession.adopt(socket.socket(fileno=state.agent_fd), unread, state.hello,
                                       state.next_stream, state.finished, runner.agent_log)
    runner.session = session
    sinks: dict[int, FdSink] = {}
    for app, proc in zip(state.apps, state.processes):
        out, err = (sinks.setdefault(fd, LogSink(fd) if proc.log else FdSink(fd, runner.pump))
                    for fd in (proc.stdout_fd, proc.stderr_fd))
        for sink in (out, err):
            sink.broken = sink.fd in runner.broken_output
        runner.sinks[app.name] = (out, err)
        runner.processes.append(session.adopt_process(proc.stream, proc.pid, out, err, proc.status))
    runner.log_sinks = [s for s in sinks.values() if isinstance(s, LogSink)]
    session.dispatch()
    runner.control = ControlServer(state.pod.file("control.sock"), runner)
    await runner.control.start(socket.socket(fileno=state.control_fd))
    return runner
