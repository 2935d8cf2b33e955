"""The default network's NAT, in an nftables table of its own (`ip kvmpod`), through the `nft` tool.

The rules never change once made: egress masquerade for the subnet, and DNAT through two maps that
hold the --port forwards (any host address; one host address). A pod adds and deletes only map
elements, each keyed by what it forwards, so pods never touch each other's state, `nft` refuses a
host port that another pod holds (the element exists), and gc can undo a crashed pod's forwards from
its pod directory alone. `nft delete table ip kvmpod` removes every trace.
"""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
from collections.abc import Iterable

from kvmpod.errors import NetworkError
from kvmpod.net.spec import PortForward

TABLE = "kvmpod"


def _ruleset(subnet: ipaddress.IPv4Network, bridge: str) -> str:
    return f"""
table ip {TABLE} {{
  map ports {{
    type inet_proto . inet_service : ipv4_addr . inet_service
    comment "kvmpod --port NAME:HOSTPORT: protocol . host port -> pod address . port"
  }}
  map ports_on {{
    type ipv4_addr . inet_proto . inet_service : ipv4_addr . inet_service
    comment "kvmpod --port NAME:HOSTIP:HOSTPORT: host address . protocol . host port -> pod address . port"
  }}
  chain prerouting {{
    type nat hook prerouting priority dstnat; policy accept;
    fib daddr type local dnat ip to ip daddr . meta l4proto . th dport map @ports_on
    fib daddr type local dnat ip to meta l4proto . th dport map @ports
  }}
  chain output {{
    type nat hook output priority -100; policy accept;
    fib daddr type local dnat ip to ip daddr . meta l4proto . th dport map @ports_on
    fib daddr type local dnat ip to meta l4proto . th dport map @ports
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    ip saddr {subnet} ip daddr != {subnet} masquerade comment "pods reach the outside world"
    oifname "{bridge}" ip saddr 127.0.0.0/8 masquerade comment "--port forwards from the host's localhost"
    oifname "{bridge}" ip saddr {subnet} ct status dnat masquerade comment "a pod reaching a pod through a host port"
  }}
}}
"""


def nft_binary() -> str:
    """The `nft` tool kvmpod runs (/usr/sbin is not on every user's PATH)."""
    return shutil.which("nft") or "/usr/sbin/nft"


def _nft(script: str, what: str) -> None:
    binary = nft_binary()
    try:
        out = subprocess.run([binary, "-f", "-"], input=script.encode(), capture_output=True, timeout=30)
    except FileNotFoundError as e:
        raise NetworkError("nft: not found (apt-get install nftables)") from e
    if out.returncode:
        detail = out.stderr.decode(errors="replace").strip().splitlines()
        raise NetworkError(f"{what}: nft: {detail[0] if detail else f'exit status {out.returncode}'}")


def table_exists() -> bool:
    binary = nft_binary()
    try:
        return subprocess.run([binary, "list", "table", "ip", TABLE], capture_output=True, timeout=30).returncode == 0
    except FileNotFoundError:
        return False


def ensure_table(subnet: ipaddress.IPv4Network, bridge: str) -> None:
    """Create the table if it is missing (the caller holds the network's lock, so no one races it)."""
    if not table_exists():
        _nft(_ruleset(subnet, bridge), f"create nftables table ip {TABLE}")


def _elements(forwards: Iterable[PortForward], pod_ip: str | None) -> list[tuple[str, str]]:
    """(map, element) per forwarded port; without pod_ip the keys only (for deletion)."""
    out = []
    for fwd in forwards:
        for i in range(fwd.count):
            key = f"{fwd.protocol} . {fwd.host_port + i}"
            if fwd.host_ip:
                key = f"{fwd.host_ip} . {key}"
            value = f" : {pod_ip} . {fwd.guest_port + i}" if pod_ip else ""
            out.append(("ports_on" if fwd.host_ip else "ports", key + value))
    return out


def add_forwards(forwards: list[PortForward], pod_ip: str) -> None:
    """All the pod's forwards in one transaction: all made, or none (a host port held by another pod)."""
    if not forwards:
        return
    script = "".join(f"create element ip {TABLE} {m} {{ {e} }}\n" for m, e in _elements(forwards, pod_ip))
    try:
        _nft(script, "forward ports")
    except NetworkError as e:
        if "File exists" in str(e):
            raise NetworkError("--port: a host port of " + ", ".join(f.describe() for f in forwards)
                               + " is forwarded to another pod already") from e
        raise


def remove_forwards(forwards: list[PortForward]) -> None:
    """Delete the pod's forwards; those already gone (a second gc, a flushed table) are skipped."""
    if not forwards or not table_exists():
        return
    for m, e in _elements(forwards, None):
        try:
            _nft(f"delete element ip {TABLE} {m} {{ {e} }}\n", "remove port forward")
        except NetworkError as err:
            if "No such file or directory" not in str(err):
                raise


def forwarded_to() -> list[tuple[str, str, str]]:
    """Every forward in the maps as (map, key, pod address), for gc's sweep."""
    import json

    binary = shutil.which("nft") or "/usr/sbin/nft"
    out = []
    for name in ("ports", "ports_on"):
        try:
            listing = subprocess.run([binary, "-j", "list", "map", "ip", TABLE, name], capture_output=True,
                                     timeout=30)
        except FileNotFoundError:
            return []
        if listing.returncode:
            continue
        for item in json.loads(listing.stdout or b"{}").get("nftables", []):
            for key, value in item.get("map", {}).get("elem", []):
                key_parts = key["concat"] if isinstance(key, dict) else [key]
                out.append((name, " . ".join(str(k) for k in key_parts), str(value["concat"][0])))
    return out


def remove_elements(elements: list[tuple[str, str]]) -> None:
    if elements:
        _nft("".join(f"delete element ip {TABLE} {m} {{ {k} }}\n" for m, k in elements), "remove port forwards")
