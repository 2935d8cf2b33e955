"""A pod's network from request to release: resolve --port against the apps, attach each network
(user, default bridge, CNI), compute DNS and hosts entries, and undo it all — at the pod's end, when
its start fails halfway, or at `kvmpod gc` after its kvmpod was killed (from `net.json` in the pod dir,
written as each network is attached, before anything else could fail).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvmpod import paths
from kvmpod.errors import NetworkError, UsageError
from kvmpod.fsutil import write_atomically
from kvmpod.net import bridge, cni, given, tap, user
from kvmpod.net.spec import (NET_DEFAULT, NET_NONE, NET_USER, Attachment, DnsConfig, GuestNetwork, NetRequest,
                             PortForward, pod_mac)
from kvmpod.vm.config import Nic

log = logging.getLogger(__name__)
RECORD = "net.json"
HOST_RESOLV_CONF = Path("/etc/resolv.conf")
HOST_HOSTS = Path("/etc/hosts")


@dataclass
class AppPorts:
    """An app's appc ports (image manifest app.ports), for --port NAME."""

    app: str
    ports: Sequence[Any]   # kvmpod.image.manifest.Port


def resolve_ports(requests: Sequence, apps: Sequence[AppPorts]) -> list[PortForward]:
    """Each --port NAME:… against the ports the pod's apps declare (first app declaring NAME wins)."""
    out = []
    for req in requests:
        found = [(a.app, p) for a in apps for p in a.ports if p.name == req.name]
        if not found:
            known = sorted({p.name for a in apps for p in a.ports})
            raise UsageError(f"--port {req.name}: no app of the pod declares a port named {req.name!r} "
                             f"({'its ports: ' + ', '.join(known) if known else 'its apps declare no ports'})")
        _, port = found[0]
        if req.host_port + port.count - 1 > 65535:
            raise UsageError(f"--port {req.name}: {port.count} ports from {req.host_port} end past 65535")
        out.append(PortForward(req.name, port.protocol, req.host_ip, req.host_port, port.port, port.count))
    return out


def check_host_ports_free(forwards: Sequence[PortForward]) -> None:
    """Fail before boot, naming the port, if a host port is taken by a listener on this host."""
    for fwd in forwards:
        kind = socket.SOCK_STREAM if fwd.protocol == "tcp" else socket.SOCK_DGRAM
        for port in range(fwd.host_port, fwd.host_port + fwd.count):
            with socket.socket(socket.AF_INET, kind) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind((fwd.host_ip or "0.0.0.0", port))
                except OSError as e:
                    raise NetworkError(f"--port {fwd.name}: host port {fwd.protocol}/{port}"
                                       f"{' on ' + fwd.host_ip if fwd.host_ip else ''} is not available: "
                                       f"{e.strerror}") from e


def host_dns() -> DnsConfig:
    """The host's resolv.conf: nameservers (less loopback ones, which a pod cannot reach), search, options."""
    servers: list[str] = []
    search: list[str] = []
    options: list[str] = []
    try:
        lines = HOST_RESOLV_CONF.read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        words = line.split("#", 1)[0].split(";", 1)[0].split()
        if len(words) >= 2 and words[0] == "nameserver":
            try:
                if not ipaddress.ip_address(words[1].split("%")[0]).is_loopback:
                    servers.append(words[1])
            except ValueError:
                continue
        elif words and words[0] in ("search", "domain"):
            search = words[1:]
        elif words and words[0] == "options":
            options += words[1:]
    return DnsConfig(tuple(servers), tuple(search), tuple(options))


def guest_dns(request: NetRequest, network_dns: DnsConfig | None, notice: Callable[[str], None]) -> DnsConfig | None:
    """What every app's /etc/resolv.conf says (None: the images' own files stay), by precedence:
    --dns none; --dns ADDR…; user-mode's DNS proxy; the network's own (CNI); the host's."""
    if request.dns == ("none",):
        return None
    explicit = request.dns and request.dns != ("host",)
    if explicit:
        base = DnsConfig(request.dns)
    elif request.mode == NET_NONE:
        if not (request.dns_search or request.dns_options):
            return None
        base = DnsConfig()
    else:
        host = host_dns()
        if request.mode == NET_USER:   # slirp's proxy asks the host's resolvers, loopback ones included
            base = DnsConfig((user.DNS,), host.search, host.options)
        elif network_dns and network_dns.nameservers and request.dns != ("host",):
            base = network_dns
        else:
            base = host
            if not host.nameservers:
                notice("the host's resolvers are loopback addresses (or none) a pod cannot reach: "
                       "pass --dns ADDRESS for name resolution in the pod")
    return DnsConfig(base.nameservers, request.dns_search or base.search, request.dns_options or base.options)


def hosts_entries(request: NetRequest) -> list[str]:
    if request.hosts_entries != ("host",):
        return list(request.hosts_entries)
    entries = []
    try:
        lines = HOST_HOSTS.read_text().splitlines()
    except OSError as e:
        raise NetworkError(f"--hosts-entry host: {HOST_HOSTS}: {e.strerror}") from e
    for line in lines:
        words = line.split("#", 1)[0].split()
        if len(words) >= 2:
            entries.append(" ".join(words))
    return entries


VHOST_NET = Path("/dev/vhost-net")


def vhost_net_usable(device: Path = VHOST_NET) -> bool:
    """Tap NICs get in-kernel virtio-net (vhost=on) where this user may open /dev/vhost-net."""
    return os.access(device, os.R_OK | os.W_OK)


def needs_netlink(request: NetRequest) -> bool:
    """Does setting up (or releasing) this request use pyroute2, whose synchronous API runs an event
    loop of its own and so must not be called from kvmpod's?"""
    return request.mode in (NET_DEFAULT, "cni", "netns")


@dataclass
class PodNetwork:
    """The networks of one pod while it runs."""

    pod_path: Path
    attachments: list[Attachment] = field(default_factory=list)
    guest: GuestNetwork = field(default_factory=GuestNetwork)

    def nics(self) -> list[Nic]:
        vhost = vhost_net_usable()
        return [Nic(a.interface.mac, a.tap_fd, a.user_options, vhost=vhost and (a.tap_fd is not None or bool(name)),
                    tap_name=name)
                for a in self.attachments for name in (persistent_tap(a),)]

    def persist_taps(self) -> None:
        """For the libvirt backend, which opens a tap by name (its daemon, in this network namespace): the
        bridge's tap is made persistent and kvmpod's fd closed; net.json says so first, so that release
        or `kvmpod gc` removes it by name. The taps of CNI and of given namespaces stay fds (they live in
        namespaces libvirtd does not see; kvmpod/pod/launch.py refuses them on that backend)."""
        for a in self.attachments:
            if a.tap_fd is None or a.record.get("kind") != "bridge" or not isinstance(a.record.get("tap"), str):
                continue
            a.record["persistent"] = True
            try:
                records = json.loads((self.pod_path / RECORD).read_text())
            except (OSError, ValueError) as e:
                raise NetworkError(f"{self.pod_path / RECORD}: unreadable ({e})") from e
            _save(self.pod_path, [a.record if isinstance(r, dict) and r.get("kind") == "bridge"
                                  and r.get("tap") == a.record["tap"] else r for r in records])
            tap.persist(a.tap_fd, a.record["tap"])
            os.close(a.tap_fd)
            a.tap_fd = None

    def close_fds(self) -> None:
        """Once QEMU holds the taps: kvmpod's copies go, so the taps end with QEMU."""
        for a in self.attachments:
            if a.tap_fd is not None:
                os.close(a.tap_fd)
                a.tap_fd = None

    def summary(self) -> list[dict[str, Any]]:
        """For state.json and `kvmpod status`."""
        return [{"network": a.network, "interface": a.interface.name, "mac": a.interface.mac,
                 "ips": a.interface.ips} for a in self.attachments]

    def release(self) -> None:
        self.close_fds()
        release(self.pod_path)


def persistent_tap(attachment: Attachment) -> str | None:
    """The name of the attachment's tap if it was made persistent (persist_taps), else None."""
    name = attachment.record.get("tap")
    return name if attachment.record.get("persistent") and isinstance(name, str) else None


def _save(pod_path: Path, records: list[dict[str, Any]]) -> None:
    write_atomically(pod_path / RECORD, json.dumps(records).encode())


def setup(request: NetRequest, pod_uuid: str, pod_path: Path, apps: Sequence[AppPorts],
          notice: Callable[[str], None]) -> PodNetwork:
    """Attach the pod's networks; on any failure, undo what was made and raise."""
    if request.mode in (NET_DEFAULT, "cni", "netns") and os.geteuid() != 0:
        what = ("--net default" if request.mode == NET_DEFAULT else f"network namespace {request.netns}"
                if request.mode == "netns" else f"--net {','.join(request.cni_networks)} (CNI)")
        raise UsageError(f"{what} needs root (it makes taps, bridges and namespaces): use --net user")
    forwards = resolve_ports(request.ports, apps)
    network = PodNetwork(pod_path)
    records: list[dict[str, Any]] = []
    _save(pod_path, records)

    def remember(record: dict[str, Any]) -> None:
        """Save `record`; the same dict again (cni.py updates its record as results arrive) is saved
        in place, not added twice."""
        if not any(r is record for r in records):
            records.append(record)
        _save(pod_path, records)

    try:
        if request.mode == NET_USER:

            check_host_ports_free(forwards)
            mac = pod_mac(pod_uuid, 0)
            network.attachments.append(Attachment(NET_USER, user.interface(mac, "eth0"), {"kind": "user"},
                                                  user_options=user.netdev_options(forwards)))
        elif request.mode == NET_DEFAULT:

            def owner_gone(owner: str) -> bool:
                return not (paths.pods_dir() / owner).is_dir()

            check_host_ports_free(forwards)
            attachment = bridge.attach(pod_uuid, pod_mac(pod_uuid, 0), "eth0", forwards, owner_gone)
            network.attachments.append(attachment)
            remember(attachment.record)
        elif request.mode == "cni":

            network.attachments += cni.attach(list(request.cni_networks), pod_uuid, pod_path, remember, forwards,
                                              [Path(d) for d in request.cni_config_dirs] or None)
        elif request.mode == "netns":

            network.attachments += given.attach(Path(request.netns))
            if network.attachments:
                remember(network.attachments[0].record)
        network_dns = next((a.dns for a in network.attachments if a.dns), None)
        network.guest = GuestNetwork([a.interface for a in network.attachments],
                                     guest_dns(request, network_dns, notice), hosts_entries(request))
    except BaseException:
        network.release()
        raise
    for fwd in forwards:
        log.debug("port %s", fwd.describe())
    return network


def release(pod_path: Path) -> None:
    """Undo what a pod's net.json records, last attachment first; every part is tried, the first
    failure is raised at the end. Idempotent: a second call (gc after stop) finds nothing to do."""
    try:
        records = json.loads((pod_path / RECORD).read_text())
    except FileNotFoundError:
        return
    except (OSError, ValueError) as e:
        raise NetworkError(f"{pod_path / RECORD}: unreadable ({e}): its networks cannot be released") from e
    first: BaseException | None = None
    for record in reversed(records if isinstance(records, list) else []):
        try:
            _release_record(record)
        except Exception as e:  # noqa: BLE001 - the others still get their turn
            first = first or e
    if first is not None:
        raise first if isinstance(first, NetworkError) else NetworkError(f"releasing the pod's network: {first}")
    (pod_path / RECORD).unlink(missing_ok=True)


def _release_record(record: dict[str, Any]) -> None:
    kind = record.get("kind") if isinstance(record, dict) else None
    if kind == "bridge":
        bridge.release(record)
    elif kind == "cni":
        cni.release(record)
    elif kind == "netns":
        given.release(record)
