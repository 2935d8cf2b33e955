"""QMP negotiation with an event before the answer to `qmp_capabilities` (kvmpod/vm/qemu.py negotiate_qmp).

QEMU 7.2 switches a monitor to command mode inside `qmp_capabilities` and yields before it answers; a boot
snapshot's restore finishing meanwhile emits RESUME, so the event can come first. qemu.qmp's own
negotiation reads the next message as the answer and fails ("Negotiation failed:"): one pod of 32 started
at once did, in `make bench`. A fake QEMU here answers that way.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket

import pytest
from qemu.qmp import QMPClient
from qemu.qmp.protocol import ConnectError

from kvmpod.vm.qemu import negotiate_qmp

GREETING = {"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""}, "capabilities": []}}
RESUME = {"event": "RESUME", "data": {}, "timestamp": {"seconds": 1, "microseconds": 2}}


async def fake_qemu(sock: socket.socket) -> list[dict]:
    """Greet, and answer each command (QMP is a JSON stream, not lines) with RESUME first when it is
    qmp_capabilities; returns the commands it got."""
    reader, writer = await asyncio.open_connection(sock=sock)
    decoder, buffer, got = json.JSONDecoder(), "", []
    writer.write(json.dumps(GREETING).encode() + b"\r\n")
    with contextlib.suppress(ConnectionError):
        while chunk := await reader.read(4096):
            buffer += chunk.decode()
            while buffer.strip():
                try:
                    command, end = decoder.raw_decode(buffer.lstrip())
                except json.JSONDecodeError:
                    break   # the rest of it has not come yet
                buffer = buffer.lstrip()[end:]
                got.append(command)
                if command["execute"] == "qmp_capabilities":
                    writer.write(json.dumps(RESUME).encode() + b"\r\n")
                writer.write(json.dumps({"return": {}, "id": command.get("id")}).encode() + b"\r\n")
                await writer.drain()
    writer.close()
    return got


def test_an_event_before_the_capabilities_answer_is_taken_for_an_event():
    async def body():
        ours, qemus = socket.socketpair()
        server = asyncio.ensure_future(fake_qemu(qemus))
        client = QMPClient("test")
        await asyncio.wait_for(negotiate_qmp(client, ours), 10)
        await asyncio.wait_for(client.execute("query-status"), 10)
        event = await asyncio.wait_for(client.events.get(), 10)
        assert event["event"] == "RESUME"
        await client.disconnect()
        got = await asyncio.wait_for(server, 10)
        assert [c["execute"] for c in got] == ["qmp_capabilities", "query-status"]
    asyncio.run(body())


def test_the_fake_reproduces_what_qemu_qmps_own_negotiation_fails_on():
    """The race itself: qemu.qmp's default connect takes RESUME for the answer."""
    async def body():
        ours, qemus = socket.socketpair()
        server = asyncio.ensure_future(fake_qemu(qemus))
        client = QMPClient("test")
        with pytest.raises(ConnectError, match="Negotiation failed"):
            await asyncio.wait_for(client.connect(ours), 10)
        ours.close()
        await asyncio.wait_for(server, 10)
    asyncio.run(body())
