"""A VM described as data, and the one place that turns it into a QEMU command line.

No other module pastes QEMU option strings: backends take a VMConfig. Every value that is not
kvmpod's own constant (paths, names, tags, serials) goes through `opt_value`: QEMU's option syntax
(QemuOpts and keyval alike) splits at commas and writes a literal one as `,,`, so a path such as
`/srv/a,b` must not become `/srv/a` plus an option `b`. Values of options that are not option lists
(-kernel, -initrd, -append, -bios) are passed as they are.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

AGENT_PORT_NAME = "org.kvmpod.agent"
# TCG's translation cache, MiB (-accel tcg,tb-size=): QEMU's default reserves 1 GiB and fills it before it
# flushes, so a busy guest would grow QEMU by up to that; bounded, it bounds QEMU's memory beyond guest
# RAM (the pod's cgroup limit counts it: kvmpod/vm/cgroup.py). Boot fills ~30 MiB (docs/kernel.md).
TCG_CACHE_MIB = 64


def max_vcpus(cpus: int, accel: str) -> int:
    """How many vCPUs the machine is declared able to hold, for `cpus` running: under TCG two at least.
    QEMU 7.2 translates a guest's memory barriers and locked instructions faithfully only when it could run
    two vCPUs at once (CF_PARALLEL, max_cpus > 1); with one, a barrier becomes nothing and `lock add`
    plain loads and stores. A virtio driver's "re-enable interrupts, full barrier, look at the used
    index" then lets its load pass its store while a device in another thread (QEMU's I/O threads,
    a vhost-user back-end such as kvmpod's vsock or virtiofsd) does the mirror-image check, and both
    miss: the guest waits for an interrupt that never comes (docs/reliability.md). QEMU 8.1 stopped
    eliding tcg_gen_mb in system mode for this reason, which still leaves x86's `lock`-prefixed
    barrier non-atomic. The second vCPU is only possible, never started."""
    return max(cpus, 2) if accel == "tcg" else cpus


def smp_value(cpus: int, accel: str) -> str:
    """-smp: `cpus` running, max_vcpus() possible."""
    most = max_vcpus(cpus, accel)
    return f"{cpus},maxcpus={most}" if most != cpus else str(cpus)


def opt_value(value: object) -> str:
    """`value` as one value inside a QEMU option list (`key=value,...`): commas doubled."""
    return str(value).replace(",", ",,")


@dataclass(frozen=True)
class Disk:
    """A read-only image disk; the guest finds it by its virtio-blk serial."""

    path: Path
    serial: str
    format: str = "raw"


@dataclass(frozen=True)
class FsDevice:
    """A virtio-fs share served by a vhost-user daemon (virtiofsd) on `socket`; the guest mounts `tag`."""

    tag: str
    socket: Path


@dataclass(frozen=True)
class NinePShare:
    """A host directory served by QEMU itself over virtio-9p (the fallback without virtiofsd)."""

    tag: str
    path: Path
    read_only: bool = False
    security_model: str = "passthrough"   # root: real owners; otherwise "none" (files are the user's)


@dataclass(frozen=True)
class Nic:
    """A virtio-net device: on a tap kvmpod opened (its fd is passed to QEMU, or its name to libvirt), or on
    QEMU's user-mode network (slirp) with `user_options` such as hostfwd=…"""

    mac: str
    tap_fd: int | None = None
    user_options: tuple[str, ...] = ()
    vhost: bool = False       # vhost-net (only where /dev/vhost-net exists)
    # a persistent tap kvmpod made, opened by name (the libvirt backend: libvirt opens taps itself);
    # the QEMU backend gets tap_fd and never this
    tap_name: str | None = None
    # no backend: a hub port of its own (the VM a boot snapshot is made of; kvmpod/boot/snapshot.py).
    # Its peer has no vnet header, so the device offers the fewest features of all the backends
    placeholder: bool = False


@dataclass(frozen=True)
class Confinement:
    """What QEMU does to itself once it has opened everything (kvmpod/vm/sandbox.py decides it, from
    the QEMU version and kvmpod.toml's [security]; docs/security.md): its seccomp filter, the user it
    switches to and the empty directory it chroots into."""

    seccomp: bool = False
    # deny: set*uid/gid kill QEMU. A QEMU that switches user itself (-runas) calls setgid/setuid after
    # the filter is in place, so it needs allow (once it is that user, with no capabilities and
    # no_new_privs, set*uid can only give up more)
    elevate_privileges: str = "deny"
    user: str | None = None           # the user QEMU becomes (by name), after opening everything
    chroot: Path | None = None        # the empty directory it chroots into, just before
    version: tuple[int, int] = (7, 2)  # QEMU's: how the options are spelled (-runas/-chroot or -run-with)


def confinement_argv(c: Confinement) -> list[str]:
    """QEMU's options for `c`: -sandbox, and the user and chroot spelled for its version (-runas and
    -chroot up to 8.2; 9.0's -run-with chroot=; 9.1's -run-with user=, where -runas is deprecated, and
    10.0, where -runas and -chroot are gone)."""
    argv: list[str] = []
    if c.seccomp:
        argv += ["-sandbox", f"on,obsolete=deny,elevateprivileges={c.elevate_privileges},spawn=deny,"
                             "resourcecontrol=deny"]
    run_with: list[str] = []
    if c.chroot is not None:
        if c.version >= (9, 0):
            run_with.append(f"chroot={opt_value(c.chroot)}")
        else:
            argv += ["-chroot", str(c.chroot)]
    if c.user is not None:
        if c.version >= (9, 1):
            run_with.append(f"user={opt_value(c.user)}")
        else:
            argv += ["-runas", c.user]
    if run_with:
        argv += ["-run-with", ",".join(run_with)]
    return argv


@dataclass(frozen=True)
class VMConfig:
    name: str
    kernel: Path
    initrd: Path
    cmdline: str
    console_log: Path
    # QEMU's ends of socketpairs kvmpod made (QemuVM.spawn): no path, no listener, nothing to race or
    # clean up, and QEMU can be spawned before kvmpod has an event loop.
    qmp_fd: int | None = None         # the QMP monitor
    agent_fd: int | None = None       # the agent's virtio-serial port (transport "serial")
    restore_monitor_fd: int | None = None  # a second QMP monitor that only loads a boot snapshot
    agent_transport: str = "serial"   # "serial" | "vhost-vsock" | "vsock-user" (kvmpod/vm/transport.py)
    vsock_cid: int = 0                # the guest's CID (vsock transports; kvmpod/vm/cid.py allocates it)
    vhost_user_vsock: Path | None = None  # "vsock-user": kvmpod's vhost-user backend listens, QEMU connects
    machine: str = "pc"       # "pc" | "q35" | "microvm"
    machine_options: tuple[str, ...] = ()
    accel: str = "tcg"
    memory_mib: int = 256
    cpus: int = 1
    disks: list[Disk] = field(default_factory=list)
    firmware: Path | None = None  # e.g. qboot.rom; None = QEMU's default
    filesystems: list[FsDevice] = field(default_factory=list)  # virtio-fs (host volumes)
    shares_9p: list[NinePShare] = field(default_factory=list)  # virtio-9p (host volumes, fallback)
    nics: list[Nic] = field(default_factory=list)              # virtio-net (kvmpod/net/)
    # Boot snapshots (kvmpod/boot/snapshot.py): guest RAM in this file, written through when
    # memory_file_shared (the VM a snapshot is made of), else mapped private (a VM restored from it).
    memory_file: Path | None = None
    memory_file_shared: bool = False
    incoming: bool = False    # wait for a snapshot's device state (-incoming defer; the restore monitor loads it)
    confinement: Confinement = Confinement()  # QEMU's seccomp filter, user and chroot (docs/security.md)

    @property
    def virtio_suffix(self) -> str:
        # microvm has no PCI bus: its virtio devices sit on virtio-mmio transports.
        return "device" if self.machine == "microvm" else "pci"


def qemu_argv(cfg: VMConfig, binary: str = "qemu-system-x86_64") -> list[str]:
    v = cfg.virtio_suffix
    machine_options = cfg.machine_options
    shared_memory = bool(cfg.filesystems or cfg.vhost_user_vsock)
    if shared_memory and cfg.memory_file:
        raise ValueError("vhost-user devices cannot be saved in a boot snapshot")
    if shared_memory or cfg.memory_file:  # vhost-user needs guest RAM the back-end can map: shared memfd
        machine_options = (*machine_options, "memory-backend=mem")
    argv = [
        binary,
        "-name", f"guest={opt_value(cfg.name)},debug-threads=on",  # guest= spelled out: a name may hold "="
        "-machine", ",".join((cfg.machine, *machine_options)),
        "-accel", f"tcg,tb-size={TCG_CACHE_MIB}" if cfg.accel == "tcg" else cfg.accel,
        "-m", f"{cfg.memory_mib}M",
        "-smp", smp_value(cfg.cpus, cfg.accel),
        "-nodefaults", "-no-user-config", "-nographic",
        "-no-reboot",                       # a guest reset (panic=-1, reboot=t) ends QEMU
        "-action", "panic=exit-failure",    # with pvpanic: the panic is reported, then QEMU exits
        "-kernel", str(cfg.kernel),
        "-initrd", str(cfg.initrd),
        "-append", cfg.cmdline,
        # -nodefaults drops the serial port: add it back, logged to a file.
        "-chardev", f"file,id=console,path={opt_value(cfg.console_log)}",
        "-serial", "chardev:console",
        "-device", "pvpanic-pci" if v == "pci" else "pvpanic",
        *confinement_argv(cfg.confinement),
    ]
    if cfg.qmp_fd is not None:
        argv += ["-chardev", f"socket,id=qmp,fd={cfg.qmp_fd}", "-mon", "chardev=qmp,mode=control"]
    if cfg.restore_monitor_fd is not None:
        argv += ["-chardev", f"socket,id=restore,fd={cfg.restore_monitor_fd}", "-mon", "chardev=restore,mode=control"]
    if cfg.agent_transport == "vsock-user":
        argv += ["-chardev", f"socket,id=vsock,path={opt_value(cfg.vhost_user_vsock)}",
                 "-device", f"vhost-user-vsock-{v},chardev=vsock"]
    elif cfg.agent_transport == "vhost-vsock":
        argv += ["-device", f"vhost-vsock-{v},guest-cid={cfg.vsock_cid}"]
    elif cfg.agent_fd is not None:
        argv += [
            "-device", f"virtio-serial-{v},id=vser0",
            "-chardev", f"socket,id=agent,fd={cfg.agent_fd}",
            "-device", f"virtserialport,bus=vser0.0,chardev=agent,name={AGENT_PORT_NAME}",
        ]
    if cfg.firmware:
        argv += ["-bios", str(cfg.firmware)]
    for i, disk in enumerate(cfg.disks):
        argv += [
            "-drive", f"file={opt_value(disk.path)},if=none,id=disk{i},format={disk.format},readonly=on",
            "-device", f"virtio-blk-{v},drive=disk{i},serial={opt_value(disk.serial)}",
        ]
    if shared_memory:
        argv += ["-object", f"memory-backend-memfd,id=mem,size={cfg.memory_mib}M,share=on"]
        if v == "device":  # microvm's virtio-mmio is legacy by default; libvhost-user (virtiofsd) refuses legacy
            argv += ["-global", "virtio-mmio.force-legacy=false"]
    if cfg.memory_file:
        shared = "on" if cfg.memory_file_shared else "off"
        argv += ["-object", f"memory-backend-file,id=mem,size={cfg.memory_mib}M,mem-path={opt_value(cfg.memory_file)},"
                            f"share={shared}"]
    if cfg.incoming:
        argv += ["-incoming", "defer"]
    for i, fs in enumerate(cfg.filesystems):
        argv += [
            "-chardev", f"socket,id=fs{i},path={opt_value(fs.socket)}",
            "-device", f"vhost-user-fs-{v},chardev=fs{i},tag={opt_value(fs.tag)}",
        ]
    for i, nic in enumerate(cfg.nics):
        if nic.placeholder:
            netdev = f"hubport,id=net{i},hubid={i}"
        elif nic.tap_fd is not None:
            netdev = f"tap,id=net{i},fd={nic.tap_fd},vhost={'on' if nic.vhost else 'off'}"
        else:
            netdev = ",".join((f"user,id=net{i}", *nic.user_options))
        # romfile= : no PXE option ROM, which only costs boot time (microvm loads none anyway)
        device = f"virtio-net-{v},netdev=net{i},mac={nic.mac}" + (",romfile=" if v == "pci" else "")
        argv += ["-netdev", netdev, "-device", device]
    for i, share in enumerate(cfg.shares_9p):
        ro = ",readonly=on" if share.read_only else ""
        argv += [
            "-fsdev", f"local,id=p9{i},path={opt_value(share.path)},security_model={share.security_model}{ro}",
            "-device", f"virtio-9p-{v},fsdev=p9{i},mount_tag={opt_value(share.tag)}",
        ]
    return argv
