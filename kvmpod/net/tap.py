"""Tap devices that cannot leak: kvmpod opens them itself and hands the fd to QEMU.

A tap made with TUNSETIFF and never made persistent exists only while a process holds its fd, so
when QEMU and kvmpod are gone — even after `kill -9` — the kernel removes it. (`ip tuntap add` or
pyroute2's tuntap create *persistent* taps, which outlive a crash; hence these few ioctl lines.)

The libvirt backend is the exception: libvirt opens a tap by name, so a libvirt pod's tap is made
persistent once net.json says so (`persist`), kvmpod's fd is closed, and the pod's release or `kvmpod
gc` removes the tap by name (`remove_persistent`).
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from pathlib import Path

from kvmpod.errors import NetworkError
from kvmpod.net.netns import in_netns

_TUNSETIFF = 0x400454CA
_TUNSETPERSIST = 0x400454CB
_IFF_TAP = 0x0002
_IFF_NO_PI = 0x1000
_IFF_VNET_HDR = 0x4000   # QEMU offloads checksums and segmentation through the virtio-net header
IFNAMSIZ = 16


def open_tap(name: str, netns: Path | None = None) -> int:
    """A new tap `name` (in the network namespace at `netns`, else kvmpod's own); returns its fd.

    In another namespace the tap is made from a thread that enters it (kvmpod/net/netns.py); the fd
    keeps working from anywhere once the tap exists."""
    if len(name.encode()) >= IFNAMSIZ:
        raise NetworkError(f"tap name {name!r} is longer than {IFNAMSIZ - 1} bytes")
    if netns is None:
        return _make_tap(name)
    return in_netns(netns, lambda: _make_tap(name))


TUN = Path("/dev/net/tun")


def open_tun(device: Path = TUN) -> int:
    """An fd of /dev/net/tun, not yet a tap (`kvmpod doctor` opens and closes one)."""
    try:
        return os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        raise NetworkError(f"{device}: {e.strerror} (taps need root or CAP_NET_ADMIN; --net user needs neither)") from e


def _make_tap(name: str) -> int:
    fd = open_tun()
    try:
        fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH22x", name.encode(), _IFF_TAP | _IFF_NO_PI | _IFF_VNET_HDR))
    except OSError as e:
        os.close(fd)
        raise NetworkError(f"create tap {name}: {e.strerror}") from e
    return fd


def persist(fd: int, name: str) -> None:
    """Make the tap of `fd` outlive its fds (until `remove_persistent`)."""
    try:
        fcntl.ioctl(fd, _TUNSETPERSIST, 1)
    except OSError as e:
        raise NetworkError(f"make tap {name} persistent: {e.strerror}") from e


def remove_persistent(name: str) -> None:
    """Remove the persistent tap `name` of this network namespace; nothing to do if it is gone.

    It is attached again (as libvirt does) and told to stop persisting, so it ends with this fd. A tap
    some process still holds (a QEMU that runs) cannot be attached: EBUSY, and it is left alone."""
    fd = open_tun()
    try:
        # attaches to the existing tap (or makes a fresh one, which ends with this fd)
        fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH22x", name.encode(), _IFF_TAP | _IFF_NO_PI | _IFF_VNET_HDR))
    except OSError as e:
        os.close(fd)
        held = " (a process still holds it)" if e.errno == errno.EBUSY else ""
        raise NetworkError(f"remove tap {name}: {e.strerror}{held}") from e
    try:
        fcntl.ioctl(fd, _TUNSETPERSIST, 0)
    except OSError as e:
        raise NetworkError(f"remove tap {name}: {e.strerror}") from e
    finally:
        os.close(fd)
