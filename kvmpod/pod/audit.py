"""The audit log: an append-only record of every pod this host ran (docs/layout.md).

One JSON object per line, two per pod: `start` (who ran which images, with their IDs and signature
status) and `end` (how it ended, each app's exit status). Records are appended with O_APPEND under
an flock, one write each, so concurrent kvmpod processes never interleave lines; the file is never
rewritten or truncated by kvmpod. A pod whose kvmpod was SIGKILLed has a start and no end (gc notes
it as `abandoned` when it removes the pod).
"""

from __future__ import annotations

import fcntl
import json
import os
import pwd
import socket
import time
from pathlib import Path
from typing import Any

from kvmpod import paths


def audit_log_path() -> Path:
    return paths.audit_log()


def _user() -> dict[str, Any]:
    uid = os.getuid()
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = str(uid)
    # Under sudo, the person behind it is what an auditor wants to know.
    return {"uid": uid, "name": name, "sudo_user": os.environ.get("SUDO_USER")}


def append(event: str, uuid: str, **fields: Any) -> None:
    """Append one record; a log that cannot be written is an error (an unaudited pod must not run)."""
    record = {"time": time.time(), "event": event, "uuid": uuid, **fields}
    line = (json.dumps(record, sort_keys=True) + "\n").encode()
    path = audit_log_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, line)
    finally:
        os.close(fd)


def pod_started(uuid: str, apps: list[dict[str, Any]]) -> None:
    """`apps`: name, image ID, image name, labels and signature status of each app."""
    append("start", uuid, user=_user(), host=socket.gethostname(), kvmpod_pid=os.getpid(), apps=apps)


def pod_ended(uuid: str, state: str, apps: list[dict[str, Any]]) -> None:
    append("end", uuid, state=state, apps=apps)
