"""A network namespace another runtime prepared: podman (netavark or CNI) or containerd's CNI hand an
OCI container the path of a namespace with its interfaces already configured (docs/oci-runtime.md).

kvmpod neither makes nor removes that namespace. For each interface in it (loopback aside) it reads the
MAC, MTU, addresses and routes, makes a tap beside it for QEMU and joins the two with tc redirects both
ways (as for kvmpod's own CNI networks, kvmpod/net/cni.py): the guest gets the same MAC, addresses and
routes, so what the runtime set up around the namespace (port forwards, firewall rules, DNS) holds for
the VM. Release takes the redirects off the namespace's interfaces if it still exists; the taps go with
QEMU.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
from pathlib import Path
from typing import Any

from kvmpod.errors import NetworkError
from kvmpod.net.cni import join_tap
from kvmpod.net.netns import in_netns, netns_alive
from kvmpod.net.spec import Attachment, GuestInterface, Route
from kvmpod.net.tap import open_tap

log = logging.getLogger(__name__)


def _interfaces(netns: Path) -> list[GuestInterface]:
    """Every interface of the namespace but loopback, as the guest is to see it."""
    def read() -> list[GuestInterface]:
        from pyroute2 import IPRoute

        out = []
        with IPRoute() as ipr:
            for link in ipr.get_links():
                name = link.get_attr("IFLA_IFNAME")
                if name == "lo" or link.get_attr("IFLA_ADDRESS") in (None, "00:00:00:00:00:00"):
                    continue
                index = link["index"]
                addresses = []
                for addr in ipr.get_addr(index=index):
                    ip = ipaddress.ip_interface(f"{addr.get_attr('IFA_ADDRESS')}/{addr['prefixlen']}")
                    if ip.version == 6 and ip.is_link_local:
                        continue   # the guest's kernel makes its own from the same MAC
                    addresses.append(str(ip))
                routes = []
                for family in (socket.AF_INET, socket.AF_INET6):
                    for route in ipr.get_routes(family=family, oif=index, table=254):
                        dst = route.get_attr("RTA_DST")
                        gateway = route.get_attr("RTA_GATEWAY")
                        if dst is None:
                            dst = "0.0.0.0" if family == socket.AF_INET else "::"
                        network = ipaddress.ip_network(f"{dst}/{route['dst_len']}", strict=False)
                        if network.version == 6 and network.is_link_local:
                            continue
                        if gateway is None and any(network == ipaddress.ip_interface(a).network for a in addresses):
                            continue   # the prefix route the guest's kernel adds with the address
                        routes.append(Route(str(network), gateway))
                out.append(GuestInterface(str(link.get_attr("IFLA_ADDRESS")).lower(), name,
                                          int(link.get_attr("IFLA_MTU")), tuple(addresses), tuple(routes)))
        return out
    return in_netns(netns, read)


def attach(netns: Path) -> list[Attachment]:
    """A tap per interface of `netns`, joined to it; on failure what was made is undone and NetworkError raised."""
    if not netns.is_absolute():
        raise NetworkError(f"network namespace {netns}: not an absolute path")
    if not netns_alive(netns):
        raise NetworkError(f"network namespace {netns}: not a network namespace (or gone)")
    interfaces = _interfaces(netns)
    record: dict[str, Any] = {"kind": "netns", "netns": str(netns), "interfaces": []}
    attachments: list[Attachment] = []
    try:
        for i, interface in enumerate(interfaces):
            tap = f"kvmtap{i}"
            fd = open_tap(tap, netns)
            attachments.append(Attachment(f"netns:{interface.name}", interface, record, tap_fd=fd))
            record["interfaces"].append(interface.name)
            join_tap(netns, interface.name, tap, interface.mtu)
            log.debug("namespace %s: %s %s mtu %d %s", netns, interface.name, interface.mac, interface.mtu,
                      interface.addresses)
    except BaseException:
        for a in attachments:
            if a.tap_fd is not None:
                os.close(a.tap_fd)
        release(record)
        raise
    return attachments


def release(record: dict[str, Any]) -> None:
    """The redirects off the namespace's interfaces (the runtime that made it removes it). Idempotent."""
    netns = Path(str(record.get("netns", "")))
    names = [n for n in record.get("interfaces") or [] if isinstance(n, str)]
    if not names or not netns.is_absolute() or not netns_alive(netns):
        return

    def unjoin() -> None:
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError

        with IPRoute() as ipr:
            for name in names:
                found = ipr.link_lookup(ifname=name)
                if not found:
                    continue
                try:
                    ipr.tc("del", "ingress", found[0], "ffff:")
                except NetlinkError as e:
                    if e.code not in (2, 22):   # ENOENT/EINVAL: no ingress qdisc (left already)
                        raise NetworkError(f"tc: removing the redirect of {name} in {netns}: "
                                           f"{os.strerror(e.code)}") from e
    in_netns(netns, unjoin)
