"""--net default: the bridge `kvmpod0` with a private subnet, a tap per pod on it, host-local leases,
NAT for egress and DNAT for --port (docs/networking.md).

The bridge and its address are made with pyroute2 (netlink), which a pod imports only when they are
missing: a pod checks them and puts its tap on the bridge with interface ioctls (kvmpod/net/ifioctl.py,
why there). The taps are kvmpod's own fds
(kvmpod/net/tap.py), so they vanish with the pod (a libvirt pod's is made persistent, for libvirt
opens it by name, and removed by name at release); NAT lives in kvmpod's nftables table
(kvmpod/net/nft.py). The bridge and the table stay once made (other pods use them): they hold no
per-pod state, and the bridge is empty when no pod runs.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvmpod import config, paths
from kvmpod.errors import ConfigError, NetworkError
from kvmpod.net import ifioctl, nft
from kvmpod.net.ipam import LeasePool
from kvmpod.net.spec import Attachment, GuestInterface, PortForward, Route
from kvmpod.net.tap import open_tap, remove_persistent

BRIDGE = "kvmpod0"
DEFAULT_SUBNET = "172.16.28.0/24"   # rkt's default network used this range too
MTU = 1500


@dataclass(frozen=True)
class DefaultNetwork:
    subnet: ipaddress.IPv4Network
    gateway: ipaddress.IPv4Address   # the bridge's address: the subnet's first host

    @classmethod
    def configured(cls) -> "DefaultNetwork":
        """From `[net] default-subnet` in kvmpod.toml, else 172.16.28.0/24."""
        found = config.lookup("default-subnet", "net")
        text = found.value if found else DEFAULT_SUBNET
        try:
            subnet = ipaddress.IPv4Network(text)
            if not isinstance(text, str) or subnet.prefixlen > 29 or not subnet.is_private:
                raise ValueError
        except (ValueError, TypeError) as e:
            where = found.describe("[net] default-subnet") if found else "default subnet"
            raise ConfigError(f"{where}: {text!r} is not a private IPv4 subnet of /29 or larger") from e
        return cls(subnet, next(subnet.hosts()))

    @property
    def pool(self) -> LeasePool:
        return LeasePool(paths.runtime_dir() / "net" / "default", self.subnet, self.gateway)


def _write_sysctl(path: str, value: str) -> None:
    try:
        with open(path) as f:
            if f.read().strip() == value:
                return
        with open(path, "w") as f:
            f.write(value)
    except OSError as e:
        raise NetworkError(f"{path}: {e.strerror}") from e


def bridge_ready(net: DefaultNetwork) -> bool:
    """Is the bridge there, up, with the gateway's address as its primary one? Then a pod has nothing
    for netlink to do."""
    flags = ifioctl.flags(BRIDGE)   # a kvmpod0 that is no bridge: the tap's SIOCBRADDIF says so
    gateway = ipaddress.IPv4Interface(f"{net.gateway}/{net.subnet.prefixlen}")
    return flags is not None and bool(flags & ifioctl.IFF_UP) and ifioctl.primary_ipv4(BRIDGE) == gateway


def ensure_bridge(net: DefaultNetwork) -> None:
    """The bridge with the gateway address, up; IP forwarding on; the NAT table. Idempotent; called
    under the network's lock, so concurrent pods never race to create them."""
    if not bridge_ready(net):
        from concurrent.futures import ThreadPoolExecutor   # 4 ms: not on a pod's usual path

        # pyroute2's synchronous API runs an event loop of its own, which fails in a thread whose loop
        # already runs (a detached or OCI-created pod plans from one): so it gets a thread of its own
        with ThreadPoolExecutor(1, thread_name_prefix="kvmpod-netlink") as pool:
            pool.submit(_make_bridge, net).result()
    _write_sysctl("/proc/sys/net/ipv4/ip_forward", "1")   # routing for the pods: NAT needs it
    # --port forwards reached at 127.0.0.1 are DNATed out of loopback onto the bridge
    _write_sysctl(f"/proc/sys/net/ipv4/conf/{BRIDGE}/route_localnet", "1")
    nft.ensure_table(net.subnet, BRIDGE)


def _make_bridge(net: DefaultNetwork) -> None:
    """Make the bridge, give it the gateway's address, bring it up: whichever of these is missing."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        with IPRoute() as ipr:
            found = ipr.link_lookup(ifname=BRIDGE)
            if not found:
                ipr.link("add", ifname=BRIDGE, kind="bridge")
                found = ipr.link_lookup(ifname=BRIDGE)
            index = found[0]
            have = {(a.get_attr("IFA_ADDRESS"), a["prefixlen"]) for a in ipr.get_addr(index=index, family=2)}
            if (str(net.gateway), net.subnet.prefixlen) not in have:
                ipr.addr("add", index=index, address=str(net.gateway), prefixlen=net.subnet.prefixlen)
            ipr.link("set", index=index, state="up")
    except NetlinkError as e:
        raise NetworkError(f"bridge {BRIDGE}: {os.strerror(e.code) if e.code else e}") from e


def intent(pod_uuid: str) -> dict[str, Any]:
    """What release() needs before attach() has made anything: the owner of any lease (no forwards:
    deleting a host port's map element that another pod holds would break that pod)."""
    net = DefaultNetwork.configured()
    return {"kind": "bridge", "network": "default", "owner": pod_uuid, "leases": str(net.pool.directory),
            "subnet": str(net.subnet), "forwards": []}


def attach(pod_uuid: str, mac: str, ifname: str, forwards: list[PortForward],
           owner_gone: Callable[[str], bool]) -> Attachment:
    """A lease, a tap on the bridge and the pod's port forwards; undone in full if any part fails."""
    net = DefaultNetwork.configured()
    pool = net.pool
    with pool.locked():
        ensure_bridge(net)
    address = pool.allocate(pod_uuid, owner_gone)
    record = {**intent(pod_uuid), "ip": str(address)}
    tap_fd = -1
    try:
        tap = f"kvtap{pod_uuid.replace('-', '')[:8]}"
        tap_fd = open_tap(tap)
        ifioctl.set_mtu(tap, MTU)
        ifioctl.add_to_bridge(BRIDGE, tap)
        ifioctl.set_up(tap)
        record["tap"] = tap
        nft.add_forwards(forwards, str(address))
        record["forwards"] = [dataclasses.asdict(f) for f in forwards]
    except BaseException:
        if tap_fd >= 0:
            os.close(tap_fd)
        pool.release(pod_uuid)
        raise
    interface = GuestInterface(mac, ifname, MTU, (f"{address}/{net.subnet.prefixlen}",),
                               (Route("0.0.0.0/0", str(net.gateway)),))
    return Attachment("default", interface, record, tap_fd=tap_fd)


def release(record: dict[str, Any]) -> None:
    """Undo what attach() recorded: a libvirt pod's persistent tap (a QEMU backend pod's went with its
    fd), the port forwards, then the lease."""
    forwards = [PortForward(**f) for f in record.get("forwards", [])]
    try:
        if record.get("persistent") and isinstance(record.get("tap"), str):
            remove_persistent(record["tap"])
        nft.remove_forwards(forwards)
    finally:
        owner = record.get("owner")
        if isinstance(owner, str) and isinstance(record.get("leases"), str):
            net = ipaddress.IPv4Network(record.get("subnet", DEFAULT_SUBNET))
            LeasePool(Path(record["leases"]), net, next(net.hosts())).release(owner)


def sweep() -> list[str]:
    """Port forwards to addresses no pod leases (a kvmpod killed between making a forward and recording
    it): removed, under the lease lock so no pod is being set up meanwhile. For `kvmpod gc`."""
    if not nft.table_exists():
        return []
    pool = DefaultNetwork.configured().pool
    with pool.locked():
        leased = {str(a) for a in pool.leases()}
        stale = [(m, k) for m, k, address in nft.forwarded_to() if address not in leased]
        nft.remove_elements(stale)
    return [k for _, k in stale]
