"""kvmpod: run App Container images, each in its own lightweight QEMU/KVM virtual machine.

The Python API (docs/api.md) — kvmpod.Pod, kvmpod.run, kvmpod.App, kvmpod.PodResult and the exceptions
of kvmpod.errors — is imported on first use (module __getattr__): the CLI imports this package at every
start and must not pay for it.
"""

from __future__ import annotations

from kvmpod.version import __version__

__all__ = ["__version__"]

_API = {"App", "AppExitError", "DEVNULL", "PIPE", "Pod", "PodProcess", "PodResult", "PodTimeout", "run"}


def __getattr__(name: str) -> object:
    if name in _API:
        from kvmpod import api

        return getattr(api, name)
    if name.endswith("Error") or name in ("GuestPanic", "GuestFault", "Interrupted"):
        from kvmpod import errors

        if isinstance(found := getattr(errors, name, None), type):
            return found
    raise AttributeError(f"module 'kvmpod' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})
