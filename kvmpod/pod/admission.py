"""Start slots: how many pods of this user may be starting at once (docs/performance.md, "Scale").

A pod holds a slot from the moment its images are ready until its apps run (or it fails), not for its
life: starting is where a pod burns CPU (QEMU's restore or boot, the guest's app start under TCG, kvmpod's
own planning), and past a few starts per core they only slow each other down. Measured on the 2-core
test machine: 32 concurrent `kvmpod run /bin/true` finished in 8.4-9.1 s all at once, 6.2 s four at a time.

A slot is an flock()ed file under the runtime directory (`start-slots/<i>`), opened O_CLOEXEC: the kernel
drops it when the holder exits or execs (kvmpod-relay), so a killed kvmpod never keeps one. An image's
fetch and import happen before a slot is taken, so a slow download holds up no one else's start.
"""

from __future__ import annotations

import fcntl
import logging
import os
import random
import time

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
    """A free slot, waiting for one if all `count` are held."""
    n = slot_count() if count is None else count
    directory = paths.runtime_dir() / "start-slots"
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)   # nobody else's business, like the files
    first = random.randrange(n)   # spread the waiters over the slots
    started = time.monotonic()
    for i in [(first + k) % n for k in range(n)]:
        fd = _open(directory, i)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return StartSlot(fd, i, 0.0)
        except BlockingIOError:
            os.close(fd)
    fd = _open(directory, first)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)   # every slot is held: wait for this one
    except BaseException:
        os.close(fd)
        raise
    waited = time.monotonic() - started
    log.debug("start slot %d of %d, after waiting %.3f s for one", first, n, waited)
    return StartSlot(fd, first, waited)


def _open(directory: os.PathLike, index: int) -> int:
    return os.open(os.path.join(directory, str(index)), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
