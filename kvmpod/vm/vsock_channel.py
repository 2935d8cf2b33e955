"""Connecting to the guest agent's vsock port through the host kernel (vhost-vsock), for either backend:
the QEMU backend's `-device vhost-vsock-*` and a libvirt domain's `<vsock>` alike (docs/vsock.md)."""

from __future__ import annotations

import asyncio
import socket

from kvmpod.agent.protocol import VSOCK_PORT

RETRY = 0.01   # seconds between attempts while the guest's agent is not listening yet


async def connect_kernel_vsock(cid: int, port: int = VSOCK_PORT) -> socket.socket:
    """A connected AF_VSOCK socket to `cid`:`port`, trying again after each RST (nothing listens yet) or
    timeout (the guest's driver is not up yet) until it connects; the caller bounds how long."""
    loop = asyncio.get_running_loop()
    while True:
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, (cid, port))
        except (ConnectionResetError, ConnectionRefusedError, TimeoutError):
            sock.close()
            await asyncio.sleep(RETRY)
            continue
        except BaseException:
            sock.close()
            raise
        return sock
