"""Where app output goes on the host: kvmpod's own fds (FdSink), a detached pod's log files (LogSink), and
the one writer thread (OutputPump) that keeps a stalled reader from stalling the pod's event loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
import threading
from collections import deque
from typing import Callable

log = logging.getLogger(__name__)

OUTPUT_HIGH = 4 << 20   # bytes of app output waiting for a slow reader before the guest is held…
OUTPUT_LOW = 1 << 20    # …and this few before it is let go (OutputPump)


class FdSink:
    """Writes app output to one of kvmpod's own fds, byte-exact; a closed reader silences it. Given a pump,
    the output of a pipe or terminal goes through it (its reader may stall); a file's is written at once."""

    def __init__(self, fd: int, pump: "OutputPump | None" = None):
        self.fd = fd
        self.broken = False
        self.pump = pump if pump is not None and not _regular_file(fd) else None

    def __call__(self, data: bytes) -> None:
        if self.pump is not None:
            self.pump.put(self, data)
        else:
            self.write_now(data)

    def write_now(self, data: bytes) -> None:
        view = memoryview(data)
        while view and not self.broken:
            try:
                view = view[os.write(self.fd, view):]
            except BrokenPipeError:
                self.broken = True


def _regular_file(fd: int) -> bool:
    try:
        return stat.S_ISREG(os.fstat(fd).st_mode)
    except OSError:
        return False


class OutputPump:
    """App output to kvmpod's own pipes and terminals, written by one thread in arrival order: a reader that
    stalls (a pipe nobody drains, a terminal on hold) blocks that thread, never the event loop, so signals,
    `kvmpod stop` and --timeout still end the pod. With more than OUTPUT_HIGH bytes waiting, hold(True)
    stops reading the agent channel (the guest then waits on its port), and at OUTPUT_LOW hold(False) reads
    on: kvmpod's memory stays bounded (tests/e2e/test_faults.py, a flood to a stalled and a slow reader)."""

    def __init__(self, hold: Callable[[bool], None]):
        self._hold = hold
        self._cond = threading.Condition()
        self._queue: deque[tuple[FdSink, bytes]] = deque()
        self._waiting = 0    # bytes queued or being written
        self._held = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drained: list[asyncio.Future[None]] = []

    @property
    def idle(self) -> bool:
        return self._waiting == 0

    def put(self, sink: FdSink, data: bytes) -> None:
        """From the event loop: queue `data` for `sink`."""
        if sink.broken or not data:
            return
        if self._thread is None:
            self._loop = asyncio.get_running_loop()
            self._thread = threading.Thread(target=self._write_forever, name="kvmpod-output", daemon=True)
            self._thread.start()
        with self._cond:
            self._queue.append((sink, data))
            self._waiting += len(data)
            self._cond.notify()
        if self._waiting > OUTPUT_HIGH:   # again each time: the stream reader may have resumed reading itself
            self._held = True
            self._hold(True)

    async def drain(self) -> None:
        """Until everything queued is written (the pod's end: no output is lost)."""
        with self._cond:   # (under the lock: the writer tells the loop only if someone waits)
            if not self._waiting:
                return
            assert self._loop is not None
            future = self._loop.create_future()
            self._drained.append(future)
        await future

    def _write_forever(self) -> None:
        while True:
            with self._cond:
                while not self._queue:
                    self._cond.wait()
                sink, data = self._queue.popleft()
                while self._queue and self._queue[0][0] is sink and len(data) < (1 << 20):   # one write for a run
                    data += self._queue.popleft()[1]
            try:
                sink.write_now(data)
            except OSError as e:   # EIO of a terminal that went away, say: silenced like a closed pipe
                log.debug("app output to fd %d: %s", sink.fd, e)
                sink.broken = True
            with self._cond:
                self._waiting -= len(data)
                tell = (self._waiting == 0 and bool(self._drained)) or (self._held and self._waiting <= OUTPUT_LOW)
            if tell and self._loop is not None:
                with contextlib.suppress(RuntimeError):   # the loop is closed: nobody waits any more
                    self._loop.call_soon_threadsafe(self._progress)

    def _progress(self) -> None:
        if self._held and self._waiting <= OUTPUT_LOW:
            self._held = False
            self._hold(False)
        with self._cond:
            if self._waiting:
                return
            drained, self._drained = self._drained, []
        for future in drained:
            if not future.done():
                future.set_result(None)


class LogSink(FdSink):
    """Appends app output to its log file (--detach); a full disk silences it instead of ending the pod."""

    def __call__(self, data: bytes) -> None:
        try:
            super().__call__(data)
        except OSError as e:
            log.debug("app log: %s", e)
            self.broken = True
