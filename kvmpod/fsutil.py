"""Small filesystem helpers shared by the store and the pod directory."""

from __future__ import annotations

import os
import re
import tempfile
import time
from pathlib import Path


def write_atomically(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace `path` with `data` so that readers see the old or the new content, never a part."""
    # the writer's pid in the name: `image gc` and `image fsck` tell a live writer's file from a dead one's
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_TEMP_NAME = re.compile(r"^\..+?\.(?P<pid>\d+)-[^.]*\.tmp$")   # .<name>.<pid>-<random>.tmp, as written above
_OLD_TEMP_NAME = re.compile(r"^\..+\.tmp$")                      # the same from before the pid was in the name
OLD_TEMP_AGE = 3600.0   # seconds after which a temp file without a pid is taken for a dead writer's


def abandoned_temp(path: Path) -> bool | None:
    """For a temp file of write_atomically (or the disk writer, kvmpod/disk/iso.py): True if its writer is
    gone, False while it may still write; None when `path` is no such file."""
    if m := _TEMP_NAME.match(path.name):
        return not pid_alive(int(m.group("pid")))
    if _OLD_TEMP_NAME.match(path.name):
        try:
            return time.time() - path.lstat().st_mtime > OLD_TEMP_AGE
        except FileNotFoundError:
            return False
    return None
