"""OutputPump (kvmpod/pod/output.py): app output to a pipe whose reader stalls never blocks the event loop,
holds the guest past OUTPUT_HIGH bytes and lets it go at OUTPUT_LOW, keeps the order of stdout and stderr,
and loses nothing at the end. A file is written at once."""

from __future__ import annotations

import asyncio
import os
import threading

from kvmpod.pod.output import OUTPUT_HIGH, OUTPUT_LOW, FdSink, OutputPump


def test_a_stalled_reader_holds_the_guest_and_nothing_is_lost_or_reordered():
    read_end, write_end = os.pipe()
    holds: list[bool] = []
    got = bytearray()

    async def main() -> None:
        pump = OutputPump(holds.append)
        out, err = FdSink(write_end, pump), FdSink(write_end, pump)
        chunk = 65536
        sent = bytearray()
        for i in range((OUTPUT_HIGH // chunk) + 8):   # nobody reads yet: the pipe fills, then the queue
            data = bytes([i % 251]) * chunk
            (out if i % 2 else err)(data)
            sent += data
            await asyncio.sleep(0)   # the loop keeps turning: nothing blocked it
        assert holds == [True] * holds.count(True) and holds, "the guest is held past OUTPUT_HIGH"
        assert not pump.idle
        reader = threading.Thread(target=lambda: _read_all(read_end, got, len(sent)))
        reader.start()
        await asyncio.wait_for(pump.drain(), 30)
        reader.join(30)
        assert pump.idle and holds[-1] is False   # let go once at most OUTPUT_LOW waited
        assert bytes(got) == bytes(sent)          # every byte, in the order given

    try:
        asyncio.run(main())
    finally:
        os.close(read_end)
        os.close(write_end)
    assert OUTPUT_LOW < OUTPUT_HIGH


def _read_all(fd: int, into: bytearray, size: int) -> None:
    while len(into) < size:
        into += os.read(fd, 1 << 16)


def test_a_file_is_written_at_once_and_a_closed_pipe_silences_the_sink(tmp_path):
    async def main() -> None:
        pump = OutputPump(lambda hold: None)
        with open(tmp_path / "log", "wb") as f:
            sink = FdSink(f.fileno(), pump)
            assert sink.pump is None
            sink(b"now")
            assert (tmp_path / "log").read_bytes() == b"now"
        read_end, write_end = os.pipe()
        os.close(read_end)
        sink = FdSink(write_end, pump)
        sink(b"into nothing")
        await asyncio.wait_for(pump.drain(), 10)
        assert sink.broken
        sink(b"more")   # silenced: not even queued
        assert pump.idle
        os.close(write_end)

    asyncio.run(main())
