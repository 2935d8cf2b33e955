"""`kvmpod doctor`: what this host offers and what kvmpod will therefore do, one check per line with
the reason (docs/ci.md). Nothing boots: every answer comes from the very functions `kvmpod run`
decides with (the accelerator, the agent transport, the QEMU binary, the guest kernel, the volume
transport, the network default, the cgroup placement), so doctor cannot disagree with run.

A check is "ok", "note" (pods run, differently or slower: TCG, no vhost-vsock...) or "fail" (pods
cannot run: no QEMU, no guest kernel or agent, a store or runtime directory kvmpod cannot write).
`root`: another tree's /dev, /proc and /sys (tests' fixture hosts); the directories, QEMU and kernels
come from the environment (KVMPOD_* variables) as for every command.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

from kvmpod import paths
from kvmpod.boot.initrd import find_agent
from kvmpod.boot.kernel import GuestKernel, cached_kernels, find_kernel
from kvmpod.errors import KvmpodError
from kvmpod.net.attach import VHOST_NET, vhost_net_usable
from kvmpod.net.cni import find_plugin, network_names, plugin_path
from kvmpod.net.nft import nft_binary
from kvmpod.net.spec import default_mode
from kvmpod.net.tap import TUN, open_tun
from kvmpod.pod.volumes import host_transport
from kvmpod.vm import cgroup
from kvmpod.vm.accel import HostFacts, choose_accelerator, kvm_description, kvm_kind, nested_for_guests
from kvmpod.vm.backend_choice import choose_backend, libvirt_installed
from kvmpod.vm.libvirt_vm import libvirt_version
from kvmpod.vm.qemu_binary import find_qemu
from kvmpod.vm.transport import VHOST_VSOCK_DEV, choose_transport, vhost_vsock_unusable
from kvmpod.vm.virtiofs import find_virtiofsd

OK, NOTE, FAIL = "ok", "note", "fail"
MIB = 1 << 20
FREE_FAIL_MIB = 256     # less free space than this where pods or images go: a pod's disks cannot be made
FREE_NOTE_MIB = 2048    # less than this: a few images and pods fit, not many


@dataclass(frozen=True)
class Check:
    name: str
    status: str     # OK, NOTE or FAIL
    value: str      # what kvmpod will use (short, for scripts)
    reason: str     # why

    def line(self) -> str:
        return f"{self.status:<4}  {self.name + ':':<17} {self.value}: {self.reason}"


def _at(root: Path, path: Path) -> Path:
    return root / path.relative_to("/")


def accelerator(root: Path) -> list[Check]:
    facts = HostFacts.probe(root)
    accel = choose_accelerator("auto", facts)
    kind = kvm_kind(facts)
    checks = [Check("kvm", OK if kind in ("real", "nested") else NOTE, kind, kvm_description(facts)),
              Check("accelerator", OK if accel.name == "kvm" else NOTE, accel.name,
                    accel.reason if accel.name == "kvm" else f"TCG software emulation (slow): {accel.reason}")]
    if nested := nested_for_guests(facts):
        checks.append(Check("nested guests", OK, "on" if facts.nested else "off", nested))
    return checks


def qemu() -> Check:
    try:
        choice = find_qemu()
    except KvmpodError as e:
        return Check("qemu", FAIL, "none", str(e))
    if choice.notice:
        return Check("qemu", NOTE, str(choice.path), choice.notice)
    why = {"kvmpod's build": "kvmpod's build for the installed Debian QEMU (`kvmpod setup`): faster start, "
                             "less memory per pod",
           "PATH": "Debian's qemu-system-x86_64 (no kvmpod build: `kvmpod setup --only qemu` makes one)"}
    return Check("qemu", OK, str(choice.path), why.get(choice.source, f"from {choice.source}"))


def kernel() -> tuple[Check, GuestKernel | None]:
    try:
        chosen = find_kernel()
    except KvmpodError as e:
        return Check("guest kernel", FAIL, "none", str(e)), None
    others = [k for k in cached_kernels() if k.image != chosen.image]
    why = {"minimal": "kvmpod's minimal kernel (boots 3-5x faster than a distro kernel under TCG)",
           "distro": "the Debian cloud kernel (`kvmpod setup` builds the faster minimal one)",
           "custom": "a kernel named by --kernel, $KVMPOD_KERNEL or the config"}[chosen.kind]
    more = f"; also cached: {', '.join(f'{k.kind} {k.version}' for k in others)}" if others else ""
    return Check("guest kernel", OK, str(chosen.image), f"{why}, {chosen.version or 'version unknown'}{more}"), chosen


def agent() -> Check:
    try:
        return Check("guest agent", OK, str(find_agent()), "kvmpod-agent, packed into each pod's initrd")
    except KvmpodError as e:
        return Check("guest agent", FAIL, "none", str(e))


def agent_transport(root: Path, guest_kernel: GuestKernel | None) -> list[Check]:
    device = _at(root, VHOST_VSOCK_DEV)
    why_not = vhost_vsock_unusable(device)
    checks = [Check("vhost-vsock", OK if why_not is None else NOTE, "yes" if why_not is None else "no",
                    f"{device} is usable" if why_not is None else why_not)]
    if guest_kernel is not None:
        cold = choose_transport("auto", guest_kernel, snapshot=False, device=device)
        checks.append(Check("agent transport", OK if cold.kind != "serial" else NOTE, cold.kind,
                            f"{cold.reason} (a pod booted from a boot snapshot uses virtio-serial)"))
    return checks


def privileges() -> Check:
    if os.geteuid() == 0:
        return Check("user", OK, "root", "every network (none, user, default bridge, CNI) and host volume "
                                         "(virtio-fs, file owners kept or mapped with owner=) is possible")
    return Check("user", NOTE, f"uid {os.geteuid()}", "not root: --net none or user (no bridge, no CNI); host volumes "
                                                      "over virtio-9p, every file the guest writes is yours")


def volumes() -> Check:
    try:
        virtiofsd: Path | None = find_virtiofsd()
    except KvmpodError:
        virtiofsd = None
    transport, why = host_transport(virtiofsd is not None, os.geteuid() == 0)
    reason = why or f"{virtiofsd}, one per host volume"
    return Check("host volumes", OK if transport == "virtiofs" else NOTE, transport, reason)


def network(root: Path) -> list[Check]:
    checks = []
    try:
        os.close(open_tun(_at(root, TUN)))
        checks.append(Check("tun", OK, "yes", f"{_at(root, TUN)} opens: taps for the bridge and CNI networks"))
    except KvmpodError as e:
        checks.append(Check("tun", NOTE, "no", str(e)))
    usable = vhost_net_usable(_at(root, VHOST_NET))
    checks.append(Check("vhost-net", OK if usable else NOTE, "yes" if usable else "no",
                        "tap NICs use in-kernel virtio-net" if usable else
                        f"{_at(root, VHOST_NET)} is missing or closed to this user: QEMU moves the packets "
                        "of tap NICs itself (slower)"))
    nft = Path(nft_binary())
    has_nft = os.access(nft, os.X_OK)
    checks.append(Check("nftables", OK if has_nft else NOTE, str(nft) if has_nft else "no",
                        "NAT and --port forwards of the default network" if has_nft else
                        "nft not found (apt-get install nftables): --net default cannot be used"))
    try:
        mode = default_mode()
    except KvmpodError as e:
        mode = f"unknown ({e})"
    bridge_ok = os.geteuid() == 0 and has_nft and checks[0].status == OK
    checks.append(Check("network", OK, mode, "the default --net here; the bridge network (kvmpod0 with NAT, a tap "
                        f"per pod) is {'possible' if bridge_ok else 'not possible (it needs root, tun and nft)'}"
                        "; --net user and none always are"))
    checks.append(cni())
    return checks


def cni() -> Check:
    """CNI networks (docs/cni.md): their plugins make the veth pairs and bridges, kvmpod a tap in the netns."""
    try:
        names = network_names()
        search = plugin_path()
        plugins = [kind for kind in ("bridge", "ptp", "host-local") if _has_plugin(kind, search)]
    except KvmpodError as e:
        return Check("cni", NOTE, "unusable", str(e))
    where = ", ".join(str(d) for d in search)
    configured = f"networks {', '.join(names)}" if names else "no network configured"
    if not plugins:
        return Check("cni", NOTE, "no plugins", f"no bridge/ptp/host-local plugin in {where} "
                     "(apt-get install containernetworking-plugins); " + configured)
    return Check("cni", OK, ",".join(plugins), f"plugins in {where} (they make the veth pairs); {configured}")


def _has_plugin(kind: str, search: list[Path]) -> bool:
    try:
        find_plugin(kind, search)
    except KvmpodError:
        return False
    return True


def cgroups(root: Path) -> Check:
    layout = cgroup.host_layout(root)
    if off := cgroup.switched_off():
        return Check("cgroups", NOTE, layout.kind, f"off: {off}")
    where, missing = cgroup.placement(layout)
    used = "; ".join(f"{', '.join(cs)} in {'v2' if h.version == 2 else 'v1'} {base}" for h, (base, cs) in where.items())
    lacking = "; ".join(f"{c}: {why}" for c, why in sorted(missing.items()))
    if not where:
        return Check("cgroups", NOTE, layout.kind,
                     f"no cgroup for the VMs ({lacking}): QEMU runs without memory, task and CPU limits")
    reason = f"each pod's QEMU and virtiofsd in a cgroup of its own: {used}"
    return Check("cgroups", NOTE if missing else OK, layout.kind, reason + (f"; without {lacking}" if missing else ""))


def user_namespaces(root: Path) -> Check:
    try:
        limit = int((root / "proc/sys/user/max_user_namespaces").read_text())
    except (OSError, ValueError):
        limit = 0
    return Check("user namespaces", OK if limit else NOTE, "yes" if limit else "no",
                 f"max_user_namespaces={limit}; kvmpod's pods do not need them (their isolation is the VM), "
                 "rootless podman and buildah (for building images) do")


def backends() -> list[Check]:
    """The VM backend pods get by default ([vm] backend), and whether the libvirt one could run them: the
    same choice `kvmpod run` makes, then a read-only connection to the daemon at its URI."""
    try:
        choice = choose_backend(None, None)
    except KvmpodError as e:   # [vm] backend = libvirt without libvirt-python, or a bad [vm] setting
        return [Check("backend", FAIL, "libvirt", str(e))]
    checks = [Check("backend", OK, choice.name, "[vm] backend in kvmpod.toml" if choice.name == "libvirt"
                    else "the default: kvmpod runs QEMU itself (--backend libvirt for a libvirt domain)")]
    if not libvirt_installed():
        checks.append(Check("libvirt", NOTE, "no", "libvirt-python is not installed: no --backend libvirt "
                                                   "(pip install 'kvmpod[libvirt]'; docs/libvirt.md)"))
        return checks
    uri = choice.uri or choose_backend("libvirt", None).uri
    if uri.startswith("qemu:///session"):   # connecting would start a session daemon: not doctor's to do
        checks.append(Check("libvirt", OK, uri, "libvirt-python installed; the session daemon starts when a "
                                                "pod asks for it"))
        return checks
    try:
        version = libvirt_version(uri)
    except KvmpodError as e:
        checks.append(Check("libvirt", FAIL if choice.name == "libvirt" else NOTE, uri,
                            f"{e}: --backend libvirt cannot run pods until a daemon answers there"))
        return checks
    checks.append(Check("libvirt", OK, uri, f"libvirt {version} answers: --backend libvirt can run pods"))
    return checks


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def directory(name: str, path: Path) -> Check:
    """A directory kvmpod makes (with its parents) and writes: writable, and free space there."""
    there = _existing(path)
    if not os.access(there, os.W_OK | os.X_OK):
        return Check(name, FAIL, str(path), f"{there} is not writable by this user")
    st = os.statvfs(there)
    free = st.f_bavail * st.f_frsize // MIB
    status = FAIL if free < FREE_FAIL_MIB else NOTE if free < FREE_NOTE_MIB else OK
    return Check(name, status, str(path), f"writable, {free} MiB free" + ("" if path.exists() else " (made when needed)"))


def examine(root: Path = Path("/")) -> list[Check]:
    """Every check, in the order the lines are printed."""
    guest_kernel_check, guest_kernel = kernel()
    return [*accelerator(root), qemu(), guest_kernel_check, agent(), *agent_transport(root, guest_kernel),
            *backends(), privileges(), volumes(), *network(root), cgroups(root), user_namespaces(root),
            directory("store", paths.store_dir()), directory("runtime", paths.runtime_dir()),
            directory("cache", paths.cache_dir())]


def verdict(checks: list[Check]) -> str:
    """The last line: can pods run, and how (accelerator, agent transport)."""
    found = {c.name: c.value for c in checks}
    if not can_run(checks):
        return f"pods cannot run here: {', '.join(c.name for c in checks if c.status == FAIL)}"
    how = [f"{name} {found[name]}" for name in ("accelerator", "agent transport", "network") if name in found]
    return f"pods can run here: {', '.join(how)}"


def can_run(checks: list[Check]) -> bool:
    return all(c.status != FAIL for c in checks)


def report(checks: list[Check]) -> dict[str, object]:
    """`kvmpod doctor --json`."""
    return {"can_run_pods": can_run(checks), "blocking": [c.name for c in checks if c.status == FAIL],
            "checks": [asdict(c) for c in checks]}
