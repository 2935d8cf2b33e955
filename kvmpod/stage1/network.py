"""The run entrypoint's network arguments (`--net`, `--dns-conf-mode`, `--local-config`) as a kvmpod
NetRequest.

    --net=none               loopback only
    --net=default            kvmpod's default network (the bridge kvmpod0 with NAT, docs/networking.md)
    --net=NAME[,NAME2]       CNI networks, their configs looked up as rkt does: <local-config>/net.d,
                             then /usr/lib/rkt/net.d (docs/cni.md runs them)
    --net=all                every CNI network configured there
    --net=host               refused: a VM has no host network namespace to share

`--dns-conf-mode` (interface version 4): resolv=host is the host's resolvers, none the images' own
files, stage0 the stage1/rootfs/etc/rkt-resolv.conf stage0 wrote (`rkt run --dns…`), default kvmpod's
default; hosts=host is the host's /etc/hosts, stage0 stage1/rootfs/etc/rkt-hosts (`--hosts-entry`).
"""

from __future__ import annotations

import dataclasses
import ipaddress
from pathlib import Path

from kvmpod.errors import KvmpodError
from kvmpod.net.cni import network_names
from kvmpod.net.spec import NetRequest, PortRequest, request
from kvmpod.stage1.flags import SYSTEM_CONFIG, NetArg, RunArgs, Stage1Error
from kvmpod.stage1.poddir import STAGE1_ROOTFS

RKT_RESOLV = STAGE1_ROOTFS / "etc" / "rkt-resolv.conf"
RKT_HOSTS = STAGE1_ROOTFS / "etc" / "rkt-hosts"
MAX_CONF_BYTES = 1 << 16


def cni_config_dirs(local_config: str) -> list[Path]:
    """rkt's network config directories: the local configuration's net.d, then the system's."""
    return [Path(local_config) / "net.d", Path(SYSTEM_CONFIG) / "net.d"]


def _net_mode(nets: list[NetArg], local_config: str) -> str:
    """--net as kvmpod's --net value."""
    names = [n.name for n in nets]
    if "host" in names:
        raise Stage1Error("run: --net=host: a pod VM cannot share the host's network namespace "
                          "(use --net=default or a CNI network)")
    if args := [n for n in nets if n.args]:
        raise Stage1Error(f"run: --net={args[0].name}:{args[0].args}: per-network CNI_ARGS are not supported "
                          "by kvmpod's stage1")
    if len(names) > 1 and any(n in ("none", "default", "all") for n in names):
        special = next(n for n in names if n in ("none", "default", "all"))
        raise Stage1Error(f"run: --net={','.join(names)}: {special!r} cannot be combined with other networks "
                          "in kvmpod's stage1")
    if names == ["all"]:
        found = network_names(cni_config_dirs(local_config))
        if not found:
            raise Stage1Error(f"run: --net=all: no CNI network configs in "
                              f"{', '.join(str(d) for d in cni_config_dirs(local_config))}")
        return ",".join(found)
    if names == ["user"]:  # kvmpod's word, not rkt's: a CNI network may not take it either
        raise Stage1Error("run: --net=user: not an rkt network (none, default, host, all or a CNI network name)")
    return ",".join(names)


def _read_conf(root: Path, relative: Path, mode: str) -> list[list[str]]:
    path = root / relative
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONF_BYTES + 1)
    except OSError as e:
        raise Stage1Error(f"run: --dns-conf-mode {mode}=stage0: {path}: {e.strerror} (stage0 writes it)") from e
    if len(data) > MAX_CONF_BYTES:
        raise Stage1Error(f"run: {path}: larger than {MAX_CONF_BYTES} bytes")
    return [line.split("#", 1)[0].split() for line in data.decode(errors="replace").splitlines()]


def _stage0_resolv(root: Path) -> tuple[list[str], list[str], list[str]]:
    """The nameservers, search domains and options of stage0's rkt-resolv.conf."""
    servers: list[str] = []
    search: list[str] = []
    options: list[str] = []
    for words in _read_conf(root, RKT_RESOLV, "resolv"):
        if not words:
            continue
        key, values = words[0], words[1:]
        if key == "nameserver" and values:
            servers.append(values[0])
        elif key in ("search", "domain"):
            search += values
        elif key == "options":
            options += values
    if not servers:  # kvmpod's `--dns` needs an address: an empty file is "no resolv.conf from us"
        raise Stage1Error(f"run: {root / RKT_RESOLV}: no nameserver in it")
    return servers, search, options


def _stage0_hosts(root: Path) -> list[str]:
    """stage0's rkt-hosts as IP=NAME entries (one per name)."""
    entries: list[str] = []
    for words in _read_conf(root, RKT_HOSTS, "hosts"):
        if len(words) < 2:
            continue
        try:
            ipaddress.ip_address(words[0])
        except ValueError as e:
            raise Stage1Error(f"run: {root / RKT_HOSTS}: {words[0]!r} is not an IP address") from e
        entries += [f"{words[0]}={name}" for name in words[1:]]
    return entries


def net_request(args: RunArgs, root: Path, ports: list[PortRequest]) -> NetRequest:
    """The pod's NetRequest; errors are one line naming the flag or file."""
    mode = _net_mode(args.nets, args.local_config)
    dns: list[str] = []
    search: list[str] = []
    options: list[str] = []
    if args.resolv_mode in ("host", "none"):
        dns = [args.resolv_mode]
    elif args.resolv_mode == "stage0":
        dns, search, options = _stage0_resolv(root)
    hosts: list[str] = []
    if args.hosts_mode == "host":
        hosts = ["host"]
    elif args.hosts_mode == "stage0":
        hosts = _stage0_hosts(root)
    port_flags = [f"{p.name}:{p.host_ip + ':' if p.host_ip else ''}{p.host_port}" for p in ports]
    try:
        req = request(mode, port_flags, dns, search, options, hosts)
    except KvmpodError as e:
        raise Stage1Error(f"run: {e}") from e
    if req.mode == "cni":
        req = dataclasses.replace(req, cni_config_dirs=tuple(str(d) for d in cni_config_dirs(args.local_config)))
    return req
