"""Host-local IP allocation for the default network, in the style of CNI's host-local plugin.

One directory per network: a file per leased address, named by the address and holding the owning
pod's UUID, plus `last_reserved_ip` so addresses are handed out round-robin (a just-freed address is
not reused at once, which keeps stale ARP entries and conntrack state from hitting a new pod). Every
change happens under the directory's flock, so concurrent `kvmpod run`s never share an address.
A lease whose pod directory is gone (its kvmpod was killed and the pod removed by hand) is taken back.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from kvmpod.errors import NetworkError
from kvmpod.fsutil import write_atomically
from kvmpod.store.locks import exclusive

LAST_RESERVED = "last_reserved_ip"


class LeasePool:
    def __init__(self, directory: Path, subnet: ipaddress.IPv4Network, gateway: ipaddress.IPv4Address):
        self.directory = directory
        self.subnet = subnet
        self.gateway = gateway

    @contextmanager
    def locked(self) -> Iterator[None]:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o755)
        with exclusive(self.directory / "lock"):
            yield

    def leases(self) -> dict[ipaddress.IPv4Address, str]:
        """Address → owner, from the lease files (caller holds the lock)."""
        out = {}
        for entry in self.directory.iterdir() if self.directory.is_dir() else []:
            try:
                address = ipaddress.IPv4Address(entry.name)
            except ValueError:
                continue
            try:
                out[address] = entry.read_text().strip()
            except OSError:
                continue
        return out

    def allocate(self, owner: str, owner_gone: Callable[[str], bool]) -> ipaddress.IPv4Address:
        """A free address of the subnet for `owner` (the gateway, network and broadcast addresses
        excepted), round-robin after the last one handed out."""
        with self.locked():
            leases = self.leases()
            for address, holder in list(leases.items()):
                if holder != owner and owner_gone(holder):
                    self._drop(address)
                    del leases[address]
            hosts = [a for a in self.subnet.hosts() if a != self.gateway]
            last = self._last_reserved()
            start = hosts.index(last) + 1 if last in hosts else 0
            for address in hosts[start:] + hosts[:start]:
                if address in leases:
                    continue
                path = self.directory / str(address)
                try:
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
                except FileExistsError:
                    continue
                with os.fdopen(fd, "w") as f:
                    f.write(owner)
                write_atomically(self.directory / LAST_RESERVED, str(address).encode())
                return address
        raise NetworkError(f"network {self.directory.name}: no free address left in {self.subnet} "
                           f"({len(leases)} leased; `kvmpod gc` frees those of ended pods)")

    def release(self, owner: str) -> list[str]:
        """Free every lease `owner` holds; returns the addresses freed."""
        freed: list[str] = []
        if not self.directory.is_dir():
            return freed
        with self.locked():
            for address, holder in self.leases().items():
                if holder == owner:
                    self._drop(address)
                    freed.append(str(address))
        return freed

    def _drop(self, address: ipaddress.IPv4Address) -> None:
        try:
            (self.directory / str(address)).unlink()
        except FileNotFoundError:
            pass

    def _last_reserved(self) -> ipaddress.IPv4Address | None:
        try:
            return ipaddress.IPv4Address((self.directory / LAST_RESERVED).read_text().strip())
        except (OSError, ValueError):
            return None
