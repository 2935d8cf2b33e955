"""The per-pod link operations of `--net default`, done with the kernel's interface ioctls.

A pod on the bridge needs three things of its network namespace: that the bridge is there, up, with
the gateway's address; its tap on the bridge; the tap up. Through pyroute2 that costs its import
(~60 ms here, on the start's critical path) and a netlink session per pod, for what the kernel's old
`SIOC*` interface calls (brctl's and ifconfig's) do in microseconds. So only these few read-or-set
calls are ioctls, each naming the link in its error; making the bridge, its address and anything
else stays pyroute2's (kvmpod/net/bridge.py), and runs only when the check below fails.
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import socket
import struct

from kvmpod.errors import NetworkError
from kvmpod.net.tap import IFNAMSIZ

# <linux/sockios.h>
_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_SIOCGIFADDR = 0x8915
_SIOCGIFNETMASK = 0x891B
_SIOCSIFMTU = 0x8922
_SIOCBRADDIF = 0x89A2
IFF_UP = 0x1
_IFREQ = 40   # sizeof(struct ifreq) on 64-bit Linux: a name, then a 24-byte union


def _ifreq(name: str, payload: bytes = b"") -> bytes:
    encoded = name.encode()
    if len(encoded) >= IFNAMSIZ:
        raise NetworkError(f"link name {name!r} is longer than {IFNAMSIZ - 1} bytes")
    return struct.pack(f"{IFNAMSIZ}s", encoded) + payload.ljust(_IFREQ - IFNAMSIZ, b"\0")


def _ioctl(request: int, name: str, payload: bytes, what: str, *, none_if: int = 0) -> bytes | None:
    """The ifreq the kernel returns; None if it failed with errno `none_if` (a NetworkError otherwise)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        try:
            return fcntl.ioctl(s.fileno(), request, _ifreq(name, payload))
        except OSError as e:
            if none_if and e.errno == none_if:
                return None
            raise NetworkError(f"{what} {name}: {e.strerror}") from e


def flags(name: str) -> int | None:
    """The link's IFF_* flags, or None if this network namespace has no such link. (An ioctl, not
    sysfs: /sys/class/net shows the namespace of whoever mounted /sys, not necessarily kvmpod's.)"""
    out = _ioctl(_SIOCGIFFLAGS, name, b"", "flags of", none_if=errno.ENODEV)
    return None if out is None else int(struct.unpack_from("H", out, IFNAMSIZ)[0])


def _ipv4_of(request: int, name: str, what: str) -> ipaddress.IPv4Address | None:
    """A sockaddr_in the kernel fills in (its sin_addr), or None if the link has no IPv4 address."""
    out = _ioctl(request, name, struct.pack("H", socket.AF_INET), what, none_if=errno.EADDRNOTAVAIL)
    return None if out is None else ipaddress.IPv4Address(out[IFNAMSIZ + 4:IFNAMSIZ + 8])


def primary_ipv4(name: str) -> ipaddress.IPv4Interface | None:
    """The link's primary IPv4 address with its prefix (what SIOCGIFADDR reports: the first one
    added), or None if it has none."""
    address = _ipv4_of(_SIOCGIFADDR, name, "address of")
    mask = _ipv4_of(_SIOCGIFNETMASK, name, "netmask of")
    if address is None or mask is None:
        return None
    return ipaddress.IPv4Interface(f"{address}/{mask}")


def set_up(name: str) -> None:
    """Set IFF_UP on the link (read, or, write: its other flags stay as they were)."""
    now = flags(name)
    if now is None:
        raise NetworkError(f"bring up {name}: no such link")
    if not now & IFF_UP:
        _ioctl(_SIOCSIFFLAGS, name, struct.pack("H", now | IFF_UP), "bring up")


def set_mtu(name: str, mtu: int) -> None:
    _ioctl(_SIOCSIFMTU, name, struct.pack("i", mtu), f"set MTU {mtu} of")


def add_to_bridge(bridge: str, port: str) -> None:
    """Make the link `port` a port of `bridge` (brctl addif)."""
    try:
        index = socket.if_nametoindex(port)
    except OSError as e:
        raise NetworkError(f"attach {port} to {bridge}: {e.strerror or 'no such link'}") from e
    _ioctl(_SIOCBRADDIF, bridge, struct.pack("i", index), f"attach {port} to bridge")

