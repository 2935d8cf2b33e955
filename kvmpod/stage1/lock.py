"""RKT_LOCK_FD: the open, exclusively flock()ed pod directory stage0 hands to the run entrypoint.

rkt tells a running pod from an exited one by that lock alone (a pod in pods/run/ whose directory
lock can be taken has exited), so stage1 must hold it exactly as long as the pod lives: the fd stays
open in the pod's process, and is close-on-exec so that no child (QEMU, virtiofsd, a CNI plugin)
keeps the lock of a pod that has ended (rkt's own stage1 does the same for its plugins).
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from pathlib import Path

from kvmpod.stage1.flags import Stage1Error

ENV_LOCK_FD = "RKT_LOCK_FD"


def hold_pod_lock(pod_root: Path, environ: dict[str, str] | None = None) -> int:
    """Check that RKT_LOCK_FD is this pod directory, locked, and keep it (close-on-exec); its number."""
    env = os.environ if environ is None else environ
    value = env.get(ENV_LOCK_FD)
    if value is None:
        raise Stage1Error(f"{ENV_LOCK_FD} is not set: stage0 passes the pod directory's locked fd in it")
    if not value.isdigit():
        raise Stage1Error(f"{ENV_LOCK_FD}={value!r} is not a file descriptor number")
    fd = int(value)
    try:
        held = os.fstat(fd)
    except OSError as cause:
        raise Stage1Error(f"{ENV_LOCK_FD}={fd} is not an open file descriptor") from cause
    try:
        pod = os.stat(pod_root)
    except OSError as e:
        raise Stage1Error(f"{pod_root}: {e.strerror}") from e
    if not stat.S_ISDIR(held.st_mode) or (held.st_dev, held.st_ino) != (pod.st_dev, pod.st_ino):
        raise Stage1Error(f"{ENV_LOCK_FD}={fd} is not the pod directory {pod_root} (the working directory)")
    if not locked_by_someone(pod_root):
        raise Stage1Error(f"{ENV_LOCK_FD}={fd}: the pod directory {pod_root} is not locked "
                          "(stage0 takes an exclusive flock on it)")
    os.set_inheritable(fd, False)
    return fd


def locked_by_someone(pod_root: Path) -> bool:
    """Is an exclusive or shared flock held on the directory? (A lock of our own open file counts:
    a second open file description cannot take it either.)"""
    probe = os.open(pod_root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return True
        raise
    else:
        fcntl.flock(probe, fcntl.LOCK_UN)
        return False
    finally:
        os.close(probe)
