"""flock()-based locks of the store (docs/store.md lists who takes which).

Two kinds per key (an image's hex ID, or a rootfs disk's key):
* `<key>.lock`, exclusive: held while the image is imported, its disk built, or it is removed.
* `<key>.use`, shared while a pod uses the image or disk; `image rm` and `image gc` take it
  exclusively without waiting, so they never pull an image from under a running pod.
flock locks die with their process, so a SIGKILLed kvmpod never leaves a store locked.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _open(path: Path) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)


@contextmanager
def exclusive(path: Path) -> Iterator[None]:
    """Wait for and hold an exclusive lock on `path`."""
    fd = _open(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@contextmanager
def shared(path: Path) -> Iterator[None]:
    """Wait for and hold a shared lock on `path`."""
    fd = _open(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)


@contextmanager
def try_exclusive(path: Path) -> Iterator[bool]:
    """Hold an exclusive lock on `path` if nobody else has one (yields True), else yield False at once."""
    fd = _open(path)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


class SharedLocks:
    """Shared locks held until close(): a pod's claim on the images and disks it runs from."""

    def __init__(self) -> None:
        self._fds: list[int] = []

    def add(self, path: Path) -> None:
        fd = _open(path)
        fcntl.flock(fd, fcntl.LOCK_SH)
        self._fds.append(fd)

    def take_over(self, other: SharedLocks) -> None:
        """Move `other`'s locks into this set (they stay held throughout)."""
        self._fds.extend(other._fds)
        other._fds.clear()

    @property
    def fds(self) -> tuple[int, ...]:
        """The locks' fds: kept open across the exec into kvmpod-relay and back (kvmpod/pod/relay.py)."""
        return tuple(self._fds)

    @classmethod
    def adopt(cls, fds: list[int]) -> SharedLocks:
        """Locks this process holds already (inherited across exec)."""
        locks = cls()
        locks._fds.extend(fds)
        return locks

    def close(self) -> None:
        while self._fds:
            os.close(self._fds.pop())

    def __enter__(self) -> SharedLocks:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
