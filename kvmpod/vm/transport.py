"""Which byte stream carries the agent protocol: vsock (kernel or kvmpod's own backend) or virtio-serial.

`--agent-transport`:
  auto         virtio-serial for a pod that starts from a boot snapshot (kvmpod/boot/snapshot.py);
               otherwise vsock if the guest kernel has it: kernel vhost-vsock when /dev/vhost-vsock is usable,
               else kvmpod's userspace vhost-user-vsock backend (kvmpod/vsock/); virtio-serial, with a
               notice, only when the guest kernel has no virtio-vsock
  vsock        the same choice between the two vsock back-ends, but never virtio-serial
  vhost-vsock  kernel vhost-vsock, or an error saying why it cannot be used
  vsock-user   kvmpod's userspace backend even where /dev/vhost-vsock exists
  serial       the virtio-serial port (docs/agent-protocol.md)
The framing is the same on every transport; docs/vsock.md.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path

from kvmpod.boot.kernel import GuestKernel
from kvmpod.errors import VMError

CHOICES = ("auto", "vsock", "vhost-vsock", "vsock-user", "serial")
VHOST_VSOCK_DEV = Path("/dev/vhost-vsock")
SERIAL, VHOST_VSOCK, VSOCK_USER = "serial", "vhost-vsock", "vsock-user"


@dataclass(frozen=True)
class AgentTransport:
    kind: str            # SERIAL | VHOST_VSOCK | VSOCK_USER
    reason: str          # why, for --debug
    notice: str = ""     # for the user, when auto had to fall back

    @property
    def vsock(self) -> bool:
        return self.kind != SERIAL

    def kernel_arg(self) -> str:
        """What tells the agent where to find the host (main.c reads it)."""
        if not self.vsock:
            return "kvmpod.transport=serial"
        from kvmpod.agent.protocol import VSOCK_PORT  # not before QEMU is spawned: the serial path skips it

        return f"kvmpod.transport=vsock:{VSOCK_PORT}"


def vhost_vsock_unusable(device: Path = VHOST_VSOCK_DEV) -> str | None:
    """Why kernel vhost-vsock cannot be used here, or None if it can."""
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return f"{device} does not exist: the host kernel has no vhost_vsock"
    except PermissionError:
        return f"{device}: permission denied (root, or a group that may open it, is needed)"
    except OSError as e:
        if e.errno == errno.ENODEV:
            return f"{device}: no such device: the vhost_vsock module is not loaded"
        return f"{device}: {e.strerror}"
    os.close(fd)
    return None


def kernel_vsock_missing(kernel: GuestKernel) -> str | None:
    """Why the guest kernel cannot do virtio-vsock, or None if it can (built in or as a module)."""
    if kernel.option("VIRTIO_VSOCKETS") in ("y", "m"):
        return None
    return f"the guest kernel {kernel.image.name} has no virtio-vsock (CONFIG_VIRTIO_VSOCKETS)"


def choose_transport(requested: str, kernel: GuestKernel, snapshot: bool = False,
                     device: Path = VHOST_VSOCK_DEV) -> AgentTransport:
    """`snapshot`: the pod may start from a boot snapshot, which only the serial port survives; auto
    then takes it (a pod that needs vsock asks for it, and boots cold). `device`: /dev/vhost-vsock
    (another path only for `kvmpod doctor`'s fixture hosts)."""
    if requested not in CHOICES:
        raise VMError(f"unknown agent transport {requested!r} (choose from {', '.join(CHOICES)})")
    if requested == SERIAL:
        return AgentTransport(SERIAL, "asked for")
    if requested == "auto" and snapshot:
        return AgentTransport(SERIAL, "a boot snapshot (only the serial port can be saved)")
    if missing := kernel_vsock_missing(kernel):
        if requested == "auto":
            return AgentTransport(SERIAL, missing, f"{missing}: the agent uses virtio-serial")
        raise VMError(f"--agent-transport {requested}: {missing}")
    if requested == VSOCK_USER:
        return AgentTransport(VSOCK_USER, "asked for")
    why_not = vhost_vsock_unusable(device)
    if why_not is None:
        return AgentTransport(VHOST_VSOCK, f"{device} is usable")
    if requested == VHOST_VSOCK:
        raise VMError(f"--agent-transport vhost-vsock: {why_not}")
    return AgentTransport(VSOCK_USER, f"{why_not}: kvmpod's userspace vsock backend")


def libvirt_transport(requested: str, kernel: GuestKernel, device: Path = VHOST_VSOCK_DEV) -> AgentTransport:
    """The agent's transport in a libvirt domain: its `<vsock>` is the kernel's vhost-vsock (libvirt has no
    vhost-user-vsock, so no kvmpod userspace backend there), else the virtio-serial port. auto takes
    vhost-vsock where it is usable; vsock and vhost-vsock insist on it."""
    if requested == VSOCK_USER:
        raise VMError("--agent-transport vsock-user: a libvirt domain has no vhost-user-vsock device "
                      "(use vhost-vsock, serial or auto)")
    if requested in ("vsock", VHOST_VSOCK):
        if (missing := kernel_vsock_missing(kernel)) or (missing := vhost_vsock_unusable(device)):
            raise VMError(f"--agent-transport {requested}: a libvirt domain's vsock is the kernel's "
                          f"vhost-vsock: {missing}")
        return AgentTransport(VHOST_VSOCK, f"{device} is usable")
    chosen = choose_transport(requested, kernel, device=device)
    if chosen.kind == VSOCK_USER:   # auto without vhost-vsock: what the QEMU backend would serve itself
        return AgentTransport(SERIAL, f"{chosen.reason}; a libvirt domain then uses virtio-serial")
    return chosen
