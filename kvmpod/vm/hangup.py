"""QEMU dies with kvmpod, also once it is another user (docs/security.md, "Dying with kvmpod").

PR_SET_PDEATHSIG (spawn.die_with_parent) makes the kernel kill a child whose parent dies, but the
kernel clears it when the child changes its user: a QEMU that drops to kvmpod-qemu (-runas) would
outlive a kvmpod killed by SIGKILL. So each QEMU also inherits one end of a socketpair it never uses
(the death line), set up by kvmpod, still root, to signal its owner, QEMU, with SIGKILL when anything
happens on it (O_ASYNC, F_SETOWN, F_SETSIG). Nothing is ever sent on it; the only thing that can happen
is that kvmpod's end closes, which the kernel does when the kvmpod process ends, however it ends.
The permission to signal is the one of whoever set the owner (root), so it holds after QEMU's switch.

kvmpod's end is inheritable: it stays open across the exec into kvmpod-relay and back (the same
process, docs/relay.md), and it is never closed on purpose; children other than QEMU get no copy
(subprocess closes the fds it is not told to pass).
"""

from __future__ import annotations

import fcntl
import os
import signal
import socket

F_SETSIG = 10   # <fcntl.h>, Linux: the signal sent instead of SIGIO

_held: list[socket.socket] = []   # kvmpod's ends: closing one kills its QEMU, so they live as long as this process


class DeathLine:
    """One QEMU's death line: `qemu_fd` goes to QEMU (pass_fds), and `arm(pid)` once QEMU is spawned,
    before the spawner closes its copy of `qemu_fd` (the owner is set on the open file they share)."""

    def __init__(self) -> None:
        self.kvmpod_end, qemu_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.qemu_fd = qemu_end.detach()
        self.kvmpod_end.set_inheritable(True)

    def arm(self, pid: int) -> None:
        """From now on, kvmpod's end closing SIGKILLs process `pid`; the end is kept open until this
        process ends. (Until arm(), closing `kvmpod_end` is the spawner's, should the spawn fail.)"""
        _held.append(self.kvmpod_end)
        fcntl.fcntl(self.qemu_fd, fcntl.F_SETOWN, pid)
        fcntl.fcntl(self.qemu_fd, F_SETSIG, signal.SIGKILL)
        fcntl.fcntl(self.qemu_fd, fcntl.F_SETFL, fcntl.fcntl(self.qemu_fd, fcntl.F_GETFL) | os.O_ASYNC)
