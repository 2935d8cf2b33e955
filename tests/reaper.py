#!/usr/bin/env python3
"""Run a daemon under a child subreaper that reaps at once: `reaper.py libvirtd -d ...`.

libvirtd and the QEMU processes it starts daemonize; their orphans go to the nearest subreaper, else
to PID 1. Where PID 1 reaps late (this sandbox's reaps orphans ~1.5 s after they exit), libvirt, which
waits for a killed QEMU's pid to vanish, reports every domain's end that much later. Under this
reaper they vanish at once, as under systemd. It exits once it has no child left.
"""

from __future__ import annotations

import ctypes
import os
import sys

PR_SET_CHILD_SUBREAPER = 36


def main() -> int:
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")
    child = os.fork()
    if child == 0:
        os.execvp(sys.argv[1], sys.argv[1:])
    status = 0
    while True:
        try:
            pid, raw = os.wait()
        except ChildProcessError:
            return status
        if pid == child:
            status = os.waitstatus_to_exitcode(raw)
            if status:
                return status   # the daemon did not start: say so (its orphans, if any, go to PID 1)


if __name__ == "__main__":
    raise SystemExit(main())
