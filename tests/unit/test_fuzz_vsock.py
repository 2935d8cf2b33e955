"""Fuzzing the userspace vsock backend (kvmpod/vsock/; issue 23, docs/reliability.md "Fuzzing"): the part
of kvmpod that parses guest-controlled memory in its own process, as root.

A fake guest lays out split virtqueues in fake guest RAM (two adjacent anonymous mappings, so that a
buffer may straddle regions) and does anything a guest can: writes random descriptors (addresses in, at
the edge of and outside RAM; any length, flags and chain link), publishes any head, moves the available
index anywhere, posts receive buffers of any size and kind, and sends packets with random headers
(CIDs, ports, operations, types, lengths, flags, credit values) split over descriptor chains. Host
programs listen on a few ports, connect to the guest, send and read. The device
(kvmpod/vsock/device.py) is driven through the calls its vhost-user connection makes (queue_kicked).

The promises: whatever the guest does, no exception escapes the device, and the only way the device
gives up is cutting the guest off with GuestFault (a one-line message; every connection closed, no
more work done); no step runs away (each is time-bounded); what the device holds stays bounded (the
control packets queued, the bytes held for each host socket, the connections, the spare receive
buffers); and it never writes outside the buffers the guest made device-writable.

tests/unit/test_vsock_backend.py drives the same device through a real vhost-user socket, case by case.
"""

from __future__ import annotations

import asyncio
import mmap
import os
import socket
import struct
import tempfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvmpod.errors import GuestFault, KvmpodError
from kvmpod.vsock import device as d
from kvmpod.vsock.device import HEADER, VsockDevice
from kvmpod.vsock.virtqueue import GuestMemory, Region, VirtQueue
from tests.fuzzing import fuzz, time_bound

GUEST_CID = 7
REGION = 64 << 10                # two adjacent regions of guest RAM
GUEST_BASE = 0x100000
USER_BASE = 0x7F0000000000
QSIZE_MAX = 16
RING = 0x1000                    # each queue's rings: desc, avail, used, in this many bytes
BUFS = 3 * RING                  # where the guest's buffers start
HOST_PORTS = (5000, 5001)        # host programs listen here
STEP_BOUND = 5.0                 # seconds one guest action may take (it takes microseconds)

_DESC = struct.Struct("<QIHH")


class FakeVhost:
    """The device's view of its vhost-user connection: the queues, started."""

    def __init__(self, memory: GuestMemory, qsize: int):
        self.queues = [VirtQueue(i) for i in range(3)]
        self.closed = False
        for q in self.queues[:2]:
            q.set_size(qsize)
            base = USER_BASE + q.index * RING
            q.desc_user, q.avail_user, q.used_user = base, base + 16 * qsize, base + 16 * qsize + 4 + 2 * qsize + 6
            q.map(memory)
            q.kick_fd = os.eventfd(0, os.EFD_NONBLOCK)
            q.call_fd = os.eventfd(0, os.EFD_NONBLOCK)

    def close(self) -> None:
        self.closed = True


class Guest:
    """Fake guest RAM and the guest driver's side of the rings."""

    def __init__(self, qsize: int):
        self.maps = [mmap.mmap(-1, REGION), mmap.mmap(-1, REGION)]
        self.memory = GuestMemory()
        for i, m in enumerate(self.maps):
            self.memory.regions.append(Region(GUEST_BASE + i * REGION, REGION, USER_BASE + i * REGION, m,
                                              memoryview(m)))
        self.qsize = qsize
        self.avail_idx = [0, 0]
        self.next_buf = BUFS
        self.writable: list[tuple[int, int]] = []   # (offset, length) the guest made device-writable
        self.mirror = bytearray(2 * REGION)          # RAM as the guest wrote it

    def ram(self, off: int) -> tuple[mmap.mmap, int]:
        return self.maps[off // REGION], off % REGION

    def write(self, off: int, data: bytes) -> None:
        for i, b in enumerate(data):   # small writes only: headers and short payloads
            m, o = self.ram(off + i)
            m[o] = b
            self.mirror[off + i] = b

    def snapshot(self) -> bytes:
        return bytes(self.maps[0]) + bytes(self.maps[1])

    def ring(self, q: int) -> tuple[int, int, int]:
        base = q * RING
        return base, base + 16 * self.qsize, base + 16 * self.qsize + 4 + 2 * self.qsize + 6

    def set_desc(self, q: int, i: int, addr: int, length: int, flags: int, nxt: int) -> None:
        if flags & d_WRITE and GUEST_BASE <= addr and addr + length <= GUEST_BASE + 2 * REGION:
            self.writable.append((addr - GUEST_BASE, length))
        self.write(self.ring(q)[0] + 16 * (i % self.qsize), _DESC.pack(addr, length, flags, nxt))

    def publish(self, q: int, head: int) -> None:
        avail = self.ring(q)[1]
        self.write(avail + 4 + 2 * (self.avail_idx[q] % self.qsize), struct.pack("<H", head))
        self.avail_idx[q] = (self.avail_idx[q] + 1) & 0xFFFF
        self.write(avail + 2, struct.pack("<H", self.avail_idx[q]))

    def set_avail_idx(self, q: int, idx: int) -> None:
        self.avail_idx[q] = idx
        self.write(self.ring(q)[1] + 2, struct.pack("<H", idx))

    def alloc(self, size: int) -> int:
        if self.next_buf + size > 2 * REGION:
            self.next_buf = BUFS
        off = self.next_buf
        self.next_buf += max(size, 1)
        return off


d_WRITE = 2

# ==================================================================================================
# The guest's actions.

_U16 = st.integers(0, 0xFFFF)
_U32 = st.sampled_from([0, 1, 44, 4096, d.BUF_ALLOC, 2**31, 2**32 - 1]) | st.integers(0, 2**32 - 1)
_U64 = st.sampled_from([0, 1, 2, GUEST_CID, 2**32, 2**64 - 1]) | st.integers(0, 2**64 - 1)
_ADDRS = st.one_of(
    st.integers(BUFS, 2 * REGION - 1).map(lambda off: GUEST_BASE + off),           # inside RAM
    st.sampled_from([GUEST_BASE + REGION - 8, GUEST_BASE + 2 * REGION - 1, GUEST_BASE + 2 * REGION,
                     GUEST_BASE - 1, 0, 2**64 - 1, 2**64 - 8, 2**63]),                  # the edges, outside
    st.integers(0, 2**64 - 1),
)
_LENGTHS = st.sampled_from([0, 1, 43, 44, 45, 100, 4096, REGION, 2**32 - 1]) | st.integers(0, 2 * REGION)

raw_desc = st.tuples(st.just("desc"), st.integers(0, 1), st.integers(0, QSIZE_MAX - 1), _ADDRS, _LENGTHS,
                     st.integers(0, 7) | _U16, st.integers(0, QSIZE_MAX + 2) | _U16)
publish = st.tuples(st.just("publish"), st.integers(0, 1), st.integers(0, QSIZE_MAX + 1) | _U16)
avail_jump = st.tuples(st.just("avail"), st.integers(0, 1), _U16)
kick = st.tuples(st.just("kick"), st.sampled_from([d.RX, d.TX, d.EVENT]))
good_rx = st.tuples(st.just("rx"), st.integers(1, 4), st.sampled_from([44, 60, 200, 4096]), st.just(d_WRITE))
bad_rx = st.tuples(st.just("rx"), st.integers(1, 4), st.sampled_from([0, 10, 43, 4096]),
                   st.sampled_from([0, d_WRITE | 1, d_WRITE | 4]))
hostile_packet = st.tuples(   # any header, any length, split anywhere
    st.just("packet"),
    st.sampled_from([GUEST_CID] * 6 + [0, 2, 3]) | _U64,                       # src_cid
    st.sampled_from([d.HOST_CID] * 6 + [GUEST_CID, 3]) | _U64,                 # dst_cid
    st.sampled_from([40000, 40001, 7000]) | st.integers(0, 2**32 - 1),         # src_port
    st.sampled_from([*HOST_PORTS, 6000, d.HOST_PORT_BASE, d.HOST_PORT_BASE + 1]) | st.integers(0, 2**32 - 1),
    st.sampled_from([1] * 6 + [0, 2]) | _U16,                                  # type
    st.integers(0, 8) | _U16,                                                  # op
    st.sampled_from([0, 1, 2, 3]) | _U32,                                      # flags
    _U32, _U32,                                                                # buf_alloc, fwd_cnt
    st.binary(max_size=64),                                                    # payload
    st.none() | _U32,                                                          # a length that lies
    st.lists(st.integers(0, 108), max_size=3),                                 # where the chain splits
)
# Packets a driver could send on a real connection (ports that match the host's listeners and the
# host's own connections), so that connections open, carry data, run out of credit and close.
plausible_packet = st.tuples(
    st.just("packet"), st.just(GUEST_CID), st.just(d.HOST_CID),
    st.sampled_from([40000, 7000, 7000, 40001]),                                 # few ports: packets meet
    st.sampled_from([HOST_PORTS[0], d.HOST_PORT_BASE, d.HOST_PORT_BASE, HOST_PORTS[1], d.HOST_PORT_BASE + 1]),
    st.just(1),
    st.sampled_from([d.OP_REQUEST, d.OP_REQUEST, d.OP_RESPONSE, d.OP_RW, d.OP_RW, d.OP_RW, d.OP_SHUTDOWN,
                     d.OP_RST, d.OP_CREDIT_UPDATE, d.OP_CREDIT_REQUEST]),
    st.sampled_from([0, d.SHUTDOWN_RCV, d.SHUTDOWN_SEND, d.SHUTDOWN_RCV | d.SHUTDOWN_SEND]),
    st.sampled_from([0, 100, 4096, d.BUF_ALLOC, 2**32 - 1]), st.sampled_from([0, 100, 65536, 2**32 - 1]),
    st.binary(max_size=64), st.none(), st.lists(st.integers(0, 108), max_size=3),
).map(lambda t: t if t[6] == d.OP_RW else (*t[:10], b"", *t[11:]))   # payload on RW only
# A packet on one of the device's open connections (its ports are looked up when it is sent).
conn_packet = st.tuples(
    st.just("conn-packet"), st.integers(0, 7),
    st.sampled_from([d.OP_RESPONSE, d.OP_RW, d.OP_RW, d.OP_RW, d.OP_RW, d.OP_SHUTDOWN, d.OP_RST,
                     d.OP_CREDIT_UPDATE, d.OP_CREDIT_REQUEST, d.OP_REQUEST]),
    st.sampled_from([0, d.SHUTDOWN_RCV, d.SHUTDOWN_SEND, d.SHUTDOWN_RCV | d.SHUTDOWN_SEND]),
    st.sampled_from([0, 100, 4096, d.BUF_ALLOC, 2**32 - 1]) | _U32, st.sampled_from([0, 100, 65536]) | _U32,
    st.binary(max_size=64) | st.sampled_from([b"g" * 4000, b"G" * (d.MAX_PACKET + 1)]),
    st.lists(st.integers(0, 108), max_size=3),
)
host_connect = st.tuples(st.just("connect"), st.sampled_from([7000, 7000, 40000]))
host_send = st.tuples(st.just("host-send"), st.integers(0, 7), st.sampled_from([1, 100, 5000, 70000]))
host_read = st.tuples(st.just("host-read"))
guest_open = st.tuples(st.just("guest-open"), st.sampled_from(HOST_PORTS), st.sampled_from([4096, d.BUF_ALLOC]))
# Mostly what a driver does, so that connections get far; one hostile step in four or so.
benign = st.one_of(plausible_packet, conn_packet, conn_packet, conn_packet, good_rx, good_rx, guest_open, host_connect,
                   host_send, host_send, host_read, kick)
hostile = st.one_of(hostile_packet, bad_rx, raw_desc, publish, avail_jump)
actions = (st.lists(benign, min_size=1, max_size=24)                            # a driver that behaves...
           | st.tuples(st.lists(benign, max_size=16), st.lists(st.one_of(benign, benign, benign, hostile),
                                                              min_size=1, max_size=12))
           .map(lambda t: t[0] + t[1]))                                          # ...until it does not


class Rig:
    def __init__(self, tmp: Path, qsize: int):
        self.guest = Guest(qsize)
        self.failures: list[KvmpodError] = []
        self.device = VsockDevice(GUEST_CID, tmp / "v.sock", on_failure=self.failures.append)
        self.device.vhost = FakeVhost(self.guest.memory, qsize)   # type: ignore[assignment]
        self.listeners = []
        for port in HOST_PORTS:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.bind(f"{tmp / 'v.sock'}_{port}")
            s.listen(64)
            s.setblocking(False)
            self.listeners.append(s)
        self.host_socks: list[socket.socket] = []
        self.guest_ports = 0

    def accept_all(self) -> None:
        for listener in self.listeners:
            while True:
                try:
                    s, _ = listener.accept()
                except BlockingIOError:
                    break
                s.setblocking(False)
                self.host_socks.append(s)

    def close(self) -> None:
        self.device.close()
        for s in [*self.listeners, *self.host_socks]:
            s.close()
        vhost = self.device.vhost
        for q in vhost.queues if vhost else ():
            q.close_fds()
        self.guest.memory.close()


def _send_packet(rig: Rig, action: tuple) -> None:
    _, src_cid, dst_cid, src_port, dst_port, ptype, op, flags, buf_alloc, fwd_cnt, payload, length, splits = action
    g = rig.guest
    data = HEADER.pack(src_cid, dst_cid, src_port, dst_port, len(payload) if length is None else length,
                       ptype, op, flags, buf_alloc, fwd_cnt) + payload
    cuts = sorted({c for c in splits if 0 < c < len(data)})[:g.qsize - 1]
    pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]
    for i, piece in enumerate(pieces):
        off = g.alloc(len(piece))
        g.write(off, piece)
        last = i == len(pieces) - 1
        g.set_desc(d.TX, i, GUEST_BASE + off, len(piece), 0 if last else 1, i + 1)
    g.publish(d.TX, 0)
    rig.device.queue_kicked(d.TX)


def _post_rx(rig: Rig, n: int, size: int, flags: int) -> None:
    g = rig.guest
    used = g.ring(d.RX)[2] + 2
    outstanding = (g.avail_idx[d.RX] - struct.unpack("<H", bytes(g.mirror[used:used + 2]))[0]) & 0xFFFF
    for _ in range(min(n, g.qsize - outstanding) if flags == d_WRITE else n):   # a good driver never overfills
        head = g.avail_idx[d.RX] % g.qsize   # the ring's slots in turn; the device takes them in order
        off = g.alloc(size)
        g.set_desc(d.RX, head, GUEST_BASE + off, size, flags & ~1, 0)
        g.publish(d.RX, head)
    rig.device.queue_kicked(d.RX)


async def _act(rig: Rig, action: tuple) -> None:
    kind = action[0]
    g = rig.guest
    if kind == "conn-packet":
        _, idx, op, flags, buf_alloc, fwd_cnt, payload, splits = action
        keys = list(rig.device.conns)
        if keys:
            host_port, guest_port = keys[idx % len(keys)]
            if rig.device.conns[host_port, guest_port].state is d.State.CONNECTING and idx % 2 == 0:
                op = d.OP_RESPONSE   # mostly accept the host's connections, so that data follows
            _send_packet(rig, ("packet", GUEST_CID, d.HOST_CID, guest_port, host_port, 1, op, flags, buf_alloc,
                               fwd_cnt, payload if op == d.OP_RW else b"", None, splits))
    elif kind == "guest-open":   # a REQUEST from a new guest port to a host program that listens
        rig.guest_ports += 1
        _send_packet(rig, ("packet", GUEST_CID, d.HOST_CID, 41000 + rig.guest_ports, action[1], 1, d.OP_REQUEST, 0,
                           action[2], 0, b"", None, []))
    elif kind == "packet":
        _send_packet(rig, action)
    elif kind == "rx":
        _post_rx(rig, *action[1:])
    elif kind == "kick":
        rig.device.queue_kicked(action[1])
    elif kind == "desc":
        _, q, i, addr, length, flags, nxt = action
        g.set_desc(q, i, addr, length, flags, nxt)
    elif kind == "publish":
        g.publish(action[1], action[2])
    elif kind == "avail":
        g.set_avail_idx(action[1], action[2])
    elif kind == "connect":
        ours, theirs = socket.socketpair()
        rig.host_socks.append(theirs)
        theirs.setblocking(False)
        rig.device.connect_guest(action[1], ours, lambda ok: None)
    elif kind == "host-send":
        rig.accept_all()
        if rig.host_socks:
            s = rig.host_socks[action[1] % len(rig.host_socks)]
            try:
                s.send(b"h" * action[2])
            except OSError:
                pass
    elif kind == "host-read":
        for s in rig.host_socks:
            try:
                while s.recv(1 << 16):
                    pass
            except OSError:
                pass
    for _ in range(2):   # let the loop run the readers and writers the action woke
        await asyncio.sleep(0)


def _check(rig: Rig) -> None:
    dev = rig.device
    for failure in rig.failures:
        assert isinstance(failure, GuestFault), f"the guest was cut off with {type(failure).__name__}: {failure}"
        assert str(failure) and "\n" not in str(failure)
    assert len(rig.failures) <= 1
    if rig.failures:
        assert dev.conns == {} and not dev._queued and not dev._spare_rx
    assert len(dev._queued) <= d.MAX_QUEUED
    assert len(dev.conns) <= d.MAX_CONNECTIONS
    assert len(dev._spare_rx) <= rig.guest.qsize
    for conn in dev.conns.values():
        assert len(conn.to_host) <= d.BUF_ALLOC


def _only_writable_changed(rig: Rig) -> None:
    """The device wrote into the rings' used parts and the guest's writable buffers, nowhere else."""
    g = rig.guest
    before, after = g.mirror, g.snapshot()
    allowed = bytearray(len(before))
    for q in (d.RX, d.TX):
        used = g.ring(q)[2]
        allowed[used:used + 4 + 8 * g.qsize] = b"\1" * (4 + 8 * g.qsize)
    for off, length in g.writable:
        allowed[off:off + length] = b"\1" * len(allowed[off:off + length])
    for block in range(0, len(before), 4096):
        if before[block:block + 4096] == after[block:block + 4096]:
            continue
        for i in range(block, block + 4096):
            if before[i] != after[i]:
                assert allowed[i], f"the device wrote guest RAM at offset 0x{i:x}, outside every writable buffer"
    g.mirror[:] = after


async def _run(tmp: Path, qsize: int, script: list[tuple]) -> None:
    rig = Rig(tmp, qsize)
    try:
        for action in script:
            with time_bound(STEP_BOUND):
                await _act(rig, action)
            _check(rig)
            _only_writable_changed(rig)
        if rig.failures:   # cut off: nothing more is done for the guest
            with time_bound(STEP_BOUND):
                await _act(rig, ("kick", d.TX))
                await _act(rig, ("kick", d.RX))
            assert rig.device.conns == {}
    finally:
        rig.close()


@fuzz(max_examples=400)
@given(qsize=st.sampled_from([1, 2, 4, 16]), script=actions)
def test_a_hostile_guest_is_cut_off_and_nothing_else(qsize, script):
    with tempfile.TemporaryDirectory(prefix="kvmpod-fuzz-vsock-") as tmp:
        asyncio.run(_run(Path(tmp), qsize, script))


# -- the virtqueue alone: any ring contents ------------------------------------------------------------

@fuzz(max_examples=300)
@given(qsize=st.sampled_from([1, 2, 4, 8, 16]), descs=st.lists(st.tuples(_ADDRS, _LENGTHS, st.integers(0, 7) | _U16,
                                                                         st.integers(0, 17) | _U16), max_size=16),
       heads=st.lists(st.integers(0, 17) | _U16, max_size=4), avail_idx=st.none() | _U16)
def test_any_ring_contents_give_chains_inside_guest_memory_or_a_guest_fault(qsize, descs, heads, avail_idx):
    g = Guest(qsize)
    vhost = FakeVhost(g.memory, qsize)
    q = vhost.queues[d.TX]
    try:
        for i, desc in enumerate(descs):
            g.set_desc(d.TX, i, *desc)
        for head in heads:
            g.publish(d.TX, head)
        if avail_idx is not None:
            g.set_avail_idx(d.TX, avail_idx)
        with time_bound(STEP_BOUND):
            for _ in range(len(heads) + 1):
                try:
                    chain = q.pop()
                except GuestFault as e:
                    assert str(e) and "\n" not in str(e)
                    break
                if chain is None:
                    break
                assert len(chain.readable) + len(chain.writable) <= qsize
                for buf in [*chain.readable, *chain.writable]:
                    assert len(buf) <= REGION   # a view of one region, never more
                assert chain.read(0, chain.readable_len) is not None
    finally:
        for queue in vhost.queues:
            queue.close_fds()
        g.memory.close()


@pytest.mark.parametrize("qsize", [1, 16])
def test_an_idle_guest_costs_nothing(tmp_path, qsize):
    """The rig itself: a guest that posts buffers and sends one good REQUEST gets its RESPONSE."""
    async def body():
        rig = Rig(tmp_path, qsize)
        try:
            _post_rx(rig, 1, 4096, d_WRITE)
            _send_packet(rig, ("packet", GUEST_CID, d.HOST_CID, 40000, HOST_PORTS[0], 1, d.OP_REQUEST, 0,
                               1 << 20, 0, b"", None, []))
            await asyncio.sleep(0)
            assert rig.failures == [] and len(rig.device.conns) == 1
            used = rig.guest.ring(d.RX)[2]
            m, o = rig.guest.ram(used + 2)
            assert m[o] == 1   # one receive buffer used: the RESPONSE
        finally:
            rig.close()
    asyncio.run(body())
