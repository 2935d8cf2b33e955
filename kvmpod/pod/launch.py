"""`kvmpod run`, first half: plan the pod before there is an event loop, and start QEMU as early as it
can be started.

Planning finds (or imports) the images and builds their disks, picks the kernel, initrd, accelerator,
machine and agent transport, sizes the VM, makes the pod directory and describes the VM. A pod that
starts from a boot snapshot which already exists gets its QEMU spawned right there (kvmpod/vm/spawn.py):
QEMU initialises and the guest resumes while this process imports asyncio, qemu.qmp and the agent
session and sets up the rest (the second half, kvmpod/pod/run.py). Nothing here imports those. That
takes a pod whose NICs can be known while planning: `--net none`; `--net user`, whose network is
set up here (slirp needs no tap); `--net default`, whose tap is put on the bridge here (with ioctls once
the bridge exists: kvmpod/net/ifioctl.py). CNI's and a given namespace's taps are the second half's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from kvmpod.boot.initrd import build_initrd, find_agent
from kvmpod.boot.kernel import find_kernel
from kvmpod.boot.snapshot import BootSnapshot, SnapshotUse, boot_setting, find, unfit
from kvmpod.errors import KvmpodError, VMError
from kvmpod.image.manifest import check_runnable
from kvmpod.net.attach import AppPorts, PodNetwork
from kvmpod.net.attach import setup as setup_network
from kvmpod.net.spec import NET_DEFAULT, NET_NONE, NET_USER
from kvmpod.pod import admission
from kvmpod.pod.metadata_secrets import MetadataSecrets
from kvmpod.pod.options import RunOptions, notice
from kvmpod.pod.poddir import PodDir
from kvmpod.pod.resources import VMSize, app_resources, size_vm
from kvmpod.pod.spec import AppOverrides, ResolvedApp, isolator_notices, resolve_app
from kvmpod.pod.volumes import (PodVolumes, Volume, app_mounts, host_owner, host_transport, pod_volumes,
                                unique_volumes)
from kvmpod.store import Store, StoredImage
from kvmpod.store.locks import SharedLocks
from kvmpod.vm import cgroup, sandbox
from kvmpod.vm.accel import choose_accelerator
from kvmpod.vm.backend_choice import BackendChoice, choose_backend
from kvmpod.vm.cgroup import Cgroup, CgroupLimits
from kvmpod.vm.config import Confinement, Disk, FsDevice, NinePShare, VMConfig
from kvmpod.vm.machine import plan_boot
from kvmpod.vm.qemu_binary import find_qemu
from kvmpod.vm.spawn import SpawnedQemu, check_socket_path, qemu_binary, spawn_qemu
from kvmpod.vm.transport import choose_transport, libvirt_transport
from kvmpod.vm.virtiofs import FsShare, find_virtiofsd

log = logging.getLogger(__name__)


def prepare_apps(store: Store, apps: list[AppOverrides], pod_env: dict[str, str],
                 claims: SharedLocks, metadata_url: str = "") -> list[ResolvedApp]:
    """Find or import every image, claim it against `image rm`, and build (or reuse) its rootfs disk."""
    serials: dict[str, str] = {}
    resolved: list[ResolvedApp] = []
    for overrides in apps:
        if overrides.rootfs_dir is not None:  # no store image: the directory is the root (virtio-fs)
            serial = f"root{sum(a.root_share for a in resolved)}"
            resolved.append(resolve_app(directory_image(overrides), overrides, pod_env, overrides.rootfs_dir,
                                        serial, metadata_url, root_share=True))
            continue
        image = store.resolve(overrides.image)
        try:
            check_runnable(image.manifest)
        except KvmpodError as e:
            raise KvmpodError(f"{overrides.image}: {e}") from e
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


def directory_image(overrides: AppOverrides) -> StoredImage:
    """What stands for the image of an app rooted in a host directory: its manifest, and its ID where
    one is known (rkt's pod manifest has it), else the sha512 of the manifest (an OCI bundle has none)."""
    root = overrides.rootfs_dir
    assert root is not None and overrides.image_manifest is not None, "a rootfs_dir app needs its manifest"
    if not root.is_dir():
        raise KvmpodError(f"{root}: the app's rootfs is not a directory")
    manifest = overrides.image_manifest
    image_id = overrides.image_id or "sha512-" + hashlib.sha512(
        json.dumps(manifest.raw, sort_keys=True).encode()).hexdigest()
    return StoredImage(id=image_id, blob=root, manifest=manifest)


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


@dataclass
class SnapshotClaim:
    """The snapshot a pod starts from, held until QEMU has started from it."""
    snapshot: BootSnapshot
    use: SnapshotUse
    cmdline: str




@dataclass
class PodPlan:
    """A pod as planned: its directory exists, its VM is described, and QEMU may be running already."""
    pod: PodDir
    apps: list[ResolvedApp]
    volumes: PodVolumes
    config: VMConfig          # with NICs only if `network` is set
    snapshot_cmdline: str       # the command line without per-pod words: a boot snapshot's
    hostname: str
    metadata_secrets: MetadataSecrets
    shares: list[FsShare]     # virtiofsd per host volume
    vsock_front: Path | None
    snapshot_possible: bool     # nothing rules a boot snapshot out before the network is known
    restore: SnapshotClaim | None = None   # the boot snapshot found while planning…
    spawned: SpawnedQemu | None = None    # …and the QEMU already started from it
    cgroup: Cgroup | None = None          # QEMU's and virtiofsd's, with the pod's limits (kvmpod/vm/cgroup.py)
    backend: BackendChoice = BackendChoice("qemu")   # QEMU itself, or a libvirt domain (docs/libvirt.md)
    limits: CgroupLimits | None = None        # a libvirt domain's (its <memtune>, <cputune>)
    # set up while planning when that needs no netlink (--net user), so that a snapshot restore can be
    # spawned here; otherwise (bridge, CNI, a given namespace: taps and pyroute2) by the second half
    network: PodNetwork | None = None
    start_slot: admission.StartSlot | None = None   # held until the apps run (kvmpod/pod/admission.py)

    def release_start_slot(self) -> None:
        if self.start_slot is not None:
            self.start_slot.release()

    def abandon(self) -> None:
        """The pod fails before a runner took the VM: QEMU goes, and so does the snapshot claim. Also
        the pod's end in this process (run.py): the cgroup goes once QEMU and virtiofsd have."""
        if self.spawned is not None:
            self.spawned.kill()
            self.spawned = None
        if self.restore is not None:
            self.restore.use.release()
        if self.cgroup is not None:
            self.cgroup.remove()
            self.cgroup = None
        self.release_start_slot()


def plan_pod(apps: list[AppOverrides], options: RunOptions, claims: SharedLocks,
             timings: dict[str, float]) -> PodPlan:
    backend = choose_backend(options.backend, options.libvirt_uri)   # before anything is made
    metadata_secrets = MetadataSecrets.generate()  # the URL goes into every app's environment
    resolved = prepare_apps(Store(transfer=options.transfer), apps, options.pod_env, claims, metadata_secrets.url)
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
    qemu = find_qemu()
    if qemu.notice:
        notice(qemu.notice)
    log.debug("QEMU: %s (%s)", qemu.path, qemu.source)
    plan = plan_boot(kernel, size.cpus, options.debug, accel.name, options.kernel_args)
    if backend.name == "libvirt" and options.boot == "snapshot":
        raise KvmpodError("--boot snapshot: the libvirt backend boots cold (docs/libvirt.md)")
    if backend.name == "libvirt" and options.network.mode not in ("none", "user", "default"):
        what = ",".join(options.network.cni_networks) if options.network.mode == "cni" else options.network.mode
        raise KvmpodError(f"--net {what}: the libvirt backend takes --net none, user or default (libvirtd opens "
                          "a tap by name in its own network namespace; CNI's and a given namespace's are "
                          "kvmpod's fds in namespaces of their own: docs/libvirt.md)")
    if backend.name == "libvirt" and volumes.host and os.geteuid() != 0:
        raise KvmpodError("--volume: host volumes on the libvirt backend need virtiofsd, and so root")
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
        if transport == "9p" and any(v.owner for v in volumes.host):
            notice("a host volume's owner= applies over virtio-fs (root) only: over virtio-9p the files "
                   "are " + ("the guest's owners'" if os.geteuid() == 0 else "yours"))
        volumes = dataclasses.replace(volumes, transport=transport)
    boot = options.boot or boot_setting()
    # what rules a snapshot out before the VM is even described (kvmpod/boot/snapshot.py unfit()): host
    # volumes over virtio-fs do, over 9p they do not (docs/snapshot.md)
    snapshot_possible = (boot == "snapshot" and (not volumes.host or volumes.transport == "9p")
                         and not any(a.root_share for a in resolved) and backend.name == "qemu")
    if backend.name == "libvirt":
        agent_transport = libvirt_transport(options.agent_transport, kernel)
    else:
        agent_transport = choose_transport(options.agent_transport, kernel, snapshot=snapshot_possible)
    if agent_transport.notice:
        notice(agent_transport.notice)
    disks = list({app.disk_serial: Disk(app.disk, app.disk_serial) for app in resolved if not app.root_share}.values())
    root_shares = [app for app in resolved if app.root_share]
    if root_shares and os.geteuid() != 0:
        raise KvmpodError(f"{root_shares[0].disk}: an app rooted in a host directory needs virtiofsd, "
                          "and virtiofsd needs root")
    if root_shares:
        find_virtiofsd()  # fail before the pod exists, saying why
    if backend.name == "libvirt":   # libvirt confines its QEMU itself (qemu.conf: user, seccomp, namespaces)
        confinement = Confinement()
        log.debug("QEMU confinement: libvirt's (%s; docs/libvirt.md)", backend.uri)
    else:
        confinement, confinement_notices = sandbox.confinement(
            qemu.path, is_root=os.geteuid() == 0, shares_9p=volumes.transport == "9p" and bool(volumes.host))
        for line in confinement_notices:
            notice(line)
        log.debug("QEMU confinement: %s", sandbox.describe(confinement))

    # the images are ready: from here until its apps run, the pod holds one of the user's start slots
    slot = admission.take()
    try:
        pod = PodDir.create(uuid=options.pod_uuid)
    except BaseException:
        slot.release()
        raise
    planned = None
    try:
        hostname = options.hostname or f"kvmpod-{pod.uuid[:8]}"
        shares = []
        if volumes.transport == "virtiofs" and volumes.host:
            shares = [FsShare(volumes.tag(v), Path(v.source or ""), pod.file(f"{volumes.tag(v)}.sock"),
                              v.read_only, owner=host_owner(v)) for v in volumes.host]
        if root_shares:
            # not read_only even for a read-only rootfs (the guest mounts it so): the agent makes the
            # app's mount points in it (/etc/hostname, /etc/hosts, volume targets), so it stays writable
            # on the host, unlike a readOnly volume (docs/security.md)
            shares += [FsShare(a.disk_serial, a.disk, pod.file(f"{a.disk_serial}.sock"), read_only=False)
                       for a in root_shares]
        snapshot_cmdline = f"{plan.cmdline} {agent_transport.kernel_arg()}"
        config = VMConfig(
            name=f"kvmpod-{pod.uuid}", kernel=kernel.image, initrd=initrd,
            cmdline=f"{plan.cmdline} kvmpod.hostname={hostname} {agent_transport.kernel_arg()}",
            console_log=pod.file("console.log"), agent_transport=agent_transport.kind,
            vhost_user_vsock=pod.file("vhost-vsock.sock") if agent_transport.kind == "vsock-user" else None,
            machine=plan.machine,
            machine_options=plan.machine_options, firmware=plan.firmware, accel=accel.name,
            memory_mib=size.memory_mib, cpus=size.cpus, disks=disks, confinement=confinement,
            filesystems=[FsDevice(s.tag, s.socket) for s in shares],
            # in the plan's config, as a snapshot restore spawned now needs them: the devices are the shape's
            shares_9p=[NinePShare(volumes.tag(v), Path(v.source or ""), v.read_only,
                                  "passthrough" if os.geteuid() == 0 else "none")
                       for v in volumes.host if volumes.transport == "9p"])
        vsock_front = pod.file("vsock.sock") if agent_transport.kind == "vsock-user" else None
        # control.sock too: a runtime dir deep enough failed with an internal error once QEMU ran (test_faults)
        for sock in (pod.file("control.sock"), config.vhost_user_vsock, vsock_front, *(s.socket for s in shares)):
            if sock:
                check_socket_path(Path(f"{sock}_4294967295") if sock == vsock_front else sock)
        log.debug("pod %s: kernel %s (%s), machine %s, accel %s (%s)", pod.uuid, kernel.image, kernel.kind,
                  plan.machine_arg, accel.name, accel.reason)
        log.debug("kernel cmdline: %s", plan.cmdline)
        log.debug("agent transport %s (%s)", agent_transport.kind, agent_transport.reason)
        planned = PodPlan(pod, resolved, volumes, config, snapshot_cmdline, hostname, metadata_secrets, shares,
                          vsock_front, snapshot_possible)
        planned.backend = backend
        planned.start_slot = slot
        if backend.name == "qemu":
            planned.cgroup = pod_cgroup(pod, size, len(shares), accel.name)   # before any QEMU is spawned
        elif not cgroup.switched_off():   # libvirt's own cgroup of the domain gets the same limits
            planned.limits = cgroup.limits_for(size.memory_mib, size.cpus, size.cpu_limit, 0, cgroup.memory_override(),
                                               tcg=accel.name == "tcg")
        if snapshot_possible and options.network.mode in (NET_NONE, NET_USER, NET_DEFAULT):
            # a pod on CNI or in a given namespace restores once the second half has made its taps
            if options.network.mode != NET_NONE:
                planned.network = setup_network(options.network, pod.uuid, pod.path, app_ports(resolved), notice)
                planned.config = dataclasses.replace(config, nics=planned.network.nics())
            _spawn_from_snapshot(planned, timings)
        return planned
    except BaseException as e:
        slot.release()
        if planned is not None:
            planned.abandon()
            if planned.network is not None:
                try:
                    planned.network.release()
                except KvmpodError as failure:  # the pod's own error is the one to report
                    log.debug("releasing the network of a pod that failed to start: %s", failure)
        if options.keep and isinstance(e, KvmpodError):
            pod.update(error=str(e))
            raise KvmpodError(f"{e} (pod directory kept: {pod.path})") from e
        pod.remove()
        raise


def app_ports(apps: list[ResolvedApp]) -> list[AppPorts]:
    """Each app's declared ports (its image manifest's), which --port names."""
    return [AppPorts(a.name, a.image.manifest.app.ports if a.image.manifest.app else []) for a in apps]


def pod_cgroup(pod: PodDir, size: VMSize, virtiofsd: int, accel: str) -> Cgroup | None:
    """The pod's cgroup, made with the limits its size gives (kvmpod/vm/cgroup.py) and recorded in
    state.json; None, with a notice, when the host allows none (or `[security] cgroup = false`)."""
    limits = cgroup.limits_for(size.memory_mib, size.cpus, size.cpu_limit, virtiofsd, cgroup.memory_override(),
                               tcg=accel == "tcg")
    made, why = cgroup.for_vm(pod.uuid, limits)
    if why:
        notice(why)
    if made is not None:
        pod.update(cgroup=made.record())
        log.debug("%s", made.describe())
    return made


def _spawn_from_snapshot(plan: PodPlan, timings: dict[str, float]) -> None:
    """If the boot snapshot for the pod's shape exists, claim it and spawn QEMU from it now. Otherwise
    (none yet, or one being made) the second half waits for it or makes it (kvmpod/pod/run.py)."""
    config = dataclasses.replace(plan.config, cmdline=plan.snapshot_cmdline)
    if unfit(config):
        return
    try:
        use = find(config, qemu_binary())
    except (KvmpodError, OSError):
        return  # the second half tries again, and says why if it fails there too
    if use is None:
        return
    plan.restore = SnapshotClaim(use.snapshot, use, plan.snapshot_cmdline)
    log.debug("boot: from snapshot %s, QEMU spawned while planning", use.snapshot.key)
    timings["qemu_spawn"] = time.time()
    plan.spawned = spawn_qemu(use.snapshot.restore_config(config), plan.pod.file("qemu.log"), use.snapshot.state,
                              cgroup=plan.cgroup)
