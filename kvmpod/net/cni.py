"""--net NAME[,NAME2]: CNI networks, run with the real CNI plugins (docs/cni.md).

Per pod, kvmpod makes a network namespace `kvmpod-<uuid>` (bind-mounted at /run/netns, as `ip netns`
does) and runs each network's plugins there with CNI ADD (interface eth0, eth1… in --net order). The
plugins give the namespace a veth (or macvlan…) with an address; kvmpod reads its MAC and MTU, makes a
tap beside it for QEMU (an fd only kvmpod and QEMU hold: kernel-removed when they are gone), and joins
the two with tc: ingress of the plugin's interface is redirected to the tap's egress, and the tap's
ingress to the interface's egress (the design Kata Containers calls "tcfilter"). The guest gets the
interface's MAC, MTU, addresses and routes, so what the plugins learned (ARP, leases) stays true.

The pod's record in net.json names the namespace and the networks before any plugin runs, and is
saved again as each result arrives, so `release` can undo everything after a crash at any point:
CNI DEL for each network (last first), then the namespace goes.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import logging
import os
import re
import signal
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvmpod import config
from kvmpod.errors import ConfigError, NetworkError, printable
from kvmpod.fsutil import write_atomically
from kvmpod.net.netns import NETNS_DIR, create_netns, in_netns, netns_alive, remove_netns
from kvmpod.net.spec import Attachment, DnsConfig, GuestInterface, PortForward, Route
from kvmpod.net.tap import open_tap

log = logging.getLogger(__name__)

NETNS_PREFIX = "kvmpod-"
DEFAULT_CONFIG_DIRS = ("/etc/kvmpod/net.d",)
DEFAULT_PLUGIN_PATH = ("/usr/lib/cni", "/opt/cni/bin")
DEFAULT_TIMEOUT = 60                    # seconds per plugin call
ENV_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_VERSION = re.compile(r"^(\d+)\.(\d+)\.(\d+)$")
_PLUGIN_TYPE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_NETWORK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
_ETH_P_ALL = 0x0003


# --- configuration -------------------------------------------------------------------------------


def _path_list(key: str, default: tuple[str, ...]) -> list[Path]:
    """A list of directories from `[net] KEY` (relative ones are relative to the config file)."""
    found = config.lookup(key, "net")
    if found is None:
        return [Path(p) for p in default]
    value = [found.value] if isinstance(found.value, str) else found.value
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{found.describe(f'[net] {key}')}: {found.value!r} is not a list of directories")
    return [found.source.parent / v for v in value]


def config_dirs() -> list[Path]:
    """`[net] cni-config-dirs`: where network configs are looked up, in order."""
    return _path_list("cni-config-dirs", DEFAULT_CONFIG_DIRS)


def plugin_path() -> list[Path]:
    """`[net] cni-plugin-path`: where plugin binaries are looked up (and the plugins' CNI_PATH)."""
    return _path_list("cni-plugin-path", DEFAULT_PLUGIN_PATH)


def plugin_timeout() -> int:
    """`[net] cni-plugin-timeout`: seconds one plugin call may take."""
    return config.int_setting("cni-plugin-timeout", "net", DEFAULT_TIMEOUT)


def _version(text: str) -> tuple[int, int, int]:
    m = _VERSION.match(text)
    return (int(m[1]), int(m[2]), int(m[3])) if m else (0, 0, 0)


@dataclass(frozen=True)
class NetworkConfig:
    """One network: a .conflist (several plugins, chained) or a .conf/.json (one plugin)."""

    name: str
    cni_version: str
    plugins: tuple[dict[str, Any], ...]
    source: Path
    # capability arguments (CNI conventions: runtimeConfig), given to the plugins that declare them,
    # on ADD and DEL alike: {"portMappings": [...]} for --port
    runtime: dict[str, Any] = dataclasses.field(default_factory=dict)

    def stdin(self, index: int, prev_result: dict[str, Any] | None) -> bytes:
        """What plugin `index` reads (spec: the plugin's config, with the network's name and version
        and, when chained or on DEL, the previous result)."""
        conf = dict(self.plugins[index])
        conf["name"] = self.name
        conf["cniVersion"] = self.cni_version
        conf.pop("prevResult", None)
        conf.pop("runtimeConfig", None)
        found = conf.get("capabilities")
        capabilities: dict[str, Any] = found if isinstance(found, dict) else {}
        wanted = {k: v for k, v in self.runtime.items() if capabilities.get(k) is True}
        if wanted:
            conf["runtimeConfig"] = wanted
        if prev_result is not None:
            conf["prevResult"] = prev_result
        return json.dumps(conf).encode()

    @property
    def del_needs_prev_result(self) -> bool:
        """Since CNI 0.4.0 a DEL gets the ADD's (cached) result as prevResult."""
        return _version(self.cni_version) >= (0, 4, 0)

    def to_record(self) -> dict[str, Any]:
        return {"name": self.name, "cniVersion": self.cni_version, "plugins": list(self.plugins),
                "source": str(self.source), "runtime": self.runtime}

    def has_capability(self, name: str) -> bool:
        return any(isinstance(p.get("capabilities"), dict) and p["capabilities"].get(name) is True
                   for p in self.plugins)

    @classmethod
    def from_record(cls, data: dict[str, Any]) -> "NetworkConfig":
        found = data.get("runtime")
        runtime: dict[str, Any] = found if isinstance(found, dict) else {}
        return cls(str(data["name"]), str(data["cniVersion"]), tuple(data["plugins"]), Path(str(data["source"])),
                   runtime)


def _parse_config(path: Path, data: Any) -> NetworkConfig:
    """A parsed config file, checked field by field (errors name the file and field)."""
    where = str(path)
    if not isinstance(data, dict):
        raise NetworkError(f"{where}: not a JSON object")
    is_list = path.suffix == ".conflist"
    name = data.get("name")
    if not isinstance(name, str) or not _NETWORK_NAME.match(name):
        raise NetworkError(f"{where}: name: {name!r} is not a network name (letters, digits, _ . -)")
    version = data.get("cniVersion")
    if not isinstance(version, str) or not _VERSION.match(version):
        raise NetworkError(f"{where}: cniVersion: {version!r} is not a CNI version like \"1.0.0\"")
    if is_list:
        plugins = data.get("plugins")
        if not isinstance(plugins, list) or not plugins:
            raise NetworkError(f"{where}: plugins: must be a non-empty list of plugin configs")
        fields = [f"plugins[{i}]" for i in range(len(plugins))]
    else:
        plugins = [data]
        fields = [""]
    for field_name, plugin in zip(fields, plugins):
        prefix = f"{field_name}." if field_name else ""
        if not isinstance(plugin, dict):
            raise NetworkError(f"{where}: {field_name}: not a JSON object")
        kind = plugin.get("type")
        if not isinstance(kind, str) or not _PLUGIN_TYPE.match(kind):
            raise NetworkError(f"{where}: {prefix}type: {kind!r} is not a plugin name")
        ipam = plugin.get("ipam")
        if ipam is not None and ipam != {}:
            if not isinstance(ipam, dict) or not isinstance(ipam.get("type"), str) \
                    or not _PLUGIN_TYPE.match(ipam["type"]):
                raise NetworkError(f"{where}: {prefix}ipam.type: "
                                   f"{ipam.get('type') if isinstance(ipam, dict) else ipam!r} is not a plugin name")
    return NetworkConfig(name, version, tuple(plugins), path)


def _config_files(directory: Path) -> list[Path]:
    """A directory's configs as libcni orders them: *.conflist first, then *.conf and *.json, each in
    lexical order."""
    try:
        entries = sorted(p for p in directory.iterdir() if p.is_file())
    except FileNotFoundError:
        return []
    except OSError as e:
        raise NetworkError(f"CNI config directory {directory}: {e.strerror}") from e
    return ([p for p in entries if p.suffix == ".conflist"]
            + [p for p in entries if p.suffix in (".conf", ".json")])


def _read_config(path: Path) -> NetworkConfig:
    try:
        text = path.read_text()
    except OSError as e:
        raise NetworkError(f"{path}: {e.strerror}") from e
    except UnicodeDecodeError as cause:
        raise NetworkError(f"{path}: not UTF-8 text") from cause
    try:
        data = json.loads(text)
    except ValueError as e:
        raise NetworkError(f"{path}: invalid JSON: {e}") from e
    return _parse_config(path, data)


def load_network(name: str, dirs: list[Path] | None = None) -> NetworkConfig:
    """The config whose `name` is NAME: the first in the config dirs (in order) and their files."""
    dirs = config_dirs() if dirs is None else dirs
    seen: list[str] = []
    for directory in dirs:
        for path in _config_files(directory):
            conf = _read_config(path)
            if conf.name == name:
                return conf
            seen.append(conf.name)
    where = ", ".join(str(d) for d in dirs)
    have = f"networks there: {', '.join(sorted(set(seen)))}" if seen else "no network configs there"
    raise NetworkError(f"--net {name}: no CNI network named {name!r} in {where} ({have})")


def network_names(dirs: list[Path] | None = None) -> list[str]:
    """Every network configured in the config dirs, in lookup order, each name once."""
    names: list[str] = []
    for directory in config_dirs() if dirs is None else dirs:
        for path in _config_files(directory):
            name = _read_config(path).name
            if name not in names:
                names.append(name)
    return names


def find_plugin(kind: str, path: list[Path]) -> Path:
    for directory in path:
        candidate = directory / kind
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise NetworkError(f"no executable CNI plugin {kind!r} in {', '.join(str(d) for d in path)} "
                       "([net] cni-plugin-path in kvmpod.toml)")


def check_plugins(conf: NetworkConfig, path: list[Path]) -> None:
    """Every plugin a network names (and its IPAM plugin) exists, before anything is made."""
    for i, plugin in enumerate(conf.plugins):
        prefix = f"plugins[{i}]." if conf.source.suffix == ".conflist" else ""
        for field_name, kind in ((f"{prefix}type", plugin["type"]),
                                 (f"{prefix}ipam.type", (plugin.get("ipam") or {}).get("type"))):
            if kind is None:
                continue
            try:
                find_plugin(kind, path)
            except NetworkError as e:
                raise NetworkError(f"network {conf.name} ({conf.source}): {field_name}: {e}") from e


# --- running plugins -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Invocation:
    """What every plugin call of one pod shares (the CNI_* environment)."""

    container_id: str
    netns: str                  # "" on DEL when the namespace is already gone (spec: optional for DEL)
    path: tuple[Path, ...]
    timeout: float

    def env(self, command: str, ifname: str) -> dict[str, str]:
        return {"CNI_COMMAND": command, "CNI_CONTAINERID": self.container_id, "CNI_NETNS": self.netns,
                "CNI_IFNAME": ifname, "CNI_PATH": ":".join(str(p) for p in self.path),
                "PATH": os.environ.get("PATH") or ENV_PATH}


def _plugin_error(conf: NetworkConfig, kind: str, command: str, text: str) -> NetworkError:
    return NetworkError(f"network {conf.name}: CNI plugin {kind} {command} failed: {text}")


def _one_line(text: str, limit: int = 400) -> str:
    flat = " ".join(text.split())
    return printable(flat if len(flat) <= limit else flat[:limit] + "…")


def run_plugin(conf: NetworkConfig, index: int, command: str, ifname: str, call: Invocation,
               prev_result: dict[str, Any] | None) -> dict[str, Any] | None:
    """One plugin call: no shell, only the CNI variables and PATH, a timeout; its result (ADD) or None.
    A failure raises NetworkError naming the network and plugin, with the CNI error's code, msg and
    details (or the plugin's stderr when it printed no error)."""
    kind = conf.plugins[index]["type"]
    try:
        binary = find_plugin(kind, list(call.path))
    except NetworkError as e:   # gone since ADD, or at gc with another plugin path
        raise _plugin_error(conf, kind, command, str(e)) from e
    try:
        proc = subprocess.Popen([str(binary)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=call.env(command, ifname), cwd="/",
                                start_new_session=True, close_fds=True)
    except OSError as e:
        raise _plugin_error(conf, kind, command, f"cannot run {binary}: {e.strerror}") from e
    try:
        out, err = proc.communicate(conf.stdin(index, prev_result), timeout=call.timeout)
    except subprocess.TimeoutExpired as cause:
        _kill_group(proc)
        raise _plugin_error(conf, kind, command, f"no answer within {call.timeout:g} s "
                                                 "([net] cni-plugin-timeout)") from cause
    except BaseException:
        _kill_group(proc)
        raise
    if proc.returncode != 0:
        raise _plugin_error(conf, kind, command, _describe_failure(proc.returncode, out, err))
    if command != "ADD":
        return None
    try:
        result = json.loads(out)
        if not isinstance(result, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        said = _one_line(out.decode(errors="replace"))
        raise _plugin_error(conf, kind, command, f"its result is not JSON ({e}): {said}") from e
    return result


def _kill_group(proc: subprocess.Popen) -> None:
    """The plugin and what it started (an IPAM plugin) go."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.communicate()


def _describe_failure(returncode: int, out: bytes, err: bytes) -> str:
    try:
        data = json.loads(out)
    except ValueError:
        data = None
    if isinstance(data, dict) and ("msg" in data or "code" in data):
        text = str(data.get("msg") or "(no message)")
        if data.get("details"):
            text += f": {data['details']}"
        if data.get("code") is not None:
            text += f" (CNI error code {data['code']})"
        return _one_line(text)
    status = f"killed by signal {-returncode}" if returncode < 0 else f"exit status {returncode}"
    said = _one_line(err.decode(errors="replace") or out.decode(errors="replace"))
    return f"{status}" + (f": {said}" if said else "")


def add_network(conf: NetworkConfig, ifname: str, call: Invocation,
                progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """CNI ADD of each plugin in order, each given the previous one's result; the last result.
    `progress` sees each plugin's result as it arrives (so a DEL after a failure gets the latest)."""
    result: dict[str, Any] | None = None
    for index in range(len(conf.plugins)):
        result = run_plugin(conf, index, "ADD", ifname, call, result)
        if progress is not None and result is not None:
            progress(result)
    assert result is not None
    return result


def del_network(conf: NetworkConfig, ifname: str, call: Invocation, result: dict[str, Any] | None) -> None:
    """CNI DEL of each plugin, last first (with the ADD's result from CNI 0.4.0 on); every plugin is
    tried, the first failure is raised."""
    prev = result if conf.del_needs_prev_result else None
    first: NetworkError | None = None
    for index in reversed(range(len(conf.plugins))):
        try:
            run_plugin(conf, index, "DEL", ifname, call, prev)
        except NetworkError as e:
            first = first or e
    if first is not None:
        raise first


# --- results -------------------------------------------------------------------------------------


def normalize_result(result: dict[str, Any]) -> dict[str, Any]:
    """A result in the current form (interfaces, ips, routes, dns): CNI 0.1/0.2 results (ip4, ip6)
    are converted as libcni does."""
    if "ip4" not in result and "ip6" not in result:
        return result
    ips: list[dict[str, Any]] = []
    routes: list[dict[str, Any]] = []
    for key in ("ip4", "ip6"):
        block = result.get(key)
        if not isinstance(block, dict):
            continue
        entry = {"address": block.get("ip")}
        if block.get("gateway"):
            entry["gateway"] = block["gateway"]
        ips.append(entry)
        routes += block.get("routes") or []
    return {"cniVersion": result.get("cniVersion"), "ips": ips, "routes": routes, "dns": result.get("dns") or {}}


def _bad_result(network: str, text: str) -> NetworkError:
    return NetworkError(f"network {network}: the CNI result {text}")


def interface_from_result(network: str, result: dict[str, Any], ifname: str, mac: str, mtu: int) -> GuestInterface:
    """The guest's view of network `network`: the addresses of `ifname` in the result, and its routes
    (a route without gw goes through the interface's gateway of its family, as the plugins' own
    ipam.ConfigureIface does; without one it is on-link)."""
    result = normalize_result(result)
    interfaces = result.get("interfaces") or []
    if not isinstance(interfaces, list):
        raise _bad_result(network, "has interfaces that are not a list")
    addresses: list[str] = []
    gateways: dict[int, str] = {}
    for i, ip in enumerate(result.get("ips") or []):
        if not isinstance(ip, dict):
            raise _bad_result(network, f"has ips[{i}] that is not an object")
        which = ip.get("interface")
        if which is not None:
            if not isinstance(which, int) or not 0 <= which < len(interfaces) \
                    or not isinstance(interfaces[which], dict):
                raise _bad_result(network, f"has ips[{i}].interface {which!r} that names no interface")
            if interfaces[which].get("name") != ifname or not interfaces[which].get("sandbox"):
                continue   # an address of the host side (or of another interface)
        try:
            address = ipaddress.ip_interface(str(ip.get("address")))
            gateway = ipaddress.ip_address(ip["gateway"]) if ip.get("gateway") else None
        except ValueError as e:
            raise _bad_result(network, f"has ips[{i}] with a bad address or gateway: {ip!r}") from e
        addresses.append(str(address))
        if gateway is not None:
            gateways.setdefault(address.version, str(gateway))
    routes: list[Route] = []
    for i, route in enumerate(result.get("routes") or []):
        try:
            if not isinstance(route, dict):
                raise ValueError
            dst = ipaddress.ip_network(str(route.get("dst")), strict=False)
            gw = ipaddress.ip_address(route["gw"]) if route.get("gw") else None
        except ValueError as e:
            raise _bad_result(network, f"has routes[{i}] with a bad dst or gw: {route!r}") from e
        via = str(gw) if gw is not None else gateways.get(dst.version)
        routes.append(Route(str(dst), via))
    return GuestInterface(mac, ifname, mtu, tuple(addresses), tuple(dict.fromkeys(routes)))


def gateways_of(result: dict[str, Any], ifname: str) -> list[str]:
    """The gateways the result gives `ifname`'s addresses, in order."""
    result = normalize_result(result)
    interfaces = result.get("interfaces") or []
    out = []
    for ip in result.get("ips") or []:
        which = ip.get("interface")
        if which is not None and isinstance(which, int) and 0 <= which < len(interfaces) \
                and interfaces[which].get("name") != ifname:
            continue
        if ip.get("gateway"):
            out.append(str(ipaddress.ip_address(ip["gateway"])))
    return out


def add_default_routes(interfaces: list[GuestInterface], gateways: list[list[str]]) -> list[GuestInterface]:
    """Where no network's result has any route of a family, the first network with a gateway of that
    family gets the default route through it: one default route, never one per network; a network
    whose routes are explicit keeps exactly those."""
    out = list(interfaces)
    for version, default in ((4, "0.0.0.0/0"), (6, "::/0")):
        if any(ipaddress.ip_network(r.destination).version == version for i in out for r in i.routes):
            continue
        for n, candidates in enumerate(gateways):
            gw = next((g for g in candidates if ipaddress.ip_address(g).version == version), None)
            if gw is not None:
                out[n] = dataclasses.replace(out[n], routes=(*out[n].routes, Route(default, gw)))
                break
    return out


def _clean_word(network: str, value: Any, what: str) -> str:
    if not isinstance(value, str) or not value or any(c.isspace() or ord(c) < 32 for c in value):
        raise _bad_result(network, f"has a dns {what} that is not one word: {value!r}")
    return value


def dns_from_result(network: str, result: dict[str, Any]) -> DnsConfig | None:
    dns = normalize_result(result).get("dns") or {}
    if not isinstance(dns, dict):
        raise _bad_result(network, "has dns that is not an object")
    servers = []
    for server in dns.get("nameservers") or []:
        try:
            servers.append(str(ipaddress.ip_address(server)))
        except ValueError as e:
            raise _bad_result(network, f"has a dns nameserver that is not an address: {server!r}") from e
    search = [_clean_word(network, s, "search domain") for s in dns.get("search") or []]
    if not search and dns.get("domain"):
        search = [_clean_word(network, dns["domain"], "domain")]
    options = [_clean_word(network, o, "option") for o in dns.get("options") or []]
    if not (servers or search or options):
        return None
    return DnsConfig(tuple(servers), tuple(search), tuple(options))


# --- network namespaces --------------------------------------------------------------------------


def netns_path(pod_uuid: str) -> Path:
    return NETNS_DIR / f"{NETNS_PREFIX}{pod_uuid}"



# --- the veth ↔ tap join -------------------------------------------------------------------------


def _redirect(ipr: Any, source: int, target: int) -> None:
    """Every frame arriving on `source` leaves by `target` (ingress qdisc, match-all u32, mirred)."""
    ipr.tc("add", "ingress", source, "ffff:")
    ipr.tc("add-filter", "u32", source, ":1", parent="ffff:", protocol=_ETH_P_ALL, keys=["0x0/0x0+0"],
           target=0x10020, action=[{"kind": "mirred", "direction": "egress", "action": "redirect",
                                    "ifindex": target}])


def interface_facts(netns: Path, ifname: str) -> tuple[str, int]:
    """The MAC and MTU of `ifname` in the pod's namespace."""
    def look() -> tuple[str, int]:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            found = ipr.link_lookup(ifname=ifname)
            if not found:
                raise NetworkError(f"no interface {ifname}")
            link = ipr.get_links(found[0])[0]
            return str(link.get_attr("IFLA_ADDRESS")).lower(), int(link.get_attr("IFLA_MTU"))
    return in_netns(netns, look)


def join_tap(netns: Path, ifname: str, tap: str, mtu: int) -> None:
    """Tap up with the interface's MTU, and tc redirects both ways between the two."""
    def join() -> None:
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError

        try:   # the namespace's own IPv6 (router solicitations, DAD) stays off the guest's wire
            with open(f"/proc/sys/net/ipv6/conf/{tap}/disable_ipv6", "w") as f:
                f.write("1")
        except OSError:
            pass   # no IPv6 on this host
        with IPRoute() as ipr:
            try:
                veth, tap_index = ipr.link_lookup(ifname=ifname)[0], ipr.link_lookup(ifname=tap)[0]
                ipr.link("set", index=tap_index, mtu=mtu, state="up")
                ipr.link("set", index=veth, state="up")
                _redirect(ipr, veth, tap_index)
                _redirect(ipr, tap_index, veth)
            except IndexError as cause:
                raise NetworkError(f"{ifname} or {tap} vanished from {netns}") from cause
            except NetlinkError as e:
                raise NetworkError(f"tc redirect {ifname} <-> {tap}: {os.strerror(e.code) if e.code else e}") from e
    in_netns(netns, join)


# --- attach and release --------------------------------------------------------------------------


def port_mappings(forwards: list[PortForward]) -> list[dict[str, Any]]:
    """--port as the portMappings capability argument (CNI conventions), one entry per port."""
    return [{"hostPort": f.host_port + i, "containerPort": f.guest_port + i, "protocol": f.protocol,
             **({"hostIP": f.host_ip} if f.host_ip else {})} for f in forwards for i in range(f.count)]


def attach(names: list[str], pod_uuid: str, pod_path: Path, remember: Callable[[dict[str, Any]], None],
           forwards: list[PortForward] | None = None, config_dirs: list[Path] | None = None) -> list[Attachment]:
    """The pod's namespace, each network's ADD there and a tap joined to its interface; on any failure
    everything made so far is undone and NetworkError raised. `forwards` (--port) go to the plugins
    with the portMappings capability (e.g. portmap) of every network. `config_dirs`: where the configs
    are (default: [net] cni-config-dirs)."""
    path = plugin_path()
    confs = [load_network(name, config_dirs) for name in names]
    if forwards:
        if not any(conf.has_capability("portMappings") for conf in confs):
            raise NetworkError(f"--port with --net {','.join(names)}: no plugin of "
                               f"{'that network' if len(names) == 1 else 'those networks'} has the portMappings "
                               'capability (add {"type": "portmap", "capabilities": {"portMappings": true}})')
        confs = [dataclasses.replace(conf, runtime={"portMappings": port_mappings(forwards)}) for conf in confs]
    for conf in confs:
        check_plugins(conf, path)
    netns = netns_path(pod_uuid)
    call = Invocation(pod_uuid, str(netns), tuple(path), plugin_timeout())
    record: dict[str, Any] = {"kind": "cni", "container_id": pod_uuid, "netns": str(netns),
                              "plugin_path": [str(p) for p in path], "timeout": call.timeout, "networks": []}
    remember(record)   # before the namespace exists: a crash from here on leaves what release() needs
    fds: list[int] = []
    interfaces: list[GuestInterface] = []
    gateways: list[list[str]] = []
    dns: list[DnsConfig | None] = []
    try:
        create_netns(netns)
        for i, conf in enumerate(confs):
            ifname, tap = f"eth{i}", f"tap{i}"
            entry: dict[str, Any] = {**conf.to_record(), "ifname": ifname, "state": "adding", "result": None}
            record["networks"].append(entry)
            remember(record)

            def progress(partial: dict[str, Any], entry: dict[str, Any] = entry) -> None:
                entry["result"] = partial
                remember(record)

            result = add_network(conf, ifname, call, progress)
            entry["state"] = "added"
            remember(record)
            write_atomically(pod_path / f"cni-{conf.name}.json", json.dumps(result, indent=2).encode() + b"\n",
                             mode=0o600)
            try:
                mac, mtu = interface_facts(netns, ifname)
            except NetworkError as e:
                kinds = ", ".join(p["type"] for p in conf.plugins)
                raise NetworkError(f"network {conf.name}: after CNI ADD, {e} in {netns}: its plugins ({kinds}) "
                                   "made no interface for the pod") from e
            interfaces.append(interface_from_result(conf.name, result, ifname, mac, mtu))
            gateways.append(gateways_of(result, ifname))
            dns.append(dns_from_result(conf.name, result))
            fds.append(open_tap(tap, netns))
            try:
                join_tap(netns, ifname, tap, mtu)
            except NetworkError as e:
                raise NetworkError(f"network {conf.name}: {e}") from e
            log.debug("network %s: %s %s mtu %d %s", conf.name, ifname, mac, mtu, interfaces[-1].addresses)
    except BaseException:
        for fd in fds:
            os.close(fd)
        try:
            release(record)
        except NetworkError as e:
            log.warning("undoing the pod's CNI networks: %s", e)   # net.json keeps the record for gc
        else:
            record.update(networks=[], netns=None)   # undone: nothing is left for a later release
            remember(record)
        raise
    interfaces = add_default_routes(interfaces, gateways)
    return [Attachment(conf.name, interface, record, tap_fd=fd, dns=d)
            for conf, interface, fd, d in zip(confs, interfaces, fds, dns)]


def _record_netns(record: dict[str, Any]) -> Path | None:
    """The record's namespace, only if it is one of kvmpod's (net.json is never trusted to name
    another mount)."""
    text = record.get("netns")
    if not isinstance(text, str):
        return None
    path = Path(text)
    if path.parent != NETNS_DIR or not path.name.startswith(NETNS_PREFIX) or "/" in path.name[len(NETNS_PREFIX):]:
        raise NetworkError(f"net.json names {text!r}, not a kvmpod network namespace: not touched")
    return path


def release(record: dict[str, Any]) -> None:
    """CNI DEL of each network (last first), then the namespace goes. Idempotent: DEL may be repeated
    (the spec asks plugins to allow it), a missing namespace is fine. When the namespace is already
    gone (its last holder died), DEL runs with an empty CNI_NETNS, as the spec allows. A plugin that
    fails is reported after the rest was tried."""
    netns = _record_netns(record)
    alive = netns is not None and netns_alive(netns)
    path = tuple(Path(p) for p in record.get("plugin_path") or []) or tuple(plugin_path())
    timeout = record.get("timeout")
    call = Invocation(str(record.get("container_id", "")), str(netns) if alive else "", path,
                      float(timeout) if isinstance(timeout, (int, float)) else float(DEFAULT_TIMEOUT))
    errors: list[NetworkError] = []
    for entry in reversed(record.get("networks") or []):
        try:
            conf = NetworkConfig.from_record(entry)
            del_network(conf, str(entry.get("ifname", "eth0")), call,
                        entry.get("result") if isinstance(entry.get("result"), dict) else None)
        except NetworkError as e:
            errors.append(e)
        except (KeyError, TypeError, ValueError) as e:
            errors.append(NetworkError(f"net.json: a CNI network record is unreadable ({e})"))
    if netns is not None:
        try:
            remove_netns(netns)
        except NetworkError as e:
            errors.append(e)
    if errors:
        more = f" (and {len(errors) - 1} more failure{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
        raise NetworkError(f"{errors[0]}{more}")
