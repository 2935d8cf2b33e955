"""What the installed package carries, and where: its data files and its two C programs.

A wheel holds everything kvmpod needs at run time that is not built per machine: the data files under
kvmpod/*/data, schema/ and agent/protocol.toml (plain files in the package; the toml is the protocol's
definition, which agent/messages.py and the agent's build are generated from), and the static guest agent
and kvmpod-relay, compiled while the wheel is built (setup.py) into kvmpod/libexec/. Guest kernels and
kvmpod's QEMU are per machine: `kvmpod setup` builds them into the cache (kvmpod/provision.py).

Running from a source checkout is the special case: there kvmpod/libexec/ does not exist and the
programs come from `make agent` (guest-agent/build/). A checkout is recognised by its guest agent
sources and pyproject.toml next to the package directory, never assumed.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
LIBEXEC = PACKAGE_DIR / "libexec"          # the wheel's compiled programs (setup.py puts them there)
SYSTEM_LIBEXEC = Path("/usr/lib/kvmpod")   # a distribution package's copies (`make install PREFIX=/usr`)
PROGRAMS = ("kvmpod-agent", "kvmpod-relay")


@functools.lru_cache(maxsize=1)
def checkout() -> Path | None:
    """The source checkout the package is loaded from (an editable install, `python -m kvmpod` in the
    tree), or None for an installed package."""
    root = PACKAGE_DIR.parent
    if (root / "guest-agent" / "Makefile").is_file() and (root / "pyproject.toml").is_file():
        return root
    return None


def program_candidates(name: str) -> list[Path]:
    """Where the C program `name` is looked for, in order: the package's own copy, the checkout's
    build, the system copy."""
    if name not in PROGRAMS:
        raise ValueError(f"unknown kvmpod program {name!r}")
    candidates = [LIBEXEC / name]
    if (root := checkout()) is not None:
        candidates.append(root / "guest-agent" / "build" / name)
    candidates.append(SYSTEM_LIBEXEC / name)
    return candidates


def find_program(name: str) -> Path | None:
    """The first executable copy of `name` (kvmpod-agent, kvmpod-relay), or None."""
    for candidate in program_candidates(name):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def missing_program_hint(name: str) -> str:
    """What to do when `name` is nowhere: build it in the checkout, or reinstall the package."""
    if checkout() is not None:
        return "run `make agent`"
    return f"this kvmpod installation lacks {LIBEXEC / name}: reinstall kvmpod (docs/install.md)"


def data_file(package_dir: str, *parts: str) -> Path:
    """A data file shipped inside the package, e.g. data_file("boot", "data", "guest-modules.txt")."""
    return PACKAGE_DIR.joinpath(package_dir, *parts)
