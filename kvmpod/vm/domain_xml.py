"""The same VMConfig as a libvirt domain (the libvirt backend, kvmpod/vm/libvirt.py; docs/libvirt.md).

qemu_argv (kvmpod/vm/config.py) turns a VMConfig into QEMU's command line; this renders it, through the
jinja2 template templates/domain.xml.j2, into the domain XML libvirt turns into its own command line.
Memory, CPUs, machine, firmware, kernel, initrd, command line, disks, console log, agent port,
virtio-fs shares and NICs all come from the VMConfig; DomainSpec holds only what a domain has and a
QEMU process does not: its name, kvmpod's metadata, the socket libvirt listens on for the agent's
port, the emulator binary and the user QEMU runs as.

What the domain cannot carry is refused here, by name, before anything starts (`unsupported`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kvmpod.vm.cgroup import CPU_PERIOD_US, CgroupLimits
from kvmpod.vm.config import AGENT_PORT_NAME, TCG_CACHE_MIB, VMConfig, max_vcpus, opt_value

# kvmpod's element in <metadata>: `kvmpod gc` finds a pod's domain by it (never by its name alone)
METADATA_NS = "https://kvmpod.dev/xmlns/libvirt/pod/1"
DOMAIN_PREFIX = "kvmpod-"
PCI_TOP_SLOT = 0x1F   # pc's pci.0 has slots 0-31


@dataclass(frozen=True)
class DomainSpec:
    name: str              # kvmpod-<first 8 of the pod UUID>
    pod_uuid: str          # also the domain's UUID
    pod_dir: Path
    agent_socket: Path     # libvirt listens here (the virtio-serial port's unix chardev); kvmpod connects
    emulator: Path         # the QEMU binary libvirt runs
    # the pod's hard limits (kvmpod/vm/cgroup.py limits_for, as the QEMU backend's cgroup has them), for
    # libvirt's own cgroup of the domain: <memtune> hard_limit, <cputune> global quota; None: none
    limits: CgroupLimits | None = None
    # libvirt raises its QEMU's RLIMIT_MEMLOCK to a memory hard_limit, which takes CAP_SYS_RESOURCE
    memory_limit: bool = True

    @property
    def namespace(self) -> str:
        return METADATA_NS


def domain_name(pod_uuid: str) -> str:
    return f"{DOMAIN_PREFIX}{pod_uuid[:8]}"


def unsupported(cfg: VMConfig) -> str | None:
    """Why `cfg` cannot be a libvirt domain (the flag that asks for it), or None."""
    if cfg.agent_transport not in ("serial", "vhost-vsock"):
        return (f"--agent-transport {cfg.agent_transport}: a libvirt domain reaches the agent over virtio-serial "
                "or the kernel's vhost-vsock only")
    if cfg.agent_transport == "vhost-vsock" and cfg.vsock_cid < 3:
        return "vhost-vsock: the domain's guest CID is not allocated"
    if cfg.memory_file or cfg.incoming:
        return "--boot snapshot: the libvirt backend boots cold (docs/libvirt.md)"
    if cfg.shares_9p:
        return "--volume as non-root (virtio-9p): the libvirt backend serves host volumes with virtio-fs only"
    if any(n.tap_fd is not None for n in cfg.nics):
        return ("--net cni/netns: the libvirt backend opens a pod's tap by name (kvmpod's bridge's, made "
                "persistent), and these taps are fds kvmpod holds, in namespaces of their own")
    return None


def qemu_args(cfg: VMConfig) -> list[str]:
    """What the domain XML cannot say, as QEMU options in <qemu:commandline>:
    - microvm's machine options (libvirt 9.0 takes the machine type but none of its properties; QEMU
      merges a second -machine into the first) and, with vhost-user devices, modern virtio-mmio;
    - user-mode NICs (a tap NIC is an <interface>): libvirt 9.0's <interface type='user'> forwards no ports (its <portForward> needs
      the passt backend), and kvmpod's forwards are slirp hostfwd= options."""
    args: list[str] = []
    v = cfg.virtio_suffix
    if cfg.machine == "microvm":
        if cfg.machine_options:
            args += ["-machine", ",".join(cfg.machine_options)]
        if cfg.filesystems:   # libvhost-user (virtiofsd) refuses legacy virtio-mmio, microvm's default
            args += ["-global", "virtio-mmio.force-legacy=false"]
    for i, nic in enumerate(cfg.nics):
        if nic.tap_name is not None:   # an <interface type='ethernet'> in the template
            continue
        # on PCI, a slot from the top of pc's bus: libvirt assigns its own devices from slot 2 up, and QEMU
        # would give this one the first free slot before libvirt's device that has it is created
        where = f",romfile=,bus=pci.0,addr={PCI_TOP_SLOT - i:#x}" if v == "pci" else ""
        args += ["-netdev", ",".join((f"user,id=kvmpodnet{i}", *nic.user_options)),
                 "-device", f"virtio-net-{v},netdev=kvmpodnet{i},mac={opt_value(nic.mac)}{where}"]
    return args


def panic_model(cfg: VMConfig) -> str:
    # libvirt 9.0 knows the ISA pvpanic only (its pvpanic-pci model came later); the QEMU backend uses pvpanic-pci
    return "isa"


def render(cfg: VMConfig, spec: DomainSpec) -> str:
    """The domain XML for `cfg`. Raises ValueError for what a domain cannot carry (see `unsupported`)."""
    import jinja2  # lazy: only libvirt pods render XML
    from markupsafe import Markup

    if why := unsupported(cfg):
        raise ValueError(why)
    env = jinja2.Environment(loader=jinja2.PackageLoader("kvmpod.vm", "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    return env.get_template("domain.xml.j2").render(
        cfg=cfg, spec=spec, shared_memory=bool(cfg.filesystems), tcg_cache_mib=TCG_CACHE_MIB,
        max_vcpus=max_vcpus(cfg.cpus, cfg.accel), cpu_period_us=CPU_PERIOD_US, agent_port=AGENT_PORT_NAME,
        panic_model=panic_model(cfg), qemu_args=qemu_args(cfg),
        tap_nics=[n for n in cfg.nics if n.tap_name is not None],
        # microvm has no PCI bus: libvirt puts virtio devices on virtio-mmio only when told to
        mmio=Markup("\n      <address type='virtio-mmio'/>") if cfg.machine == "microvm" else "")
