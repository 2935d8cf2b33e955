"""The virtio-vsock device: packets, connections and credit, between guest rings and host sockets.

Every vsock connection is bridged to one host-side stream socket (a unix socket, or one end of a
socketpair for connections kvmpod itself makes, like the agent channel):

* the host connects to a guest port through the pod's `vsock.sock` with Firecracker's convention
  (`CONNECT <port>\\n`, answered `OK <host port>\\n` once the guest accepted; closed on refusal);
* a guest connection to host port P (CID 2) is connected to the unix socket `<vsock.sock>_P`;
  nothing listening there answers the guest with RST.

Flow control is virtio-vsock's credit: kvmpod advertises BUF_ALLOC bytes per connection and never
holds more than that of guest data a host socket has not taken; it reads from a host socket only
while the guest has credit for it and has posted receive buffers, so memory stays bounded whatever
either side does. The guest is hostile: a malformed packet is answered with RST and counted, and
MALFORMED_LIMIT of them — or one broken descriptor — cut the guest off (`fail`), which ends the pod
with a GuestFault. Specified in docs/vsock.md.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import logging
import os
import socket
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from kvmpod.errors import GuestFault, KvmpodError, VMError
from kvmpod.vsock.vhost_user import VhostUserConnection
from kvmpod.vsock.virtqueue import Chain, VirtQueue

log = logging.getLogger(__name__)

HOST_CID = 2
RX, TX, EVENT = 0, 1, 2

HEADER = struct.Struct("<QQIIIHHIII")   # struct virtio_vsock_hdr, little endian, packed: 44 bytes
TYPE_STREAM = 1
OP_INVALID, OP_REQUEST, OP_RESPONSE, OP_RST, OP_SHUTDOWN, OP_RW, OP_CREDIT_UPDATE, OP_CREDIT_REQUEST = range(8)
OP_NAMES = {1: "REQUEST", 2: "RESPONSE", 3: "RST", 4: "SHUTDOWN", 5: "RW", 6: "CREDIT_UPDATE", 7: "CREDIT_REQUEST"}
SHUTDOWN_RCV, SHUTDOWN_SEND = 1, 2

BUF_ALLOC = 256 * 1024        # receive buffer kvmpod advertises per connection (the guest's credit)
CREDIT_THRESHOLD = 64 * 1024  # consumed bytes after which a CREDIT_UPDATE goes out unasked
MAX_PACKET = 64 * 1024        # largest payload a guest packet may carry (Linux sends at most 64 KiB)
MAX_CONNECTIONS = 1024        # per pod; more guest REQUESTs are refused with RST
MALFORMED_LIMIT = 16          # malformed packets before the guest is cut off
MAX_QUEUED = 4096             # control packets waiting for receive buffers before the guest is cut off
HOST_PORT_BASE = 1 << 30      # local ports of host-initiated connections (as Firecracker)
CONNECT_LINE_MAX = 32         # "CONNECT 4294967295\n" fits
MAX_PENDING_FRONT = 64        # front connections read at once before their CONNECT line; more wait in the backlog
FRONT_BACKLOG = socket.SOMAXCONN  # a burst of host connects waits in the kernel instead of failing
BATCH = 64                    # chains handled per event before yielding to the loop


def _describe(hdr: tuple) -> str:
    """A guest packet's header in one line: `op RST type 0, 0:0 -> 0:0, 0 bytes, flags 0x0, buf_alloc 0,
    fwd_cnt 0`."""
    src_cid, dst_cid, src_port, dst_port, length, ptype, op, flags, buf_alloc, fwd_cnt = hdr
    return (f"op {OP_NAMES.get(op, op)} type {ptype}, {src_cid}:{src_port} -> {dst_cid}:{dst_port}, "
            f"{length} bytes, flags 0x{flags:x}, buf_alloc {buf_alloc}, fwd_cnt {fwd_cnt}")


class State(enum.Enum):
    CONNECTING = "connecting"   # host-initiated, REQUEST sent
    CONNECTED = "connected"
    CLOSED = "closed"


@dataclass(eq=False)
class Connection:
    host_port: int
    guest_port: int
    sock: socket.socket
    state: State
    on_connect: Callable[[bool], None] | None = None   # host-initiated: told whether the guest accepted
    peer_buf_alloc: int = 0
    peer_fwd_cnt: int = 0
    tx_cnt: int = 0           # payload bytes sent to the guest
    rx_cnt: int = 0           # payload bytes received from the guest
    fwd_cnt: int = 0          # of those, taken by the host socket
    fwd_reported: int = 0     # fwd_cnt the guest last heard of
    to_host: bytearray = field(default_factory=bytearray)
    guest_shut: int = 0       # SHUTDOWN flags the guest sent
    host_eof: bool = False    # the host socket's reading side ended (SHUTDOWN(SEND) sent to the guest)
    host_shut: bool = False   # shutdown(SHUT_WR) done on the host socket
    reading: bool = False
    writing: bool = False

    @property
    def key(self) -> tuple[int, int]:
        return (self.host_port, self.guest_port)

    def credit(self) -> int:
        """Bytes the guest can take from us now."""
        return max(0, self.peer_buf_alloc - ((self.tx_cnt - self.peer_fwd_cnt) & 0xFFFFFFFF))


class VsockDevice:
    """The device model for one pod (the VhostUserBackend its vhost-user connection calls). Lives in
    the asyncio loop; everything is event-driven."""

    def __init__(self, guest_cid: int, uds_path: Path | None = None,
                 on_failure: Callable[[KvmpodError], None] | None = None):
        self.guest_cid = guest_cid
        self.uds_path = uds_path
        self.on_failure = on_failure
        self.failure: KvmpodError | None = None
        self.vhost: VhostUserConnection | None = None
        self.conns: dict[tuple[int, int], Connection] = {}
        self.malformed = 0
        self._first_malformed = ""
        self._queued: collections.deque[tuple[bytes, Connection | None]] = collections.deque()
        self._spare_rx: collections.deque[Chain] = collections.deque()
        self._next_port = HOST_PORT_BASE
        self._rx_blocked = False
        self._loop = asyncio.get_running_loop()
        self._listeners: list[socket.socket] = []
        self._front_pending: dict[socket.socket, bytes] = {}   # front sockets -> CONNECT line so far
        self._front_listener: socket.socket | None = None
        self._front_paused = False   # MAX_PENDING_FRONT reached: new connections wait in the backlog

    # -- life cycle ------------------------------------------------------------------------------

    def config_space(self) -> bytes:
        return struct.pack("<Q", self.guest_cid)

    def listen_vhost_user(self, path: Path) -> None:
        """Listen for the front-end (QEMU) before it starts; the first connection is served."""
        self._listen(path, self._accept_vhost, backlog=16)

    def listen_front(self) -> None:
        """The Firecracker-style unix socket host programs reach guest ports through. Its backlog is
        deep: a connect() to a unix socket whose backlog is full fails at once with EAGAIN when the
        socket is non-blocking (Python's with a timeout, Go's always), and a burst of connects while
        the loop is busy with the guest filled a backlog of 16 (the CI hang of docs/reliability.md)."""
        if self.uds_path is not None:
            self._front_listener = self._listen(self.uds_path, self._accept_front, backlog=FRONT_BACKLOG)

    def _listen(self, path: Path, on_accept: Callable[[socket.socket], None], backlog: int) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            sock.bind(str(path))
            os.chmod(path, 0o600)
            sock.listen(backlog)
        except OSError as e:
            sock.close()
            raise VMError(f"{path}: cannot listen: {e.strerror}") from e
        sock.setblocking(False)
        self._listeners.append(sock)
        self._loop.add_reader(sock.fileno(), self._on_listener, sock, on_accept)
        return sock

    def _on_listener(self, listener: socket.socket, on_accept: Callable[[socket.socket], None]) -> None:
        try:
            conn, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            log.debug("vsock: accept: %s", e)
            return
        on_accept(conn)

    def _accept_vhost(self, sock: socket.socket) -> None:
        if self.vhost is not None or self.failure is not None:
            sock.close()  # one front-end, once
            return
        self.vhost = VhostUserConnection(sock, self)

    def close(self) -> None:
        """Close everything: listeners, every connection, the front-end. Idempotent."""
        for sock in self._listeners:
            self._loop.remove_reader(sock.fileno())
            with contextlib.suppress(OSError):
                path = sock.getsockname()
                if path:
                    os.unlink(path)
            sock.close()
        self._listeners.clear()
        self._front_listener = None
        for sock in list(self._front_pending):
            self._drop_front(sock)
        for conn in list(self.conns.values()):
            self._close(conn, notify_guest=False)
        self._queued.clear()
        self._spare_rx.clear()
        if self.vhost is not None:
            self.vhost.close()

    def fail(self, error: KvmpodError) -> None:
        """Cut the guest off: every connection closes, and the owner learns why (once)."""
        if self.failure is not None:
            return
        self.failure = error
        log.debug("vsock: %s", error)
        self.close()
        if self.on_failure:
            self.on_failure(error)

    def _bug(self, error: Exception) -> None:
        """An exception of kvmpod's own escaped the device (not the guest's doing: that is GuestFault).
        Left to the loop, it would leave a chain taken and never used, and the guest's ring stalled:
        the pod ends instead, with the cause chained for --debug."""
        failure = VMError(f"the vsock device failed: {type(error).__name__}: {error}")
        failure.__cause__ = error
        self.fail(failure)

    def front_end_gone(self) -> None:
        """QEMU closed the vhost-user socket (it is exiting): the guest's connections end with it."""
        self.vhost = None
        self._queued.clear()
        self._spare_rx.clear()   # views of the guest memory that went with it
        for conn in list(self.conns.values()):
            self._close(conn, notify_guest=False)

    # -- the VhostUserBackend the vhost-user connection calls ------------------------------------

    def _queue(self, index: int) -> VirtQueue | None:
        return self.vhost.queues[index] if self.vhost is not None else None

    def memory_changed(self) -> None:
        """A new memory table (SET_MEM_TABLE, also while the rings run): the spare receive buffers are
        views into the old mapping, so they go back to the ring, to be taken again through the new one.
        Dropped instead, they were lost to the guest, and the next stop and start skipped their used
        slots (the CI hang of docs/reliability.md)."""
        rx = self._queue(RX)
        if rx is not None:
            rx.unpop(len(self._spare_rx))   # the last ones taken: the device uses chains in order
        self._spare_rx.clear()

    def queue_started(self, index: int) -> None:
        self.queue_kicked(index)

    def queue_stopped(self, index: int) -> int:
        """The queue stops (QEMU's stop/cont, a reset): how many buffers it took from the guest without
        using them, which the ring's base is rewound by, so that the guest's buffers are offered again
        when it restarts instead of being lost (they are the last ones taken: used in order)."""
        if index == RX:
            unused = len(self._spare_rx)
            self._spare_rx.clear()
            return unused
        return 0

    def queue_kicked(self, index: int) -> None:
        try:
            if index == TX:
                self._drain_tx()
            elif index == RX:
                self._rx_blocked = False
                self._flush_queued()
                self._resume_readers()
        except GuestFault as e:
            self.fail(GuestFault(f"the guest broke its vsock device: {e}"))
        except KvmpodError as e:
            self.fail(e)
        except Exception as e:  # noqa: BLE001 — kvmpod's own bug: end the pod with it, never stall a ring
            self._bug(e)

    # -- guest to host ---------------------------------------------------------------------------

    def _drain_tx(self) -> None:
        tx = self._queue(TX)
        if tx is None:
            return
        handled = 0
        while self.failure is None and (chain := tx.pop()) is not None:
            if chain.writable:
                raise GuestFault("a transmit descriptor is device-writable")
            self._packet(chain)
            if self.failure is not None:
                return
            tx.push(chain, 0)
            handled += 1
            if handled % BATCH == 0:
                tx.notify()
        if handled:
            tx.notify()
        self._flush_rx_notify()

    def _malformed(self, why: str, hdr: tuple | None = None) -> None:
        self.malformed += 1
        if hdr is not None:   # the whole header: a cut-off must say what the guest sent (docs/reliability.md)
            why = f"{why}: {_describe(hdr)}"
        log.debug("vsock: malformed packet %d: %s", self.malformed, why)
        if self.malformed == 1:
            self._first_malformed = why
        if hdr is not None:  # reset what it names, as Linux does; never answer RST with RST
            conn = self.conns.get((hdr[3], hdr[2]))
            if conn is not None:
                self._close(conn, notify_guest=True)
            elif hdr[6] != OP_RST:
                self._send_rst_to(hdr)
        if self.malformed >= MALFORMED_LIMIT:
            raise GuestFault(f"{self.malformed} malformed vsock packets (the first: {self._first_malformed}; "
                             f"the last: {why})")

    def _packet(self, chain: Chain) -> None:
        total = chain.readable_len
        if total < HEADER.size:
            self._malformed(f"a {total}-byte packet is shorter than the {HEADER.size}-byte header")
            return
        hdr = HEADER.unpack(chain.read(0, HEADER.size))
        src_cid, dst_cid, src_port, dst_port, length, ptype, op, flags, buf_alloc, fwd_cnt = hdr
        if length > MAX_PACKET or length > total - HEADER.size:
            self._malformed(f"payload length {length} with {total - HEADER.size} bytes of buffer", hdr)
            return
        if src_cid != self.guest_cid:
            self._malformed(f"source CID {src_cid}, the guest's is {self.guest_cid}", hdr)
            return
        if ptype != TYPE_STREAM:
            self._malformed(f"socket type {ptype} (only stream sockets are offered)", hdr)
            return
        if op not in OP_NAMES:
            self._malformed(f"unknown operation {op}", hdr)
            return
        if op != OP_RW and length:
            self._malformed(f"{OP_NAMES[op]} carries {length} bytes of payload", hdr)
            return
        if dst_cid != HOST_CID:  # another VM, or itself: there is nobody else on this device
            if op != OP_RST:
                self._send_rst_to(hdr)
            return
        conn = self.conns.get((dst_port, src_port))
        if op == OP_REQUEST:
            if conn is not None:
                self._malformed(f"REQUEST for the open connection {src_port}->{dst_port}", hdr)
                return
            self._guest_connect(hdr)
            return
        if conn is None:
            if op != OP_RST:
                self._send_rst_to(hdr)  # a connection that is gone (or never was): as Linux does
            return
        conn.peer_buf_alloc, conn.peer_fwd_cnt = buf_alloc, fwd_cnt
        if op == OP_RST:
            self._close(conn, notify_guest=False)
        elif op == OP_RESPONSE:
            if conn.state is not State.CONNECTING:
                self._malformed(f"RESPONSE on the established connection {dst_port}<-{src_port}", hdr)
                self._close(conn, notify_guest=False)
                return
            conn.state = State.CONNECTED
            if conn.on_connect:
                conn.on_connect(True)
                conn.on_connect = None
            self._update_reader(conn)
        elif conn.state is not State.CONNECTED:
            self._malformed(f"{OP_NAMES[op]} before the connection was accepted", hdr)
            self._close(conn, notify_guest=False)
        elif op == OP_RW:
            self._guest_data(conn, chain, length, hdr)
        elif op == OP_SHUTDOWN:
            conn.guest_shut |= flags & (SHUTDOWN_RCV | SHUTDOWN_SEND)
            self._after_shutdown(conn)
        elif op == OP_CREDIT_REQUEST:
            self._send(conn, OP_CREDIT_UPDATE)
        else:  # CREDIT_UPDATE: the new credit is in the header, taken above
            self._update_reader(conn)

    def _guest_connect(self, hdr: tuple) -> None:
        """The guest connects to host port dst_port: to the unix socket <uds>_<port>, or RST."""
        src_port, dst_port = hdr[2], hdr[3]
        if self.uds_path is None or len(self.conns) >= MAX_CONNECTIONS:
            self._send_rst_to(hdr)
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        try:
            sock.connect(f"{self.uds_path}_{dst_port}")
        except OSError:  # nobody listens (ENOENT, ECONNREFUSED), or its backlog is full (EAGAIN)
            sock.close()
            self._send_rst_to(hdr)
            return
        conn = Connection(dst_port, src_port, sock, State.CONNECTED, peer_buf_alloc=hdr[8], peer_fwd_cnt=hdr[9])
        self.conns[conn.key] = conn
        self._send(conn, OP_RESPONSE)
        self._update_reader(conn)

    def _guest_data(self, conn: Connection, chain: Chain, length: int, hdr: tuple) -> None:
        if conn.guest_shut & SHUTDOWN_SEND:
            self._malformed(f"data after SHUTDOWN on {conn.host_port}<-{conn.guest_port}", hdr)
            self._close(conn, notify_guest=False)
            return
        if length + len(conn.to_host) > BUF_ALLOC:
            self._malformed(f"{length} bytes beyond the credit of connection {conn.host_port}<-{conn.guest_port}", hdr)
            self._close(conn, notify_guest=False)
            return
        if not length:
            return
        data = chain.read(HEADER.size, length)
        conn.rx_cnt = (conn.rx_cnt + length) & 0xFFFFFFFF
        if conn.to_host:
            conn.to_host += data
        else:
            try:
                sent = conn.sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self._close(conn, notify_guest=True)   # the host end is gone: the guest gets RST
                return
            if sent < length:
                conn.to_host += data[sent:]
            conn.fwd_cnt = (conn.fwd_cnt + sent) & 0xFFFFFFFF
        self._flush_host(conn)

    def _flush_host(self, conn: Connection) -> None:
        """Write what the guest sent to the host socket; credit follows what the socket took."""
        while conn.to_host:
            try:
                sent = conn.sock.send(conn.to_host)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._close(conn, notify_guest=True)
                return
            del conn.to_host[:sent]
            conn.fwd_cnt = (conn.fwd_cnt + sent) & 0xFFFFFFFF
        want_write = bool(conn.to_host)
        if want_write != conn.writing:
            conn.writing = want_write
            if want_write:
                self._loop.add_writer(conn.sock.fileno(), self._host_writable, conn)
            else:
                self._loop.remove_writer(conn.sock.fileno())
        if (conn.fwd_cnt - conn.fwd_reported) & 0xFFFFFFFF >= CREDIT_THRESHOLD:
            self._send(conn, OP_CREDIT_UPDATE)
        if not conn.to_host:
            self._after_shutdown(conn)

    def _host_writable(self, conn: Connection) -> None:
        try:
            self._flush_host(conn)
            self._flush_rx_notify()
        except KvmpodError as e:
            self.fail(e)
        except Exception as e:  # noqa: BLE001 — as in queue_kicked
            self._bug(e)

    def _after_shutdown(self, conn: Connection) -> None:
        if conn.state is State.CLOSED or conn.to_host:
            return
        if conn.guest_shut & SHUTDOWN_SEND and not conn.host_shut:
            conn.host_shut = True
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_WR)
        if conn.guest_shut == SHUTDOWN_RCV | SHUTDOWN_SEND:
            self._close(conn, notify_guest=True)   # both ways done: RST completes the guest's close
        else:
            self._update_reader(conn)

    # -- host to guest ---------------------------------------------------------------------------

    def _header(self, conn: Connection, op: int, length: int = 0, flags: int = 0) -> bytes:
        conn.fwd_reported = conn.fwd_cnt
        return HEADER.pack(HOST_CID, self.guest_cid, conn.host_port, conn.guest_port, length, TYPE_STREAM, op,
                           flags, BUF_ALLOC, conn.fwd_cnt)

    def _send(self, conn: Connection, op: int, flags: int = 0) -> None:
        self._enqueue(self._header(conn, op, 0, flags), conn)

    def _send_rst_to(self, hdr: tuple) -> None:
        """RST in answer to a guest packet that has no connection."""
        self._enqueue(HEADER.pack(HOST_CID, self.guest_cid, hdr[3], hdr[2], 0, TYPE_STREAM, OP_RST, 0, 0, 0), None)

    def _enqueue(self, packet: bytes, conn: Connection | None) -> None:
        if len(self._queued) >= MAX_QUEUED:
            raise GuestFault(f"it took no receive buffers while {MAX_QUEUED} packets waited")
        self._queued.append((packet, conn))
        if len(self._queued) == 1:
            self._flush_queued()

    def _take_rx(self) -> Chain | None:
        if self._spare_rx:
            return self._spare_rx.popleft()
        rx = self._queue(RX)
        if rx is None:
            return None
        chain = rx.pop()
        if chain is not None and (chain.readable or chain.writable_len < HEADER.size):
            raise GuestFault(f"a receive buffer of {chain.writable_len} writable bytes "
                             f"({len(chain.readable)} device-readable)")
        return chain

    def _flush_queued(self) -> None:
        """Control packets first, in order, as receive buffers allow."""
        rx = self._queue(RX)
        if rx is None or not self._queued:
            return
        delivered = 0
        while self._queued:
            chain = self._take_rx()
            if chain is None:
                self._rx_blocked = True
                break
            packet, _conn = self._queued.popleft()
            chain.write(packet)
            rx.push(chain, len(packet))
            delivered += 1
        if delivered:
            rx.notify()

    def _flush_rx_notify(self) -> None:
        self._flush_queued()
        if not self._queued and not self._rx_blocked:
            self._resume_readers()

    def _wants_read(self, conn: Connection) -> bool:
        return (conn.state is State.CONNECTED and not conn.host_eof and not conn.guest_shut & SHUTDOWN_RCV
                and conn.credit() > 0 and not self._queued and not self._rx_blocked and self.failure is None)

    def _update_reader(self, conn: Connection) -> None:
        want = conn.state is not State.CLOSED and self._wants_read(conn)
        if want != conn.reading:
            conn.reading = want
            if want:
                self._loop.add_reader(conn.sock.fileno(), self._host_readable, conn)
            else:
                self._loop.remove_reader(conn.sock.fileno())

    def _resume_readers(self) -> None:
        for conn in list(self.conns.values()):
            self._update_reader(conn)

    def _pause_readers(self) -> None:
        for conn in self.conns.values():
            if conn.reading:
                conn.reading = False
                self._loop.remove_reader(conn.sock.fileno())

    def _host_readable(self, conn: Connection) -> None:
        try:
            self._read_host(conn)
        except GuestFault as e:
            self.fail(GuestFault(f"the guest broke its vsock device: {e}"))
        except KvmpodError as e:
            self.fail(e)
        except Exception as e:  # noqa: BLE001 — kvmpod's own bug: end the pod with it, never stall a ring
            self._bug(e)

    def _read_host(self, conn: Connection) -> None:
        rx = self._queue(RX)
        if rx is None:
            self._pause_readers()
            return
        delivered = 0
        while delivered < BATCH and self._wants_read(conn):
            chain = self._take_rx()
            if chain is None:
                self._rx_blocked = True
                break
            room = min(chain.writable_len - HEADER.size, conn.credit(), MAX_PACKET)
            if room <= 0:
                # a receive buffer of the header alone (the credit is checked above) carries no data; a
                # recv() of 0 bytes would read as the host's EOF. It takes a credit update instead, and
                # the data goes in the next buffer: chains are used in the order they were taken
                packet = self._header(conn, OP_CREDIT_UPDATE)
                chain.write(packet)
                rx.push(chain, len(packet))
                delivered += 1
                continue
            try:
                data = conn.sock.recv(room) if room > 0 else b""
            except (BlockingIOError, InterruptedError):
                self._spare_rx.appendleft(chain)
                break
            except OSError:
                self._spare_rx.appendleft(chain)
                self._close(conn, notify_guest=True)
                break
            if not data:  # the host program shut its sending side (or closed): tell the guest
                self._spare_rx.appendleft(chain)
                conn.host_eof = True
                self._send(conn, OP_SHUTDOWN, SHUTDOWN_SEND)
                break
            packet = self._header(conn, OP_RW, len(data))
            chain.write(packet)
            chain.write(data, HEADER.size)
            rx.push(chain, len(packet) + len(data))
            conn.tx_cnt = (conn.tx_cnt + len(data)) & 0xFFFFFFFF
            delivered += 1
        if delivered:
            rx.notify()
        if self._rx_blocked or self._queued:
            self._pause_readers()
        else:
            self._update_reader(conn)

    # -- host-initiated connections --------------------------------------------------------------

    def _new_host_port(self) -> int:
        while True:
            port = self._next_port
            self._next_port = HOST_PORT_BASE if port >= 0xFFFFFFFE else port + 1
            if not any(k[0] == port for k in self.conns):
                return port

    def connect_guest(self, port: int, sock: socket.socket, on_connect: Callable[[bool], None]) -> None:
        """Connect `sock` (the host end) to guest `port`: on_connect(True) once the guest accepted,
        on_connect(False) if it refused (RST) or the device went away."""
        if self.failure is not None or len(self.conns) >= MAX_CONNECTIONS:
            on_connect(False)
            return
        sock.setblocking(False)
        conn = Connection(self._new_host_port(), port, sock, State.CONNECTING, on_connect)
        self.conns[conn.key] = conn
        try:
            self._send(conn, OP_REQUEST)
        except GuestFault as e:
            self.fail(GuestFault(f"the guest broke its vsock device: {e}"))

    async def connect(self, port: int) -> socket.socket:
        """A connection to guest `port` for kvmpod itself: the returned socket is the host end.
        Raises ConnectionRefusedError when the guest answers RST (nothing listens yet)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        done: asyncio.Future[bool] = self._loop.create_future()

        def settle(ok: bool) -> None:
            if not done.done():
                done.set_result(ok)

        self.connect_guest(port, ours, settle)
        try:
            accepted = await done
        except BaseException:
            theirs.close()
            self._abandon(ours)
            raise
        if not accepted:
            theirs.close()
            raise ConnectionRefusedError(f"vsock port {port} refused the connection")
        return theirs

    def _abandon(self, sock: socket.socket) -> None:
        for conn in list(self.conns.values()):
            if conn.sock is sock:
                self._close(conn, notify_guest=True)

    # -- the Firecracker-style front: CONNECT <port>\n -> OK <host port>\n ----------------------------

    def _accept_front(self, sock: socket.socket) -> None:
        if self.failure is not None:
            sock.close()
            return
        sock.setblocking(False)
        self._front_pending[sock] = b""
        self._loop.add_reader(sock.fileno(), self._front_line, sock)
        if len(self._front_pending) >= MAX_PENDING_FRONT and self._front_listener is not None:
            # Backpressure, not refusal: the host program's connect waits in the backlog until a
            # pending connection has sent its line (or gone), as with any busy server.
            self._front_paused = True
            self._loop.remove_reader(self._front_listener.fileno())

    def _front_settled(self, sock: socket.socket) -> None:
        """`sock` is no longer waiting for its CONNECT line: a paused listener may accept again."""
        self._front_pending.pop(sock, None)
        self._loop.remove_reader(sock.fileno())
        listener = self._front_listener
        if self._front_paused and listener is not None and len(self._front_pending) < MAX_PENDING_FRONT:
            self._front_paused = False
            self._loop.add_reader(listener.fileno(), self._on_listener, listener, self._accept_front)

    def _drop_front(self, sock: socket.socket) -> None:
        self._front_settled(sock)
        sock.close()

    def _front_line(self, sock: socket.socket) -> None:
        # Peek, so that nothing after the line is taken: it is the connection's first data.
        so_far = self._front_pending[sock]
        try:
            peek = sock.recv(CONNECT_LINE_MAX - len(so_far), socket.MSG_PEEK)
            end = peek.find(b"\n")
            taken = sock.recv(end + 1 if end >= 0 else len(peek)) if peek else b""
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop_front(sock)
            return
        line = so_far + taken
        if end < 0:
            if not peek or len(line) >= CONNECT_LINE_MAX:
                self._drop_front(sock)  # closed, or not a CONNECT line
            else:
                self._front_pending[sock] = line
            return
        words = line.split()
        self._front_settled(sock)
        if len(words) != 2 or words[0] != b"CONNECT" or not words[1].isdigit() or not 0 < int(words[1]) < 1 << 32:
            sock.close()
            return
        port = int(words[1])

        def connected(ok: bool) -> None:
            if not ok:
                return  # _close has closed the socket: that is the refusal
            conn = next((c for c in self.conns.values() if c.sock is sock), None)
            if conn is None:
                return
            try:
                sock.send(f"OK {conn.host_port}\n".encode())
            except OSError:
                self._close(conn, notify_guest=True)

        self.connect_guest(port, sock, connected)

    # -- closing ---------------------------------------------------------------------------------

    def _close(self, conn: Connection, notify_guest: bool) -> None:
        """Forget a connection and close its host socket; `notify_guest`: send RST first."""
        if conn.state is State.CLOSED:
            return
        if notify_guest and self.vhost is not None and self.failure is None:
            with contextlib.suppress(GuestFault):
                self._send(conn, OP_RST)
        conn.state = State.CLOSED
        self.conns.pop(conn.key, None)
        if conn.reading:
            self._loop.remove_reader(conn.sock.fileno())
        if conn.writing:
            self._loop.remove_writer(conn.sock.fileno())
        conn.reading = conn.writing = False
        conn.to_host.clear()
        conn.sock.close()
        if conn.on_connect:
            callback, conn.on_connect = conn.on_connect, None
            callback(False)

