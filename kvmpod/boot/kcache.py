"""The guest-kernel cache, shared by the distro fetcher and the minimal-kernel builder.

Where kernels live (<cache>/kernels/<name>/ with kernel.json), the lock that serialises installs
into it, the atomic swap of a finished kernel dir, and running the external tools both need
(apt, dpkg, depmod, tar, patch, make) with one-line errors. kvmpod's QEMU build
(kvmpod/vm/qemu_build.py) uses the same lock, swap and tool runner for its own cache directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from kvmpod import paths
from kvmpod.errors import KernelError, KvmpodError

if TYPE_CHECKING:
    import argparse

KERNEL_JSON = "kernel.json"

# Which Debian package provides a tool, for the "not found" message.
_TOOLS = {"apt-cache": "apt", "apt-get": "apt", "dpkg": "dpkg", "depmod": "kmod", "tar": "tar", "patch": "patch",
          "make": "make", "dpkg-source": "dpkg-dev", "strip": "binutils"}


def kernels_dir(cache: Path | None = None) -> Path:
    return (cache or paths.cache_dir()) / "kernels"


def tail(text: str, limit: int = 240) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    tail = " / ".join(lines[-3:])
    return tail if len(tail) <= limit else "..." + tail[-limit:]


# Tools such as depmod live in sbin, which an ordinary user's PATH (Debian's default) does not have.
_SBIN = "/usr/local/sbin:/usr/sbin:/sbin"


def run_tool(cmd: list[str], cwd: Path | None = None, error: type[KvmpodError] = KernelError) -> str:
    """Run a command (C locale), return its stdout; `error` with the stderr tail if it fails."""
    env = dict(os.environ, LC_ALL="C", LANG="C", DEBIAN_FRONTEND="noninteractive")
    exe = cmd[0] if "/" in cmd[0] else shutil.which(cmd[0]) or shutil.which(cmd[0], path=_SBIN) or cmd[0]
    try:
        proc = subprocess.run([exe, *cmd[1:]], cwd=cwd, env=env, capture_output=True, text=True, errors="replace")
    except FileNotFoundError as e:
        raise error(f"{cmd[0]} not found: install the Debian package {_TOOLS.get(cmd[0], cmd[0])}") from e
    if proc.returncode != 0:
        detail = tail(proc.stderr) or tail(proc.stdout) or "no output"
        raise error(f"`{' '.join(cmd)}` failed (exit {proc.returncode}): {detail}")
    return proc.stdout


@contextlib.contextmanager
def locked(directory: Path, log: Callable[[str], None], what: str = "kernel fetch",
           error: type[KvmpodError] = KernelError) -> Iterator[None]:
    directory.mkdir(parents=True, exist_ok=True)
    lock_path = directory / ".lock"
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise error(f"cannot open lock file {lock_path}: {e.strerror}") from e
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for another {what} ({lock_path})")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def replace_dir(stage: Path, final: Path, scratch: Path) -> None:
    """Rename stage to final; an existing final is moved into scratch (deleted with it)."""
    if final.exists():
        final.rename(scratch / "old")
    stage.rename(final)


def find_patches(patch_dir: Path) -> list[Path]:
    """The patches a build applies to its source (the minimal kernel's, kvmpod's QEMU), in name order."""
    return sorted(p for p in patch_dir.glob("*.patch") if p.is_file()) if patch_dir.is_dir() else []


def apply_patches(src: Path, patches: list[Path], log: Callable[[str], None],
                  error: type[KvmpodError] = KernelError) -> None:
    """Apply `patches` to the source tree `src`, in order; `error` names the one that does not apply."""
    for patch in patches:
        log(f"applying {patch.name}")
        run_tool(["patch", "-p1", "--forward", "--batch", "--no-backup-if-mismatch", "-i", str(patch)], cwd=src,
                 error=error)


def add_build_arguments(parser: "argparse.ArgumentParser", what: str, installed_in: str, source_size: str) -> None:
    """The options `build` commands share (the minimal kernel, kvmpod's QEMU)."""
    parser.add_argument("--cache", type=Path, help=f"cache directory (default: kvmpod's cache dir); {what} goes "
                                                   f"to CACHE/{installed_in}/, the build tree to CACHE/build/")
    parser.add_argument("--force", action="store_true", help="build even if an identical build is installed")
    parser.add_argument("-j", "--jobs", type=int, help="parallel make jobs (default: the number of CPUs)")
    parser.add_argument("--keep-source", action="store_true", help=f"keep the source tree ({source_size})")


def run_command_line(action: Callable[[], object]) -> int:
    """Run a `python -m kvmpod.boot.*` (or kvmpod.vm.qemu_build) command: a KvmpodError becomes one line
    and exit status 1."""
    import sys

    try:
        action()
    except KvmpodError as e:
        print(f"kvmpod: error: {e}", file=sys.stderr)
        return 1
    return 0
