"""Guest memory and split virtqueues, as a vhost-user device backend sees them (docs/vsock.md).

Guest RAM is the memfd QEMU shares (memory-backend-memfd,share=on), mapped here region by region.
Everything the guest writes into a ring — indexes, descriptor addresses, lengths, chain links — is
checked before use: an address outside guest RAM, an index past the ring, a chain that loops or a
flag the device never negotiated raises GuestFault, which cuts the guest off. Nothing here raises
IndexError or struct.error on guest input.
"""

from __future__ import annotations

import mmap
import os
import struct
import threading
from dataclasses import dataclass, field

from kvmpod.errors import GuestFault, VMError

VRING_DESC_F_NEXT = 1
VRING_DESC_F_WRITE = 2
VRING_DESC_F_INDIRECT = 4
VRING_AVAIL_F_NO_INTERRUPT = 1
MAX_QUEUE_SIZE = 32768

_DESC = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")   # only for ring fields nobody writes while the device reads them (see _index)
_USED_ELEM = struct.Struct("<II")
_EVENTFD_ONE = (1).to_bytes(8, "little")
# Taking a lock is a locked instruction on x86: the one full barrier Python has (below, in notify).
_FENCE = threading.Lock()


def _index(ring: memoryview, offset: int) -> memoryview:
    """A ring's 16-bit index (or flags) field as a one-item view: reading and writing it is one 16-bit load
    or store. struct packs and unpacks byte by byte, so the guest, reading concurrently, saw the used index
    torn when its low byte wrapped (0x01FF -> 0x0100 -> 0x0200): it then took the next, unwritten slot of
    the used ring for an entry, said "id 0 is not a head!" and stopped the queue for good (the rare CI hang
    of docs/reliability.md). Native byte order: kvmpod runs on little-endian hosts, as virtio's rings are."""
    return ring[offset:offset + 2].cast("H")


@dataclass
class Region:
    guest_addr: int
    size: int
    user_addr: int          # the front-end's (QEMU's) virtual address of the region
    map: mmap.mmap
    view: memoryview


class GuestMemory:
    """The guest's RAM regions, mapped shared. Addresses are guest-physical unless named user_*."""

    def __init__(self) -> None:
        self.regions: list[Region] = []

    def add(self, fd: int, guest_addr: int, size: int, user_addr: int, mmap_offset: int) -> None:
        """Map one region of the front-end's memory table. Consumes `fd`."""
        try:
            if size <= 0 or guest_addr < 0 or guest_addr + size > 1 << 64 or mmap_offset % mmap.PAGESIZE:
                raise VMError(f"vhost-user: bad memory region (guest 0x{guest_addr:x}, size {size}, "
                              f"offset 0x{mmap_offset:x})")
            try:
                mapped = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=mmap_offset)
            except (OSError, ValueError, OverflowError) as e:
                raise VMError(f"vhost-user: cannot map guest memory region at 0x{guest_addr:x}: {e}") from e
        finally:
            os.close(fd)
        self.regions.append(Region(guest_addr, size, user_addr, mapped, memoryview(mapped)))

    def close(self) -> None:
        for region in self.regions:
            region.view.release()
            try:
                region.map.close()
            except BufferError:  # a view is still exported somewhere: the GC unmaps it later
                pass
        self.regions = []

    def view(self, addr: int, length: int) -> memoryview:
        """`length` bytes of guest memory at guest-physical `addr`, within one region, or GuestFault."""
        for region in self.regions:
            start = addr - region.guest_addr
            if 0 <= start and start + length <= region.size:
                return region.view[start:start + length]
        raise GuestFault(f"guest buffer 0x{addr:x}+{length} lies outside guest memory")

    def user_to_guest(self, user_addr: int, length: int, what: str) -> int:
        """Translate a front-end virtual address (vring addresses) to guest-physical."""
        for region in self.regions:
            start = user_addr - region.user_addr
            if 0 <= start and start + length <= region.size:
                return region.guest_addr + start
        raise VMError(f"vhost-user: {what} at 0x{user_addr:x} is outside the memory table")


@dataclass
class Chain:
    """One descriptor chain taken from the available ring: device-readable then device-writable buffers."""
    head: int
    readable: list[memoryview] = field(default_factory=list)
    writable: list[memoryview] = field(default_factory=list)

    @property
    def readable_len(self) -> int:
        return sum(len(b) for b in self.readable)

    @property
    def writable_len(self) -> int:
        return sum(len(b) for b in self.writable)

    def read(self, offset: int, length: int) -> bytes | memoryview:
        """`length` readable bytes from `offset` (a view when they lie in one buffer). The caller checks
        the bounds against readable_len first."""
        for buf in self.readable:
            if offset < len(buf):
                if offset + length <= len(buf):
                    return buf[offset:offset + length]
                break
            offset -= len(buf)
        out = bytearray()
        for buf in self.readable:
            if offset >= len(buf):
                offset -= len(buf)
                continue
            take = buf[offset:offset + length - len(out)]
            out += take
            offset = 0
            if len(out) == length:
                break
        return bytes(out)

    def write(self, data: bytes | memoryview, offset: int = 0) -> None:
        """Scatter `data` over the writable buffers from byte `offset` (the caller sized it to fit)."""
        view = memoryview(data)
        for buf in self.writable:
            if offset >= len(buf):
                offset -= len(buf)
                continue
            n = min(len(buf) - offset, len(view))
            buf[offset:offset + n] = view[:n]
            view = view[n:]
            offset = 0
            if not view:
                return


class VirtQueue:
    """A split virtqueue (virtio 1.x, section 2.7) driven from the device side."""

    def __init__(self, index: int):
        self.index = index
        self.size = 0
        self.desc_user = self.avail_user = self.used_user = 0
        self.last_avail = 0        # next available-ring slot to take
        self.used_idx = 0          # next used-ring slot to fill
        self.kick_fd: int | None = None
        self.call_fd: int | None = None
        self.enabled = True        # SET_VRING_ENABLE; started once it has a kick fd and addresses
        self.resync = False        # SET_VRING_BASE came: map() takes used_idx from the guest's used ring
        self._desc: memoryview | None = None
        self._avail: memoryview | None = None
        self._used: memoryview | None = None
        self._avail_flags: memoryview | None = None   # _index() views of the three fields both sides
        self._avail_idx: memoryview | None = None     # touch while the ring runs
        self._used_idx: memoryview | None = None
        self._memory: GuestMemory | None = None

    @property
    def ready(self) -> bool:
        return self._desc is not None and self.kick_fd is not None and self.enabled

    def set_size(self, size: int) -> None:
        if not 0 < size <= MAX_QUEUE_SIZE or size & (size - 1):
            raise VMError(f"vhost-user: queue {self.index} size {size} is not a power of two up to {MAX_QUEUE_SIZE}")
        self.size = size

    def map(self, memory: GuestMemory) -> None:
        """Resolve the ring addresses against the memory table (at SET_VRING_ADDR and after SET_MEM_TABLE)."""
        if not self.size or not self.desc_user:
            return
        n = self.size
        self._memory = memory
        self._desc = memory.view(memory.user_to_guest(self.desc_user, 16 * n, "descriptor table"), 16 * n)
        self._avail = memory.view(memory.user_to_guest(self.avail_user, 4 + 2 * n, "available ring"), 4 + 2 * n)
        self._used = memory.view(memory.user_to_guest(self.used_user, 4 + 8 * n, "used ring"), 4 + 8 * n)
        self._avail_flags, self._avail_idx = _index(self._avail, 0), _index(self._avail, 2)
        self._used_idx = _index(self._used, 2)
        if self.resync:
            # A ring (re)starts where the guest's used ring says the device left off, not where the
            # front end's base says: chains taken and never used (receive buffers the device held, or
            # any lost to a bug) are offered again. A device that skipped them would fill the next
            # used slot past one it never wrote, and Linux reads that stale slot as "id 0 is not a
            # head" and stops the queue for good. The device uses chains in the order it took them.
            self.resync = False
            self.used_idx = self._used_idx[0]
            self.last_avail = self.used_idx

    def unmap(self) -> None:
        self._desc = self._avail = self._used = self._memory = None
        self._avail_flags = self._avail_idx = self._used_idx = None

    def close_fds(self) -> None:
        for fd in (self.kick_fd, self.call_fd):
            if fd is not None:
                os.close(fd)
        self.kick_fd = self.call_fd = None

    def _pending(self) -> int:
        assert self._avail_idx is not None
        avail_idx = self._avail_idx[0]
        pending = (avail_idx - self.last_avail) & 0xFFFF
        if pending > self.size:
            raise GuestFault(f"vsock queue {self.index}: available index ran {pending} entries ahead "
                             f"of a {self.size}-entry ring")
        return pending

    def has_available(self) -> bool:
        return self.ready and self._pending() > 0

    def pop(self) -> Chain | None:
        """The next available descriptor chain, checked, or None when the guest has posted nothing."""
        if not self.ready or not self._pending():
            return None
        assert self._avail is not None and self._desc is not None and self._memory is not None
        head = _U16.unpack_from(self._avail, 4 + 2 * (self.last_avail % self.size))[0]
        if head >= self.size:
            raise GuestFault(f"vsock queue {self.index}: descriptor index {head} is past the {self.size}-entry ring")
        chain = Chain(head)
        index, seen = head, 0
        while True:
            seen += 1
            if seen > self.size:
                raise GuestFault(f"vsock queue {self.index}: descriptor chain from {head} loops")
            addr, length, flags, nxt = _DESC.unpack_from(self._desc, 16 * index)
            if flags & VRING_DESC_F_INDIRECT:
                raise GuestFault(f"vsock queue {self.index}: indirect descriptor {index} (not negotiated)")
            buf = self._memory.view(addr, length)
            if flags & VRING_DESC_F_WRITE:
                chain.writable.append(buf)
            elif chain.writable:
                raise GuestFault(f"vsock queue {self.index}: device-readable descriptor {index} after a writable one")
            else:
                chain.readable.append(buf)
            if not flags & VRING_DESC_F_NEXT:
                break
            if nxt >= self.size:
                raise GuestFault(f"vsock queue {self.index}: descriptor {index} links to {nxt}, past the ring")
            index = nxt
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        return chain

    def unpop(self, count: int) -> None:
        """Give back the last `count` chains taken, unused: the next pops return them again."""
        self.last_avail = (self.last_avail - count) & 0xFFFF

    def push(self, chain: Chain, written: int) -> None:
        """Return a chain to the guest with `written` bytes written into it."""
        assert self._used is not None and self._used_idx is not None
        _USED_ELEM.pack_into(self._used, 4 + 8 * (self.used_idx % self.size), chain.head, written)
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        self._used_idx[0] = self.used_idx  # one store, after the element's: x86 keeps stores in order

    def notify(self) -> None:
        """Interrupt the guest (the call eventfd) unless it asked not to be."""
        if self.call_fd is None or self._avail_flags is None:
            return
        # x86 may let the load of the guest's flags pass the store of the used index. A guest that
        # re-enables interrupts (a store, a full barrier, a load of the used index) could then see
        # neither the new index nor an interrupt, and wait forever: the device's half of that pairing
        # is a full barrier here, as vhost's vhost_notify() has its smp_mb().
        with _FENCE:
            pass
        if self._avail_flags[0] & VRING_AVAIL_F_NO_INTERRUPT:
            return
        try:
            os.write(self.call_fd, _EVENTFD_ONE)
        except BlockingIOError:
            pass  # the counter is saturated: the guest will be interrupted anyway
