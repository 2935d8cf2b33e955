"""Network namespaces as `ip netns` keeps them (bind mounts in /run/netns), and running code inside one.

setns(2) moves only the calling thread, so work in another namespace runs in a short-lived thread of
its own: kvmpod's other threads (and its asyncio loop) stay where they are. Sockets and taps opened in
there keep working from anywhere afterwards.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kvmpod.errors import NetworkError

NETNS_DIR = Path("/run/netns")          # where `ip netns` keeps its namespaces; kvmpod's are kvmpod-<uuid>
_CLONE_NEWNET = 0x40000000
_MS_BIND, _MS_REC, _MS_SHARED = 0x1000, 0x4000, 1 << 20
_MNT_DETACH = 2
_NS_GET_NSTYPE = 0xB703                 # ioctl on a namespace file: its CLONE_NEW* type


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _in_thread(fn: Callable[[], Any]) -> Any:
    """fn() in a short-lived thread (namespace changes affect only the calling thread)."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            box["error"] = e

    thread = threading.Thread(target=run, name="kvmpod-netns")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box.get("value")


def _enter(netns: Path) -> None:
    fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc().setns(fd, _CLONE_NEWNET) != 0:
            raise NetworkError(f"enter network namespace {netns}: {os.strerror(ctypes.get_errno())}")
    finally:
        os.close(fd)


def in_netns(netns: Path, fn: Callable[[], Any]) -> Any:
    """fn() with the calling thread in network namespace `netns` (sockets it opens stay there)."""
    def run() -> Any:
        _enter(netns)
        return fn()
    return _in_thread(run)


def netns_alive(path: Path) -> bool:
    """Is `path` a network namespace (a bind mount of one)? An empty file left behind is not."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return fcntl.ioctl(fd, _NS_GET_NSTYPE) == _CLONE_NEWNET
    except OSError:
        return False
    finally:
        os.close(fd)


def _share_netns_dir(libc: ctypes.CDLL) -> None:
    """/run/netns as `ip netns` makes it: a shared mount, so namespaces mounted in it are seen by
    other mount namespaces that share it."""
    NETNS_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
    path = str(NETNS_DIR).encode()
    if libc.mount(b"none", path, None, _MS_SHARED | _MS_REC, None) == 0:
        return
    if ctypes.get_errno() != errno.EINVAL or libc.mount(path, path, b"none", _MS_BIND | _MS_REC, None) != 0 \
            or libc.mount(b"none", path, None, _MS_SHARED | _MS_REC, None) != 0:
        raise NetworkError(f"make {NETNS_DIR} a shared mount: {os.strerror(ctypes.get_errno())}")


def create_netns(path: Path) -> None:
    """A new network namespace, kept by a bind mount on `path` (as `ip netns add` does)."""
    libc = _libc()
    _share_netns_dir(libc)
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0))
    except OSError as e:
        raise NetworkError(f"create network namespace {path}: {e.strerror}") from e

    def unshare_and_mount() -> None:
        if libc.unshare(_CLONE_NEWNET) != 0:
            raise NetworkError(f"create network namespace {path}: {os.strerror(ctypes.get_errno())} "
                               "(CNI networks need root)")
        if libc.mount(b"/proc/thread-self/ns/net", str(path).encode(), b"none", _MS_BIND, None) != 0:
            raise NetworkError(f"mount network namespace {path}: {os.strerror(ctypes.get_errno())}")

    try:
        _in_thread(unshare_and_mount)
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def remove_netns(path: Path) -> None:
    """Unmount and remove; a namespace already gone (or never mounted) is fine."""
    libc = _libc()
    if libc.umount2(str(path).encode(), _MNT_DETACH) != 0 and ctypes.get_errno() not in (errno.EINVAL, errno.ENOENT):
        raise NetworkError(f"unmount network namespace {path}: {os.strerror(ctypes.get_errno())}")
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as e:
        raise NetworkError(f"remove network namespace {path}: {e.strerror}") from e
