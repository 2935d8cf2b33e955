"""The agent protocol codec and the host session, against a fake guest speaking raw frames."""

from __future__ import annotations

import asyncio
import struct

import pytest

from kvmpod.agent import protocol as p
from kvmpod.agent.session import AgentSession, ProcessSpec
from kvmpod.errors import EXIT_NOT_FOUND, AgentError, AppStartError, ProtocolError

T, F = p.MessageType, p.Field


def test_definition_is_consistent():
    assert len({m.value for m in T}) == len(T)
    assert len({f.value for f in F}) == len(F)
    assert p.DATA_CHUNK <= p.MAX_PAYLOAD and p.STDIN_WINDOW <= p.MAX_PAYLOAD
    for spec in p.MESSAGE_SPECS.values():
        assert spec["from"] in ("host", "guest") and spec["payload"] in ("tlv", "raw", "empty")


def test_fields_round_trip_keeps_order_and_repeats():
    payload = p.encode_fields([(F.ARG, "/bin/sh"), (F.ARG, b"-c"), (F.SUPP_GID, 7), (F.EXIT_CODE, -1),
                               (F.BOOT_NS, 2**40)])
    f = p.Fields.decode(payload)
    assert f.all(F.ARG) == [b"/bin/sh", b"-c"]
    assert f.get(F.SUPP_GID) == 7 and f.get(F.EXIT_CODE) == -1 and f.get(F.BOOT_NS) == 2**40


def test_unknown_field_tags_are_skipped():
    payload = struct.pack("<HI", 999, 3) + b"abc" + p.encode_fields([(F.PID, 5)])
    assert p.Fields.decode(payload).get(F.PID) == 5


@pytest.mark.parametrize("payload, problem", [
    (b"\x0c\x00", "truncated field header"),
    (struct.pack("<HI", F.ARG, 100) + b"x", "claims 100 bytes"),
    (struct.pack("<HI", F.PID, 2) + b"xx", "expected 4"),
])
def test_malformed_fields_raise_protocol_error(payload, problem):
    with pytest.raises(ProtocolError, match=problem):
        p.Fields.decode(payload)


@pytest.mark.parametrize("header, problem", [
    (struct.pack("<IHHI", p.MAX_PAYLOAD + 1, T.STDOUT, 0, 1), "exceeds"),
    (struct.pack("<IHHI", 0, 200, 0, 1), "unknown message type 200"),
    (struct.pack("<IHHI", 0, T.STDOUT, 1, 1), "reserved flags"),
    (struct.pack("<IHHI", 0, T.STDOUT, 0, 0), "stream 0"),
    (struct.pack("<IHHI", 0, T.HELLO, 0, 3), "stream 3"),
    (struct.pack("<IHHI", 4, T.SHUTDOWN, 0, 0), "carries a payload"),
])
def test_bad_headers_are_rejected(header, problem):
    with pytest.raises(ProtocolError, match=problem):
        p.decode_header(header)


def test_nul_in_string_field_is_refused_when_encoding():
    with pytest.raises(ValueError):
        p.encode_fields([(F.ARG, "a\0b")])


# -- the session against a scripted fake guest ----------------------------------------------

class FakeGuest:
    """The guest end of a socketpair: reads host frames, writes whatever the test says."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer

    async def recv(self) -> tuple[p.MessageType, int, p.Fields | bytes]:
        mtype, stream, length = p.decode_header(await self.reader.readexactly(p.HEADER_SIZE))
        payload = await self.reader.readexactly(length) if length else b""
        return mtype, stream, p.Fields.decode(payload) if p.MESSAGE_SPECS[mtype]["payload"] == "tlv" else payload

    def send(self, frame: p.Frame | bytes) -> None:
        self.writer.write(frame.encode() if isinstance(frame, p.Frame) else frame)

    async def hello(self) -> None:
        self.send(p.message(T.HELLO, 0, (F.PROTO_MIN, 1), (F.PROTO_MAX, 1), (F.AGENT_VERSION, "fake"),
                            (F.BOOT_NS, 123)))
        mtype, _, fields = await self.recv()
        assert mtype is T.HELLO_ACK and fields.get(F.PROTO_VERSION) == 1


async def _pair() -> tuple[AgentSession, FakeGuest]:
    import socket
    a, b = socket.socketpair()
    host = AgentSession(*await asyncio.open_connection(sock=a))
    guest = FakeGuest(*await asyncio.open_connection(sock=b))
    return host, guest


SPEC = ProcessSpec("app", "img0", ["/bin/sh", "-c", "true"], ["PATH=/bin"])


async def _running_process(on_stdout=lambda b: None, on_stderr=lambda b: None):
    """A session past the handshake with one started process: (host, guest, process)."""
    host, guest = await _pair()
    await asyncio.gather(host.handshake(), guest.hello())
    start = asyncio.ensure_future(host.start(SPEC, on_stdout, on_stderr))
    mtype, stream, fields = await guest.recv()
    assert mtype is T.START
    guest.send(p.message(T.STARTED, stream, (F.PID, 42)))
    return host, guest, await start


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 10))


def test_full_process_life_cycle():
    async def scenario():
        host, guest = await _pair()
        await asyncio.gather(host.handshake(), guest.hello())
        out, err = bytearray(), bytearray()
        start = asyncio.ensure_future(host.start(SPEC, out.extend, err.extend))
        mtype, stream, fields = await guest.recv()
        assert mtype is T.START and fields.all(F.ARG) == [b"/bin/sh", b"-c", b"true"]
        assert fields.get(F.START_FLAGS) == 0
        guest.send(p.message(T.STARTED, stream, (F.PID, 42)))
        proc = await start
        assert proc.pid == 42
        guest.send(p.Frame(T.STDOUT, stream, b"hello\n"))
        guest.send(p.Frame(T.STDERR, stream, b"oops\n"))
        guest.send(p.message(T.EXIT, stream, (F.EXIT_CODE, 7)))
        status = await proc.wait()
        assert (bytes(out), bytes(err), status.shell_code) == (b"hello\n", b"oops\n", 7)
        await host.close()
    run(scenario())


def test_stdin_respects_the_window():
    async def scenario():
        host, guest, proc = await _running_process()
        stream = proc.stream
        data = bytes(range(256)) * 2048  # 512 KiB: twice the window
        writer = asyncio.ensure_future(proc.write_stdin(data))
        received = bytearray()
        while len(received) < p.STDIN_WINDOW:
            mtype, _, payload = await guest.recv()
            assert mtype is T.STDIN
            received += payload
        await asyncio.sleep(0.05)
        assert not writer.done() and len(received) == p.STDIN_WINDOW  # blocked on the window
        guest.send(p.message(T.WINDOW, stream, (F.BYTES, p.STDIN_WINDOW)))
        while len(received) < len(data):
            received += (await guest.recv())[2]
        await writer
        assert bytes(received) == data
        await host.close()
    run(scenario())


def test_start_error_maps_to_exit_code():
    async def scenario():
        host, guest = await _pair()
        await asyncio.gather(host.handshake(), guest.hello())
        start = asyncio.ensure_future(host.start(SPEC, lambda b: None, lambda b: None))
        _, stream, _ = await guest.recv()
        guest.send(p.message(T.ERROR, stream, (F.STAGE, "exec"), (F.ERRNO, 2),
                             (F.MESSAGE, "exec /bin/nope: No such file or directory")))
        with pytest.raises(AppStartError, match="/bin/nope") as info:
            await start
        assert info.value.exit_code == EXIT_NOT_FOUND
        await host.close()
    run(scenario())


@pytest.mark.parametrize("evil, problem", [
    (struct.pack("<IHHI", 10**6, T.STDOUT, 0, 1), "exceeds"),
    (p.Frame(T.STDOUT, 9, b"x").encode(), "never started"),
    (p.Frame(T.SHUTDOWN, 0).encode(), "host-to-guest"),
    (p.message(T.EXIT, 1).encode(), "exactly one"),
    (p.message(T.WINDOW, 1, (F.BYTES, 5)).encode(), "never sent"),
    (b"\x01\x02\x03", "closed in the middle of a frame"),
])
def test_hostile_guest_fails_the_session_cleanly(evil, problem):
    async def scenario():
        host, guest, proc = await _running_process()
        guest.send(evil)
        guest.writer.close()
        error = await host.failed
        assert isinstance(error, AgentError) and problem in str(error)
        with pytest.raises(AgentError):
            await proc.wait()
        await host.close()
    run(scenario())


def test_incompatible_agent_version_is_a_clear_error():
    async def scenario():
        host, guest = await _pair()
        guest.send(p.message(T.HELLO, 0, (F.PROTO_MIN, 7), (F.PROTO_MAX, 9)))
        with pytest.raises(AgentError, match="protocol 7..9"):
            await host.handshake()
        await host.close()
    run(scenario())


def test_c_header_names_every_message_and_field():
    from kvmpod.agent.gen_c_header import render
    text = render(p.DEFINITION)
    for m in T:
        assert f"#define KP_MSG_{m.name} {m.value} " in text
    for f in F:
        assert f"#define KP_F_{f.name} {f.value} " in text
