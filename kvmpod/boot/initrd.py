"""The guest initrd: the agent as /init plus the kernel modules it loads, as a newc cpio.

Layout of the initrd::

    /init                       the guest agent (static binary), mode 0755
    /etc/kvmpod/modules         the .ko paths below, in load order, one per line
    /lib/modules/kernel/...     the .ko files (paths as in modules.dep, without the version)
    /dev/console                char 5:1, so the kernel can give /init a console
    /dev /proc /sys /run /tmp   empty mount points

Initrds are cached by content: cache_dir()/initrd/<sha256>.cpio[.gz], the hash covering the
format version, the agent and the modules, so an unchanged pod start reuses the file.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import io
import os
import stat
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

from kvmpod import paths, resources
from kvmpod.boot.kernel import GuestKernel, find_kernel
from kvmpod.boot.modules import guest_module_names, resolve_relative
from kvmpod.errors import KernelError

# Bump when the initrd layout changes, so cached initrds are rebuilt.
FORMAT_VERSION = "kvmpod-initrd-1"
MODULES_PREFIX = "lib/modules"
MODULE_LIST = "etc/kvmpod/modules"
COMPRESSIONS = ("none", "gzip")
# Uncompressed boots faster: TCG decompresses slowly and the initrd is small (docs/kernel.md).
DEFAULT_COMPRESS = "none"

ENV_AGENT = "KVMPOD_AGENT"

_BASE_DIRS = ("dev", "proc", "sys", "run", "tmp", "etc", "etc/kvmpod", "lib", MODULES_PREFIX)


# --- newc cpio -----------------------------------------------------------------------------

class CpioWriter:
    """Writes a newc ("070701") cpio archive, as the kernel's initramfs unpacker reads it.

    Reproducible: mtime 0, uid/gid 0, inode numbers in order of writing. Parent directories
    are added automatically before their first entry (the kernel does not create them).
    """

    def __init__(self, out: BinaryIO):
        self._out = out
        self._ino = 0
        self._dirs: set[str] = {""}
        self._closed = False

    def _header(self, name: str, mode: int, size: int, nlink: int = 1, rdev: tuple[int, int] = (0, 0)) -> None:
        self._ino += 1
        encoded = name.encode() + b"\0"
        fields = (self._ino, mode, 0, 0, nlink, 0, size, 0, 0, rdev[0], rdev[1], len(encoded), 0)
        header = b"070701" + b"".join(b"%08X" % v for v in fields)
        self._out.write(header + encoded)
        self._out.write(b"\0" * (-(len(header) + len(encoded)) % 4))

    def _data(self, data: bytes) -> None:
        self._out.write(data)
        self._out.write(b"\0" * (-len(data) % 4))

    @staticmethod
    def _norm(name: str) -> str:
        name = name.strip("/")
        if not name or any(part in ("", ".", "..") for part in name.split("/")):
            raise ValueError(f"bad cpio entry name {name!r}")
        return name

    def _parents(self, name: str) -> None:
        parent = name.rpartition("/")[0]
        if parent not in self._dirs:
            self.add_dir(parent)

    def add_dir(self, name: str, mode: int = 0o755) -> None:
        name = self._norm(name)
        if name in self._dirs:
            return
        self._parents(name)
        self._header(name, stat.S_IFDIR | mode, 0, nlink=2)
        self._dirs.add(name)

    def add_file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        name = self._norm(name)
        self._parents(name)
        self._header(name, stat.S_IFREG | mode, len(data))
        self._data(data)

    def add_symlink(self, name: str, target: str) -> None:
        name = self._norm(name)
        self._parents(name)
        encoded = target.encode()
        self._header(name, stat.S_IFLNK | 0o777, len(encoded))
        self._data(encoded)

    def add_chardev(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        name = self._norm(name)
        self._parents(name)
        self._header(name, stat.S_IFCHR | mode, 0, rdev=(major, minor))

    def close(self) -> None:
        """Write the TRAILER!!! entry (the archive is incomplete without it)."""
        if not self._closed:
            self._header("TRAILER!!!", 0, 0, nlink=1)
            self._closed = True


# --- the agent -----------------------------------------------------------------------------

def find_agent() -> Path:
    """The guest agent binary: $KVMPOD_AGENT, else the package's own copy, the checkout's build, the system
    copy (kvmpod/resources.py)."""
    if env := os.environ.get(ENV_AGENT):
        agent = Path(env).expanduser()
        if not agent.is_file():
            raise KernelError(f"guest agent binary not found: ${ENV_AGENT} names {agent}, which does not exist")
        return agent
    if (found := resources.find_program("kvmpod-agent")) is not None:
        return found
    raise KernelError(f"guest agent binary not found: {resources.missing_program_hint('kvmpod-agent')}")


# --- building ------------------------------------------------------------------------------

def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise KernelError(f"cannot read {what} {path}: {e.strerror}") from e


def initrd_dir() -> Path:
    return paths.cache_dir() / "initrd"


def _write_archive(out: BinaryIO, agent: bytes, modules: list[tuple[str, bytes]]) -> None:
    cpio = CpioWriter(out)
    for d in _BASE_DIRS:
        cpio.add_dir(d)
    cpio.add_chardev("dev/console", 5, 1)
    cpio.add_file("init", agent, 0o755)
    cpio.add_file(MODULE_LIST, "".join(f"{name}\n" for name, _ in modules).encode())
    for name, data in modules:
        cpio.add_file(name, data)
    cpio.close()


def _clean_stale_temps(directory: Path, max_age: float = 3600) -> None:
    now = time.time()
    for tmp in directory.glob(".tmp-*"):
        try:
            if now - tmp.stat().st_mtime > max_age:
                tmp.unlink()
        except OSError:
            pass


def build_initrd(
    agent: Path,
    kernel: GuestKernel,
    compress: str = DEFAULT_COMPRESS,
    modules: Iterable[str] | None = None,
) -> Path:
    """The initrd for `agent` + the modules `kernel` needs, built once and cached by content.

    `modules` defaults to initrd/guest-modules.txt; dependencies are added and built-in
    modules skipped. `compress` is "none" or "gzip". Safe to call concurrently.
    """
    if compress not in COMPRESSIONS:
        raise KernelError(f"unknown initrd compression {compress!r} (expected one of {', '.join(COMPRESSIONS)})")
    agent_bytes = _read(Path(agent), "guest agent")
    names = list(guest_module_names() if modules is None else modules)
    module_files: list[tuple[str, bytes]] = []
    if kernel.modules_dir is not None and names:
        for rel in resolve_relative(kernel.modules_dir, names):
            module_files.append((f"{MODULES_PREFIX}/{rel}", _read(kernel.modules_dir / rel, "kernel module")))

    digest = hashlib.sha256()
    for part in (FORMAT_VERSION.encode(), agent_bytes):
        digest.update(len(part).to_bytes(8, "little") + part)
    for name, data in module_files:
        for part in (name.encode(), data):
            digest.update(len(part).to_bytes(8, "little") + part)
    suffix = ".cpio.gz" if compress == "gzip" else ".cpio"
    directory = initrd_dir()
    target = directory / f"{digest.hexdigest()}{suffix}"
    if target.is_file():
        return target

    buf = io.BytesIO()
    _write_archive(buf, agent_bytes, module_files)
    data = buf.getvalue()
    if compress == "gzip":
        data = gzip.compress(data, compresslevel=9, mtime=0)

    try:
        directory.mkdir(parents=True, exist_ok=True)
        _clean_stale_temps(directory)
        fd, tmp_name = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=directory)
    except OSError as e:
        raise KernelError(f"cannot write initrd cache {directory}: {e.strerror}") from e
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        try:
            os.link(tmp, target)  # never replaces: a concurrent builder's identical file stays
        except FileExistsError:
            pass
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK):
                raise
            os.replace(tmp, target)  # no hard links here: replacing with identical bytes is fine
    except OSError as e:
        raise KernelError(f"cannot write initrd {target}: {e.strerror}") from e
    finally:
        tmp.unlink(missing_ok=True)
    return target


def main(argv: list[str] | None = None) -> int:
    """`python -m kvmpod.boot.initrd [--kernel K] [--agent A] [--gzip]`: build, print the path."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m kvmpod.boot.initrd", description=main.__doc__)
    parser.add_argument("--kernel", help="guest kernel (default: the search order of docs/kernel.md)")
    parser.add_argument("--agent", type=Path, help="guest agent binary (default: find_agent())")
    parser.add_argument("--gzip", action="store_true", help="gzip-compress the initrd")
    args = parser.parse_args(argv)
    try:
        kernel = find_kernel(args.kernel)
        path = build_initrd(args.agent or find_agent(), kernel, "gzip" if args.gzip else "none")
    except KernelError as e:
        print(f"kvmpod: error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
