"""Tap devices that cannot leak: kvmpod opens them itself and hands the fd to QEMU.

A tap made with TUNSETIFF and never made persistent exists only while a process holds its fd, so
when QEMU and kvmpod are gone — even after `kill -9` — the kernel removes it. (`ip tuntap add` or
pyroute2's tuntap create *persistent* taps, which outlive a crash; hence these few ioctl lines.)
"""

from __future__ import annotations

import fcntl
import os
import struct
import threading
from pathlib import Path

from kvmpod.errors import NetworkError

_TUNSETIFF = 0x400454CA
_IFF_TAP = 0x0002
_IFF_NO_PI = 0x1000
_IFF_VNET_HDR = 0x4000   # QEMU offloads checksums and segmentation through the virtio-net header
_CLONE_NEWNET = 0x40000000
IFNAMSIZ = 16


def open_tap(name: str, netns: Path | None = None) -> int:
    """A new tap `name` (in the network namespace at `netns`, else kvmpod's own); returns its fd.

    In another namespace the tap is made from a short-lived thread that enters it: setns(2) moves
    only the calling thread, and the fd keeps working from anywhere once the tap exists."""
    if len(name.encode()) >= IFNAMSIZ:
        raise NetworkError(f"tap name {name!r} is longer than {IFNAMSIZ - 1} bytes")
    if netns is None:
        return _make_tap(name)
    result: dict[str, int | BaseException] = {}

    def in_namespace() -> None:
        import ctypes

        try:
            libc = ctypes.CDLL(None, use_errno=True)
            ns = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if libc.setns(ns, _CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise NetworkError(f"enter network namespace {netns}: {os.strerror(err)}")
            finally:
                os.close(ns)
            result["fd"] = _make_tap(name)
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            result["error"] = e

    thread = threading.Thread(target=in_namespace, name="kvmpod-tap")
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]  # type: ignore[misc]
    return int(result["fd"])  # type: ignore[arg-type]


def _make_tap(name: str) -> int:
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        raise NetworkError(f"/dev/net/tun: {e.strerror} (taps need root or CAP_NET_ADMIN; --net user needs neither)") from None
    try:
        fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH22x", name.encode(), _IFF_TAP | _IFF_NO_PI | _IFF_VNET_HDR))
    except OSError as e:
        os.close(fd)
        raise NetworkError(f"create tap {name}: {e.strerror}") from None
    return fd
