"""Guest CIDs: one per running pod, never two pods (or another VM) with the same (docs/vsock.md).

A pod holds an exclusive flock on `<run dir>/vsock-cids/<cid>` for as long as its VM lives; the
kernel drops the lock when the process dies, however it dies, so a crashed kvmpod leaves at most an
unlocked file behind (`kvmpod gc` removes those). With kernel vhost-vsock the CID is host-wide, so
candidates are also probed: a CID some other VM (not kvmpod's, or another user's kvmpod) answers on is
skipped.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from kvmpod import paths
from kvmpod.errors import VMError

FIRST_CID = 3          # 0-2 are reserved (hypervisor, local, host)
MAX_TRIES = 4096
PROBE_PORT = 1         # any port: a live CID answers RST, a free one cannot be reached
PROBE_TIMEOUT = 0.5
_FREE_ERRNOS = {errno.ENODEV, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EADDRNOTAVAIL}


def cid_dir() -> Path:
    return paths.runtime_dir() / "vsock-cids"


@dataclass
class CidLease:
    cid: int
    path: Path
    fd: int

    def release(self) -> None:
        """Give the CID back (at VM end). Idempotent."""
        if self.fd < 0:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # while still locked: nobody can take the old file meanwhile
        os.close(self.fd)
        self.fd = -1


def _try_lock(path: Path) -> int | None:
    """An fd holding the exclusive lock on `path`, or None if another process holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        # the file may have been released (unlinked) between our open and our lock: then it is stale
        if os.fstat(fd).st_ino != os.stat(path).st_ino:
            raise BlockingIOError
    except (BlockingIOError, FileNotFoundError):
        os.close(fd)
        return None
    return fd


def cid_in_use(cid: int) -> bool:
    """Whether some VM on this host answers on `cid` (kernel vhost-vsock only; False when unsure)."""
    try:
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    except (AttributeError, OSError):
        return False   # no AF_VSOCK on this host: nobody else can use the CID either
    with sock:
        sock.settimeout(PROBE_TIMEOUT)
        try:
            sock.connect((cid, PROBE_PORT))
        except socket.timeout:
            return True    # something is there, just slow
        except OSError as e:
            return e.errno not in _FREE_ERRNOS
        return True


def allocate_cid(owner: str, probe: bool) -> CidLease:
    """The lowest free CID from FIRST_CID, locked for this process. `probe`: also skip CIDs a VM
    outside kvmpod's locks answers on (kernel vhost-vsock)."""
    directory = cid_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as e:
        raise VMError(f"{directory}: cannot create the CID lock directory: {e.strerror}") from e
    for cid in range(FIRST_CID, FIRST_CID + MAX_TRIES):
        path = directory / str(cid)
        try:
            fd = _try_lock(path)
        except OSError as e:
            raise VMError(f"{path}: cannot lock: {e.strerror}") from e
        if fd is None:
            continue
        if probe and cid_in_use(cid):
            os.close(fd)
            continue
        os.ftruncate(fd, 0)
        os.write(fd, f"{owner}\n".encode())
        return CidLease(cid, path, fd)
    raise VMError(f"no free vsock CID among {MAX_TRIES} from {FIRST_CID} (see {directory})")


def remove_stale() -> list[int]:
    """`kvmpod gc`: remove lock files no process holds; returns their CIDs."""
    removed: list[int] = []
    directory = cid_dir()
    if not directory.is_dir():
        return removed
    for path in directory.iterdir():
        if not path.name.isdigit():
            continue
        try:
            fd = _try_lock(path)
        except OSError:
            continue
        if fd is None:
            continue
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)
        removed.append(int(path.name))
    return sorted(removed)
