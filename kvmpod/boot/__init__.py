"""Boot assets for the guest VM: the kernel (kernel.py, distro.py), its modules (modules.py) and
the initrd holding the guest agent (initrd.py). See docs/kernel.md.

The names below are imported lazily, so `python -m kvmpod.boot.kernel` etc. run cleanly.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "GuestKernel": "kvmpod.boot.kernel",
    "find_kernel": "kvmpod.boot.kernel",
    "build_initrd": "kvmpod.boot.initrd",
    "find_agent": "kvmpod.boot.initrd",
    "guest_module_names": "kvmpod.boot.modules",
    "resolve_modules": "kvmpod.boot.modules",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
