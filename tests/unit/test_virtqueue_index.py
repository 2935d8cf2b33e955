"""The ring indexes the device writes are single stores (kvmpod/vsock/virtqueue.py `_index`).

The guest reads the used ring's index while the device writes it. Written byte by byte (struct does),
a guest could read it half written whenever its low byte wrapped, take the next, unwritten used slot
for an entry and stop the queue for good ("tx:id 0 is not a head!", the rare CI hang of
docs/reliability.md). Here a child process pushes chains so that the index flips between 0x00FF and
0x0100 — the two values whose bytes all differ — and this process, as the guest, reads it with single
16-bit loads: every value it sees must be one of the two."""

from __future__ import annotations

import mmap
import multiprocessing
import os
import time

from kvmpod.vsock.virtqueue import Chain, GuestMemory, VirtQueue

SIZE = 256
DESC, AVAIL, USED = 0x0, 0x1000, 0x2000   # guest-physical addresses in RAM, one page each
RAM = 0x3000
USER_BASE = 0x7F0000000000                  # the front end's address of RAM (ring addresses are in it)


def _pusher(fd: int, seconds: float) -> None:
    memory = GuestMemory()
    memory.add(os.dup(fd), 0, RAM, USER_BASE, 0)
    queue = VirtQueue(1)
    queue.set_size(SIZE)
    queue.desc_user, queue.avail_user, queue.used_user = (USER_BASE + a for a in (DESC, AVAIL, USED))
    queue.map(memory)
    chain = Chain(head=3)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for _ in range(1000):
            queue.used_idx = 0x00FE
            queue.push(chain, 0)   # 0x0100 -> 0x00FF
            queue.push(chain, 0)   # 0x00FF -> 0x0100


def test_the_used_index_is_never_seen_half_written():
    fd = os.memfd_create("guest-ram")
    os.ftruncate(fd, RAM)
    ram = mmap.mmap(fd, RAM, mmap.MAP_SHARED)
    index = memoryview(ram)[USED + 2:USED + 4].cast("H")   # the guest's view: one 16-bit load a read
    index[0] = 0x0100
    child = multiprocessing.get_context("fork").Process(target=_pusher, args=(fd, 1.5))
    child.start()
    try:
        seen: dict[int, int] = {}
        while child.is_alive():
            for _ in range(20000):
                value = index[0]
                seen[value] = seen.get(value, 0) + 1
    finally:
        child.join(30)
    assert child.exitcode == 0
    torn = {f"0x{value:04x}": count for value, count in seen.items() if value not in (0x00FF, 0x0100)}
    assert not torn, f"the guest read a half-written used index: {torn} (of {sum(seen.values())} reads)"
    assert seen.get(0x00FF) and seen.get(0x0100), seen   # both values were written and seen
    index.release()
    ram.close()
    os.close(fd)
