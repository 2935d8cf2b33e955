"""Which QEMU binary pods run, in this order:

1. ``$KVMPOD_QEMU`` (a path);
2. ``qemu = "PATH"`` in a config file;
3. kvmpod's own build (kvmpod/vm/qemu_build.py, `kvmpod setup`) in <cache>/qemu/ (other users than
   root also look in root's, /var/cache/kvmpod/qemu/), if it was built for the Debian QEMU installed now;
4. ``qemu-system-x86_64`` on PATH (Debian's).

A build made for another Debian QEMU than the installed one (apt upgraded qemu-system-x86, perhaps
with security fixes the build lacks) is not used: pods get Debian's binary and a notice to rebuild.
This runs on every `kvmpod run`, so it only reads a small JSON file and stats two binaries.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from kvmpod import config, paths
from kvmpod.errors import VMError

QEMU_NAME = "qemu-system-x86_64"
DEBIAN_QEMU = Path("/usr/bin") / QEMU_NAME
BUILD_JSON = "qemu.json"
DIR_PREFIX = "kvmpod-qemu-"
ENV_VAR = "KVMPOD_QEMU"
# Where `kvmpod setup` run as root puts the build; other users look there after their own cache.
SYSTEM_QEMU_DIR = Path("/var/cache/kvmpod/qemu")


def qemu_dir(cache: Path | None = None) -> Path:
    return (cache or paths.cache_dir()) / "qemu"


def qemu_dirs(cache: Path | None = None) -> list[Path]:
    """The build caches searched: the user's, then the system one (unless a cache is named)."""
    dirs = [qemu_dir(cache)]
    if cache is None and "KVMPOD_CACHE_DIR" not in os.environ and SYSTEM_QEMU_DIR not in dirs:
        dirs.append(SYSTEM_QEMU_DIR)
    return dirs


def binary_identity(path: Path) -> dict[str, object] | None:
    """What tells one install of a binary from the next (None: not there)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def read_build_meta(entry: Path) -> dict[str, object] | None:
    try:
        meta = json.loads((entry / BUILD_JSON).read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


@dataclass(frozen=True)
class QemuChoice:
    path: Path
    source: str                   # where the choice came from, for --debug and errors
    notice: str | None = None     # set when kvmpod's build was passed over


def _explicit(value: str, source: str) -> QemuChoice:
    path = Path(value)
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise VMError(f"QEMU binary {value} ({source}): not an executable file")
    return QemuChoice(path, source)


def _own_build(cache: Path | None) -> tuple[Path | None, str | None]:
    """kvmpod's build if it matches the installed Debian QEMU; else (None, why it was passed over)."""
    entries: list[Path] = []
    for root in qemu_dirs(cache):
        try:
            entries += sorted(root.glob(f"{DIR_PREFIX}*"))
        except OSError:
            pass
    debian = binary_identity(DEBIAN_QEMU)
    stale = None
    for entry in entries:
        meta = read_build_meta(entry)
        if not meta or not (entry / QEMU_NAME).is_file():
            continue
        if meta.get("debian_binary") == debian:
            return entry / QEMU_NAME, None
        stale = (f"kvmpod's QEMU build {entry.name} was made for another {DEBIAN_QEMU} than the one installed "
                 f"now: using Debian's (slower, more memory per pod) until `kvmpod setup --qemu-only` rebuilds it")
    return None, stale


@functools.lru_cache(maxsize=None)
def find_qemu(cache: Path | None = None) -> QemuChoice:
    """The QEMU binary to run (order in the module docstring). Cached: one answer per process."""
    if value := os.environ.get(ENV_VAR):
        return _explicit(value, f"${ENV_VAR}")
    if (found := config.lookup("qemu")) is not None:
        if not isinstance(found.value, str) or not found.value:
            raise VMError(f"\"qemu\" in config file {found.source} must be a non-empty path")
        return _explicit(str(found.source.parent / found.value), f"qemu in {found.source}")
    own, passed_over = _own_build(cache)
    if own is not None:
        return QemuChoice(own, "kvmpod's build")
    on_path = shutil.which(QEMU_NAME)
    if on_path is None:
        raise VMError(f"{QEMU_NAME}: not found (apt-get install qemu-system-x86)")
    return QemuChoice(Path(on_path), "PATH", passed_over)
