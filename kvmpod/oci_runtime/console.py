"""A terminal for a container (process.terminal): a pty made on the host, its master sent to the
`--console-socket` as runc does (one message, the pty's name as data, the master fd as SCM_RIGHTS),
its slave the container process's stdin, stdout, stderr and controlling terminal. kvmpod relays the
slave to the guest's own pty (raw here; the guest's line discipline does the work), and follows
window-size changes through SIGWINCH (docs/oci-runtime.md)."""

from __future__ import annotations

import fcntl
import os
import socket
import termios

from kvmpod.errors import KvmpodError


def send_console(socket_path: str) -> int:
    """A new pty whose master went to `socket_path`; returns the slave fd (the caller's to keep)."""
    master, slave = os.openpty()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(socket_path)
            socket.send_fds(sock, [os.ttyname(slave).encode()], [master])
    except OSError as e:
        os.close(slave)
        raise KvmpodError(f"--console-socket {socket_path}: {e.strerror or e}") from e
    finally:
        os.close(master)
    return slave


def become_terminal(slave: int) -> None:
    """`slave` as fds 0-2 and the controlling terminal of this (new) session."""
    os.setsid()
    fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
    for fd in (0, 1, 2):
        os.dup2(slave, fd)
    if slave > 2:
        os.close(slave)
