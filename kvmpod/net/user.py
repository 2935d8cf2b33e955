"""--net user: QEMU's user-mode network stack (slirp). No privilege, no host state: the guest's
packets become the QEMU process's own sockets, and --port forwards are slirp's hostfwd listeners.

slirp's fixed plan (QEMU's defaults, written out so the guest can be configured statically):
the guest is 10.0.2.15/24, the gateway (the host) 10.0.2.2, slirp's DNS proxy 10.0.2.3.
"""

from __future__ import annotations

from kvmpod.net.spec import GuestInterface, PortForward, Route

SUBNET = "10.0.2.0/24"
GUEST_IP = "10.0.2.15"
GATEWAY = "10.0.2.2"
DNS = "10.0.2.3"
MTU = 1500


def netdev_options(forwards: list[PortForward]) -> tuple[str, ...]:
    """-netdev user options: the subnet plan, and one hostfwd per forwarded port."""
    options = [f"net={SUBNET}", f"host={GATEWAY}", f"dns={DNS}", f"dhcpstart={GUEST_IP}", "ipv6=off"]
    for fwd in forwards:
        for i in range(fwd.count):
            options.append(f"hostfwd={fwd.protocol}:{fwd.host_ip}:{fwd.host_port + i}-{GUEST_IP}:{fwd.guest_port + i}")
    return tuple(options)


def interface(mac: str, ifname: str) -> GuestInterface:
    return GuestInterface(mac, ifname, MTU, (f"{GUEST_IP}/24",), (Route("0.0.0.0/0", GATEWAY),))
