"""The vhost-user protocol, back-end side: what QEMU's vhost-user-vsock device says to kvmpod.

One front-end (QEMU) connects to the socket kvmpod listens on before QEMU starts. The messages
(QEMU's docs/interop/vhost-user.rst) set up the features, the guest memory table (file descriptors
of the shared memfd), and per queue its size, ring addresses, start index and kick/call eventfds.
kvmpod answers GET_FEATURES, GET_PROTOCOL_FEATURES, GET_CONFIG (the guest CID), GET_VRING_BASE and
GET_QUEUE_NUM; it offers the CONFIG protocol feature only (no reply-ack, no multiqueue, no log).
QEMU is the front-end kvmpod started itself, so it is trusted to speak the protocol; a message
kvmpod cannot serve still ends the pod with a clear VMError rather than an exception.

The protocol layer knows nothing of vsock packets: it serves the messages and tells the device behind
it what changed through `VhostUserBackend` (as rust-vmm's vhost-user-backend crate defines the trait
its daemon calls), which the vsock device implements. Imports point one way: device → vhost_user.
"""

from __future__ import annotations

import array
import asyncio
import logging
import os
import socket
import struct
from typing import Protocol

from kvmpod.errors import KvmpodError, VMError
from kvmpod.vsock.virtqueue import GuestMemory, VirtQueue

log = logging.getLogger(__name__)

# Requests (front-end to back-end)
GET_FEATURES, SET_FEATURES, SET_OWNER, RESET_OWNER, SET_MEM_TABLE = 1, 2, 3, 4, 5
SET_LOG_BASE, SET_LOG_FD, SET_VRING_NUM, SET_VRING_ADDR, SET_VRING_BASE = 6, 7, 8, 9, 10
GET_VRING_BASE, SET_VRING_KICK, SET_VRING_CALL, SET_VRING_ERR = 11, 12, 13, 14
GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES, GET_QUEUE_NUM, SET_VRING_ENABLE = 15, 16, 17, 18
GET_CONFIG, SET_CONFIG, RESET_DEVICE = 24, 25, 34

FLAG_VERSION = 0x1
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8
VRING_NOFD = 0x100
VRING_INDEX_MASK = 0xFF

F_VERSION_1 = 1 << 32
F_PROTOCOL_FEATURES = 1 << 30
PROTOCOL_F_CONFIG = 1 << 9
FEATURES = F_VERSION_1 | F_PROTOCOL_FEATURES
PROTOCOL_FEATURES = PROTOCOL_F_CONFIG

NUM_QUEUES = 3            # rx, tx, event; QEMU keeps the event queue itself and hands over two
MAX_PAYLOAD = 4096
MAX_FDS = 8

_HEADER = struct.Struct("<III")
_U64 = struct.Struct("<Q")
_STATE = struct.Struct("<II")
_ADDR = struct.Struct("<IIQQQQ")
_REGION = struct.Struct("<QQQQ")
_CONFIG = struct.Struct("<III")

NAMES = {GET_FEATURES: "GET_FEATURES", SET_FEATURES: "SET_FEATURES", SET_OWNER: "SET_OWNER",
         RESET_OWNER: "RESET_OWNER", SET_MEM_TABLE: "SET_MEM_TABLE", SET_VRING_NUM: "SET_VRING_NUM",
         SET_VRING_ADDR: "SET_VRING_ADDR", SET_VRING_BASE: "SET_VRING_BASE", GET_VRING_BASE: "GET_VRING_BASE",
         SET_VRING_KICK: "SET_VRING_KICK", SET_VRING_CALL: "SET_VRING_CALL", SET_VRING_ERR: "SET_VRING_ERR",
         GET_PROTOCOL_FEATURES: "GET_PROTOCOL_FEATURES", SET_PROTOCOL_FEATURES: "SET_PROTOCOL_FEATURES",
         GET_QUEUE_NUM: "GET_QUEUE_NUM", SET_VRING_ENABLE: "SET_VRING_ENABLE", GET_CONFIG: "GET_CONFIG",
         SET_CONFIG: "SET_CONFIG", RESET_DEVICE: "RESET_DEVICE"}


def encode(request: int, payload: bytes = b"", flags: int = FLAG_VERSION) -> bytes:
    """One message as it goes on the wire (also used by the tests' fake front-end)."""
    return _HEADER.pack(request, flags, len(payload)) + payload


class VhostUserBackend(Protocol):
    """The device behind a vhost-user connection: what the protocol layer tells it and asks of it.
    Every call comes from the asyncio loop, from the connection's reader."""

    def config_space(self) -> bytes:
        """The device's virtio config space (GET_CONFIG reads a window of it)."""

    def memory_changed(self) -> None:
        """A new memory table is mapped: views into the old one must be dropped."""

    def queue_started(self, index: int) -> None:
        """The queue has its size, addresses and kick eventfd, and is enabled."""

    def queue_kicked(self, index: int) -> None:
        """The guest kicked the queue: new buffers are available."""

    def queue_stopped(self, index: int) -> int:
        """The queue stops (GET_VRING_BASE): how many buffers the device took from the ring without
        using them, which the ring's base is rewound by."""

    def front_end_gone(self) -> None:
        """QEMU closed the connection (it is exiting)."""

    def fail(self, error: KvmpodError) -> None:
        """The connection broke or QEMU asked for what kvmpod cannot serve; it is closed already."""


class VhostUserConnection:
    """The back-end end of one vhost-user connection, served from the asyncio loop."""

    def __init__(self, sock: socket.socket, device: VhostUserBackend):
        self.sock = sock
        self.device = device
        self.memory = GuestMemory()
        self.queues = [VirtQueue(i) for i in range(NUM_QUEUES)]
        self.features = 0
        self.closed = False
        self._loop = asyncio.get_running_loop()
        sock.setblocking(False)
        self._loop.add_reader(sock.fileno(), self._readable)

    # -- reading messages --------------------------------------------------------------------------

    def _recv_exact(self, n: int, fds: list[int] | None) -> bytes:
        """Exactly n bytes. QEMU writes each message with one sendmsg, so the rest is already there;
        a short wait covers a split write, never a missing one."""
        data = bytearray()
        self.sock.settimeout(5.0)
        try:
            while len(data) < n:
                if fds is not None:
                    chunk, anc, _, _ = self.sock.recvmsg(n - len(data), socket.CMSG_SPACE(MAX_FDS * 4))
                    for level, kind, cdata in anc:
                        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                            got = array.array("i")
                            got.frombytes(cdata[:len(cdata) - len(cdata) % 4])
                            fds.extend(got)
                else:
                    chunk = self.sock.recv(n - len(data))
                if not chunk:
                    raise EOFError
                data += chunk
        finally:
            self.sock.setblocking(False)
        return bytes(data)

    def _readable(self) -> None:
        fds: list[int] = []
        try:
            try:
                header = self._recv_exact(_HEADER.size, fds)
            except EOFError:
                self.close()
                self.device.front_end_gone()
                return
            request, flags, size = _HEADER.unpack(header)
            if size > MAX_PAYLOAD:
                raise VMError(f"vhost-user: {NAMES.get(request, request)} message of {size} bytes")
            payload = self._recv_exact(size, None) if size else b""
            reply = self._handle(request, payload, fds)
            if reply is not None:
                self._send(request, reply)
            elif flags & FLAG_NEED_REPLY:
                self._send(request, _U64.pack(0))
        except (OSError, EOFError, struct.error) as e:
            self._fail(VMError(f"vhost-user: connection to QEMU broke: {e or 'end of file'}"))
        except KvmpodError as e:
            self._fail(e)
        finally:
            for fd in fds:  # descriptors a handler did not keep
                if fd >= 0:
                    os.close(fd)

    def _send(self, request: int, payload: bytes) -> None:
        self.sock.setblocking(True)
        try:
            self.sock.sendall(encode(request, payload, FLAG_VERSION | FLAG_REPLY))
        finally:
            self.sock.setblocking(False)

    def _fail(self, error: KvmpodError) -> None:
        self.close()
        self.device.fail(error)

    # -- the messages ------------------------------------------------------------------------------

    def _queue(self, index: int) -> VirtQueue:
        if index >= NUM_QUEUES:
            raise VMError(f"vhost-user: queue {index} does not exist (vsock has {NUM_QUEUES})")
        return self.queues[index]

    @staticmethod
    def _take_fd(fds: list[int], what: str) -> int:
        if not fds:
            raise VMError(f"vhost-user: {what} without a file descriptor")
        fd = fds.pop(0)
        return fd

    def _handle(self, request: int, payload: bytes, fds: list[int]) -> bytes | None:
        log.debug("vhost-user: %s (%d bytes, %d fds)", NAMES.get(request, request), len(payload), len(fds))
        if request == GET_FEATURES:
            return _U64.pack(FEATURES)
        if request == SET_FEATURES:
            (features,) = _U64.unpack_from(payload)
            if features & ~FEATURES:
                raise VMError(f"vhost-user: QEMU asked for features 0x{features & ~FEATURES:x} kvmpod never offered")
            self.features = features
            return None
        if request == GET_PROTOCOL_FEATURES:
            return _U64.pack(PROTOCOL_FEATURES)
        if request == SET_PROTOCOL_FEATURES:
            return None
        if request == GET_QUEUE_NUM:
            return _U64.pack(NUM_QUEUES)
        if request in (SET_OWNER, RESET_OWNER, RESET_DEVICE):
            if request != SET_OWNER:
                self._stop_rings()
            return None
        if request == GET_CONFIG:
            offset, size, cflags = _CONFIG.unpack_from(payload)
            config = self.device.config_space()
            if offset + size > 256 or len(payload) < _CONFIG.size + size:
                raise VMError(f"vhost-user: GET_CONFIG of {size} bytes at {offset}")
            data = config[offset:offset + size].ljust(size, b"\0")
            return _CONFIG.pack(offset, size, cflags) + data
        if request == SET_CONFIG:
            return None  # the guest CID is read-only
        if request == SET_MEM_TABLE:
            self._set_mem_table(payload, fds)
            return None
        if request == SET_VRING_NUM:
            index, num = _STATE.unpack_from(payload)
            self._queue(index).set_size(num)
            return None
        if request == SET_VRING_ADDR:
            index, _flags, desc, used, avail, _log = _ADDR.unpack_from(payload)
            q = self._queue(index)
            q.desc_user, q.used_user, q.avail_user = desc, used, avail
            q.map(self.memory)
            return None
        if request == SET_VRING_BASE:
            index, num = _STATE.unpack_from(payload)
            q = self._queue(index)
            q.last_avail = q.used_idx = num & 0xFFFF
            q.resync = True
            return None
        if request == GET_VRING_BASE:
            (index, _) = _STATE.unpack_from(payload)
            q = self._queue(index)
            self._stop_queue(q)
            return _STATE.pack(index, q.last_avail)
        if request in (SET_VRING_KICK, SET_VRING_CALL, SET_VRING_ERR):
            (value,) = _U64.unpack_from(payload)
            q = self._queue(value & VRING_INDEX_MASK)
            if value & VRING_NOFD:
                if request == SET_VRING_KICK:
                    raise VMError("vhost-user: polling mode (a kick without eventfd) is not supported")
                return None
            fd = self._take_fd(fds, NAMES[request])
            os.set_blocking(fd, False)
            if request == SET_VRING_ERR:
                os.close(fd)
            elif request == SET_VRING_CALL:
                if q.call_fd is not None:
                    os.close(q.call_fd)
                q.call_fd = fd
            else:
                self._set_kick(q, fd)
            return None
        if request == SET_VRING_ENABLE:
            index, num = _STATE.unpack_from(payload)
            q = self._queue(index)
            q.enabled = bool(num)
            if q.ready:
                self.device.queue_started(q.index)
            return None
        raise VMError(f"vhost-user: unsupported request {NAMES.get(request, request)}")

    def _set_mem_table(self, payload: bytes, fds: list[int]) -> None:
        (count, _pad) = _STATE.unpack_from(payload)
        if count > MAX_FDS or len(payload) < 8 + count * _REGION.size or len(fds) < count:
            raise VMError(f"vhost-user: memory table of {count} regions with {len(fds)} descriptors")
        old = self.memory
        self.memory = GuestMemory()
        for i in range(count):
            guest, size, user, offset = _REGION.unpack_from(payload, 8 + i * _REGION.size)
            self.memory.add(self._take_fd(fds, "memory region"), guest, size, user, offset)
        for q in self.queues:
            q.map(self.memory)
        self.device.memory_changed()
        old.close()

    def _set_kick(self, q: VirtQueue, fd: int) -> None:
        if q.kick_fd is not None:
            self._loop.remove_reader(q.kick_fd)
            os.close(q.kick_fd)
        q.kick_fd = fd
        self._loop.add_reader(fd, self._kicked, q)
        if q.ready:
            self.device.queue_started(q.index)

    def _kicked(self, q: VirtQueue) -> None:
        try:
            if q.kick_fd is not None:
                os.read(q.kick_fd, 8)
        except BlockingIOError:
            pass
        except OSError as e:
            self._fail(VMError(f"vhost-user: kick eventfd of queue {q.index}: {e.strerror}"))
            return
        self.device.queue_kicked(q.index)

    def _stop_queue(self, q: VirtQueue) -> None:
        if q.kick_fd is not None:
            self._loop.remove_reader(q.kick_fd)
        q.close_fds()
        q.unmap()
        unused = self.device.queue_stopped(q.index)
        q.unpop(unused)   # GET_VRING_BASE: where the device resumes

    def _stop_rings(self) -> None:
        for q in self.queues:
            self._stop_queue(q)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._loop.remove_reader(self.sock.fileno())
        for q in self.queues:
            if q.kick_fd is not None:
                self._loop.remove_reader(q.kick_fd)
            q.close_fds()
            q.unmap()
        self.sock.close()
        self.memory.close()
