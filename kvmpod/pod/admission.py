"""Start slots: how many pods of this user may be starting at once (docs/performance.md, "Scale").

A pod holds a slot from the moment its images are ready until its apps run (or it fails), not for its
life: starting is where a pod burns CPU (QEMU's restore or boot, the guest's app start under TCG, kvmpod's
own planning), and past a few starts per core they only slow each other down. Measured on the 2-core
test machine: 32 concurrent `kvmpod run /bin/true` finished in 8.4-9.1 s all at once, 6.2 s four at a time.

A slot is an flock()ed file under the runtime directory (`start-slots/<i>`), opened O_CLOEXEC: the kernel
drops it when the holder exits or execs (kvmpod-relay), so a killed kvmpod never keeps one. An image's
fetch and import happen before a slot is taken, so a slow download holds up no one else's start.

A pod that finds every slot held waits for whichever is released first. flock() can only wait for one
file, so the waiters queue on a turnstile (`start-slots/queue`, flocked too); the one at its head keeps
a descriptor of every slot open and waits for an inotify IN_CLOSE_WRITE in the directory (a holder's
release, exit or exec closes its slot, opened for writing) before trying them all again. Waiting on a
slot picked at random, as before, could keep a pod behind a slow starter (a cold boot, a first run
making its snapshot) while other slots stood free.
"""

from __future__ import annotations

import fcntl
import logging
import os
import random
import select
import time
from pathlib import Path

from kvmpod import config, paths

log = logging.getLogger(__name__)


def slot_count() -> int:
    """`[run] concurrent-starts`, else two per CPU (at least two)."""
    return config.int_setting("concurrent-starts", "run", max(2, 2 * (os.cpu_count() or 1)))


class StartSlot:
    """One held slot; release() (idempotent) lets the next waiting pod start."""

    def __init__(self, fd: int, index: int, waited: float):
        self._fd: int | None = fd
        self.index = index
        self.waited = waited

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)   # closing the last descriptor of the open file drops its flock
            self._fd = None


def take(count: int | None = None) -> StartSlot:
    """A free slot, waiting for the first one released if all `count` are held."""
    n = slot_count() if count is None else count
    directory = paths.runtime_dir() / "start-slots"
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)   # nobody else's business, like the files
    first = random.randrange(n)   # spread the starters over the slots
    started = time.monotonic()
    for i in [(first + k) % n for k in range(n)]:
        fd = _open(directory, str(i))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return StartSlot(fd, i, 0.0)
        except BlockingIOError:
            os.close(fd)
    turnstile = _open(directory, "queue")
    try:
        fcntl.flock(turnstile, fcntl.LOCK_EX)   # behind the waiters that came first
        slot = _first_released(directory, n, started)
    finally:
        os.close(turnstile)
    log.debug("start slot %d of %d, after waiting %.3f s for one", slot.index, n, slot.waited)
    return slot


# A slot released while the watch was being set up is found by the tries that follow it; the timeout
# only bounds a wait whose event was lost (the inotify queue overflowed) or that has no watch at all.
_RETRY_S = 1.0
_NO_WATCH_RETRY_S = 0.01


def _first_released(directory: Path, n: int, started: float) -> StartSlot:
    """Wait, at the turnstile's head, for any of the `n` slots."""
    watch = _CloseWatch(directory)   # before the tries: a release after a try is an event to wake for
    fds = [_open(directory, str(i)) for i in range(n)]   # kept open: closing one would be an event too
    try:
        while True:
            for i, fd in enumerate(fds):
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue
                fds[i] = -1
                return StartSlot(fd, i, time.monotonic() - started)
            watch.wait(_RETRY_S)
    finally:
        for fd in fds:
            if fd >= 0:
                os.close(fd)
        watch.close()


class _CloseWatch:
    """inotify IN_CLOSE_WRITE on a directory, through libc (the stdlib has no inotify binding); without
    inotify (its per-user limit reached, say) wait() just sleeps a little, and the caller tries again."""

    _IN_CLOSE_WRITE = 0x8

    def __init__(self, directory: Path):
        import ctypes   # only a waiting pod needs it

        self._fd = -1
        libc = ctypes.CDLL(None, use_errno=True)
        fd = libc.inotify_init1(os.O_CLOEXEC | os.O_NONBLOCK)
        if fd >= 0 and libc.inotify_add_watch(fd, os.fsencode(directory), self._IN_CLOSE_WRITE) >= 0:
            self._fd = fd
            return
        log.debug("no inotify watch on %s (%s): trying the start slots every %.0f ms", directory,
                  os.strerror(ctypes.get_errno()), _NO_WATCH_RETRY_S * 1000)
        if fd >= 0:
            os.close(fd)

    def wait(self, timeout: float) -> None:
        """Until some file in the directory that was open for writing is closed, or `timeout`."""
        if self._fd < 0:
            time.sleep(_NO_WATCH_RETRY_S)
            return
        poller = select.poll()   # not select(): a process may hold fds past FD_SETSIZE
        poller.register(self._fd, select.POLLIN)
        poller.poll(timeout * 1000)
        try:
            os.read(self._fd, 65536)   # the events themselves do not matter: every slot is tried again
        except BlockingIOError:
            pass

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _open(directory: os.PathLike, name: str) -> int:
    return os.open(os.path.join(directory, name), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
