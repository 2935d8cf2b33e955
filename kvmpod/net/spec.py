"""What a pod's network is, as data: the user's request (--net, --port, --dns…), what each network gives
the guest (interfaces, addresses, routes), and the NETWORK frame that tells the agent.

No sockets or netlink here: parsing and checking only, so the CLI imports it cheaply.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field
from typing import Any

from kvmpod import config
from kvmpod.errors import UsageError

NET_NONE, NET_USER, NET_DEFAULT = "none", "user", "default"
_CNI_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9\-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9\-]{0,61}[A-Za-z0-9])?)*$")


@dataclass(frozen=True)
class PortRequest:
    """--port NAME:[HOSTIP:]HOSTPORT: the appc port NAME of an app, reachable on the host at HOSTPORT."""

    name: str
    host_port: int
    host_ip: str = ""      # "" = every address of the host


@dataclass(frozen=True)
class PortForward:
    """A --port resolved against the pod's apps: host HOSTIP:HOSTPORT(+count) → guest port(+count)."""

    name: str
    protocol: str          # "tcp" | "udp"
    host_ip: str
    host_port: int
    guest_port: int
    count: int = 1

    def describe(self) -> str:
        host = f"{self.host_ip}:" if self.host_ip else ""
        span = f"-{self.host_port + self.count - 1}" if self.count > 1 else ""
        return f"{self.name} ({self.protocol} {host}{self.host_port}{span} → {self.guest_port})"


@dataclass(frozen=True)
class NetRequest:
    """The pod's network as asked for on the command line (docs/networking.md)."""

    mode: str = NET_NONE                  # none | user | default | cni | netns (a namespace given: OCI)
    cni_networks: tuple[str, ...] = ()    # mode "cni": the networks, in order (eth0, eth1…)
    ports: tuple[PortRequest, ...] = ()
    dns: tuple[str, ...] = ()             # nameserver addresses; ("host",) or ("none",) are modes
    dns_search: tuple[str, ...] = ()
    dns_options: tuple[str, ...] = ()
    hosts_entries: tuple[str, ...] = ()   # "ADDRESS NAME" lines; ("host",) copies the host's /etc/hosts
    netns: str = ""                       # mode "netns": the namespace's path (kvmpod/net/given.py)
    # mode "cni": where the network configs are looked up, in order; () is [net] cni-config-dirs
    # (rkt's stage1 looks in rkt's net.d directories, kvmpod/stage1/network.py)
    cni_config_dirs: tuple[str, ...] = ()

    @property
    def names(self) -> list[str]:
        """The networks, as `kvmpod status` and the pod dir call them."""
        return list(self.cni_networks) if self.mode == "cni" else [self.mode]


def default_mode() -> str:
    """Root gets the default bridge network; anyone else user-mode networking, which needs no privilege.
    `[net] default` in kvmpod.toml overrides both (e.g. "none" on hosts where pods must stay offline)."""
    found = config.lookup("default", "net")
    if found is not None:
        if not isinstance(found.value, str):
            raise UsageError(f"{found.describe('[net] default')}: {found.value!r} is not a network")
        return found.value
    return NET_DEFAULT if os.geteuid() == 0 else NET_USER


def parse_net(value: str | None) -> tuple[str, tuple[str, ...]]:
    """--net: none, user, default, host (refused: a VM has no host network), or CNI NAME[,NAME…]."""
    text = default_mode() if value is None else value
    if text in (NET_NONE, NET_USER, NET_DEFAULT):
        return text, ()
    if text == "host":
        raise UsageError("--net host: a pod VM cannot share the host's network namespace; "
                         "use --net default or --net user with --port")
    names = tuple(text.split(","))
    for name in names:
        if name in (NET_NONE, NET_USER, NET_DEFAULT):
            raise UsageError(f"--net {text}: {name!r} cannot be combined with other networks")
        if not _CNI_NAME.match(name):
            raise UsageError(f"--net {text}: {name!r} is not a network name (letters, digits, _ . -)")
    if len(set(names)) != len(names):
        raise UsageError(f"--net {text}: a network is named twice")
    return "cni", names


def parse_port(text: str) -> PortRequest:
    """rkt's --port NAME:[HOSTIP:]HOSTPORT."""
    parts = text.split(":")
    if len(parts) not in (2, 3) or not parts[0]:
        raise UsageError(f"--port {text}: expected NAME:[HOSTIP:]HOSTPORT")
    name, host_ip, port = parts[0], parts[1] if len(parts) == 3 else "", parts[-1]
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise UsageError(f"--port {text}: {port!r} is not a port number (1-65535)")
    if host_ip:
        try:
            if ipaddress.ip_address(host_ip).version != 4:
                raise ValueError
        except ValueError as e:
            raise UsageError(f"--port {text}: {host_ip!r} is not an IPv4 address") from e
    return PortRequest(name, int(port), host_ip)


def parse_hosts_entry(text: str) -> str:
    """rkt's --hosts-entry IP=HOSTNAME (or "host"): one /etc/hosts line."""
    if text == "host":
        return text
    address, sep, name = text.partition("=")
    try:
        ipaddress.ip_address(address)
    except ValueError as e:
        raise UsageError(f"--hosts-entry {text}: {address!r} is not an IP address (expected IP=HOSTNAME)") from e
    if not sep or not _HOSTNAME.match(name):
        raise UsageError(f"--hosts-entry {text}: {name!r} is not a host name (expected IP=HOSTNAME)")
    return f"{address} {name}"


def parse_dns(values: list[str]) -> tuple[str, ...]:
    """--dns: nameserver addresses, or one of `host` (the host's resolvers) and `none` (the images' own)."""
    if any(v in ("host", "none") for v in values):
        if len(values) > 1:
            raise UsageError(f"--dns {values[0] if values[0] in ('host', 'none') else values[1]} "
                             "cannot be combined with other --dns values")
        return (values[0],)
    for value in values:
        try:
            ipaddress.ip_address(value)
        except ValueError as e:
            raise UsageError(f"--dns {value}: not an IP address (or host, none)") from e
    return tuple(values)


def parse_dns_word(flag: str, value: str) -> str:
    if not value or any(c.isspace() or ord(c) < 32 for c in value):
        raise UsageError(f"{flag} {value!r}: must be one word")
    return value


def request(net: str | None, ports: list[str], dns: list[str], dns_search: list[str], dns_options: list[str],
            hosts_entries: list[str]) -> NetRequest:
    mode, cni = parse_net(net)
    req = NetRequest(mode, cni, tuple(parse_port(p) for p in ports), parse_dns(dns),
                     tuple(parse_dns_word("--dns-search", s) for s in dns_search),
                     tuple(parse_dns_word("--dns-opt", o) for o in dns_options),
                     tuple(parse_hosts_entry(h) for h in hosts_entries))
    if mode == NET_NONE and req.ports:
        raise UsageError("--port needs a network: --net none has only loopback")
    if "host" in req.hosts_entries and len(req.hosts_entries) > 1:
        raise UsageError("--hosts-entry host cannot be combined with other --hosts-entry values")
    seen: dict[tuple[str, int], str] = {}
    for port in req.ports:
        key = (port.host_ip, port.host_port)
        if key in seen:
            raise UsageError(f"--port {port.name}: host port {port.host_port} is also given to {seen[key]}")
        seen[key] = port.name
    return req


# --- what a network gives the guest ------------------------------------------------------------


@dataclass(frozen=True)
class Route:
    destination: str          # CIDR: 0.0.0.0/0 for the default route
    gateway: str | None = None


@dataclass(frozen=True)
class GuestInterface:
    """One virtio-net device as the guest sees it."""

    mac: str
    name: str                 # eth0, eth1…
    mtu: int = 1500
    addresses: tuple[str, ...] = ()       # CIDR
    routes: tuple[Route, ...] = ()

    @property
    def ips(self) -> list[str]:
        return [a.split("/")[0] for a in self.addresses]


@dataclass(frozen=True)
class DnsConfig:
    nameservers: tuple[str, ...] = ()
    search: tuple[str, ...] = ()
    options: tuple[str, ...] = ()


@dataclass
class GuestNetwork:
    """Everything the agent configures: interfaces, and the files every app root gets."""

    interfaces: list[GuestInterface] = field(default_factory=list)
    dns: DnsConfig | None = None                 # None: the images' own /etc/resolv.conf
    hosts_entries: list[str] = field(default_factory=list)

    def frame(self, device_macs: list[str] | None = None):
        """The NETWORK frame (kvmpod/agent/protocol.toml), or None when there is nothing to say.
        `device_macs`: the MACs the VM's devices have now, one per interface, when they are not the
        interfaces' own (a VM restored from a boot snapshot has the snapshot's): the agent sets them."""
        from kvmpod.agent import protocol as p

        dns = self.dns or DnsConfig()
        if device_macs is not None and len(device_macs) != len(self.interfaces):
            raise ValueError(f"{len(device_macs)} device MACs for {len(self.interfaces)} interfaces")
        message = p.Network(
            net_interface=[f"{i.mac} {i.name} {i.mtu}{f' {device_macs[n]}' if device_macs else ''}".encode()
                           for n, i in enumerate(self.interfaces)],
            net_address=[f"{i.mac} {a}".encode() for i in self.interfaces for a in i.addresses],
            net_route=[(f"{i.mac} {r.destination}" + (f" {r.gateway}" if r.gateway else "")).encode()
                       for i in self.interfaces for r in i.routes],
            dns_nameserver=[s.encode() for s in dns.nameservers], dns_search=[s.encode() for s in dns.search],
            dns_option=[o.encode() for o in dns.options], hosts_entry=[e.encode() for e in self.hosts_entries])
        payload = message.encode()
        return p.Frame(p.MessageType.NETWORK, 0, payload) if payload else None


@dataclass
class Attachment:
    """One network attached to the pod: what the guest sees, how QEMU reaches it, how to undo it."""

    network: str
    interface: GuestInterface
    record: dict[str, Any]             # saved in the pod dir (net.json): what release() undoes, even after a crash
    tap_fd: int | None = None          # kvmpod's fd of the pod's tap (None: user-mode networking)
    user_options: tuple[str, ...] = ()  # -netdev user options (user-mode networking)
    dns: DnsConfig | None = None       # the network's own DNS settings (a CNI result's)


def pod_mac(pod_uuid: str, index: int) -> str:
    """A locally administered unicast MAC from the pod's UUID (02:…), distinct per interface."""
    raw = bytes.fromhex(pod_uuid.replace("-", ""))[:4]
    return ":".join(f"{b:02x}" for b in (0x02, *raw, index & 0xFF))
