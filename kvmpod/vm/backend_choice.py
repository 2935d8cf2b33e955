"""Which VM backend runs a pod: `--backend` / `[vm] backend` (qemu, the default, or libvirt), and the
libvirt URI: `--libvirt-uri` / `[vm] libvirt-uri`, else qemu:///system as root, qemu:///session
otherwise (docs/libvirt.md). Imports neither libvirt nor asyncio: planning asks it first."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

from kvmpod.config import lookup
from kvmpod.errors import ConfigError, KvmpodError

BACKENDS = ("qemu", "libvirt")
INSTALL_HINT = ("--backend libvirt needs libvirt-python: pip install 'kvmpod[libvirt]' "
                "(it builds against Debian's libvirt-dev and pkg-config; `make setup` installs both)")


@dataclass(frozen=True)
class BackendChoice:
    name: str           # "qemu" | "libvirt"
    uri: str = ""       # libvirt's connection URI (libvirt only)


def libvirt_installed() -> bool:
    """Whether libvirt-python can be imported (without importing it: it is heavy)."""
    return importlib.util.find_spec("libvirt") is not None


def default_uri() -> str:
    return "qemu:///system" if os.geteuid() == 0 else "qemu:///session"


def _setting(key: str) -> str | None:
    found = lookup(key, "vm")
    if found is None:
        return None
    if not isinstance(found.value, str) or not found.value:
        raise ConfigError(f"{found.describe(f'[vm] {key}')}: {found.value!r} is not a non-empty string")
    return found.value


def choose_backend(requested: str | None, uri: str | None) -> BackendChoice:
    name = requested or _setting("backend") or "qemu"
    if name not in BACKENDS:
        raise ConfigError(f"[vm] backend: unknown VM backend {name!r} (choose from {', '.join(BACKENDS)})")
    if name == "qemu":
        if uri:
            raise ConfigError("--libvirt-uri: the QEMU backend takes none (add --backend libvirt)")
        return BackendChoice("qemu")
    if not libvirt_installed():
        raise KvmpodError(INSTALL_HINT)
    return BackendChoice("libvirt", uri or _setting("libvirt-uri") or default_uri())
