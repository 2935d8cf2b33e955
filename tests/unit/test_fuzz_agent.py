"""Fuzzing the host's end of the agent protocol (issue 23; docs/reliability.md, "Fuzzing"): the TLV codec
(kvmpod/agent/codec.py over the tables messages.py has), the frame header (protocol.decode_header), and
whole sessions (kvmpod/agent/session.py) against a hostile fake guest on a socketpair.

The guest is untrusted, so the promises are:
* a payload or header either decodes or raises ProtocolError, never anything else; what decodes
  re-encodes to its canonical form, which decodes to the same message;
* a session fed any sequence of frames (a correct conversation, then frames dropped, duplicated,
  swapped, inserted, corrupted, cut short, oversized) ends within a bound, and every failure it
  reports is an AgentError (ProtocolError for a broken protocol) with a one-line message; its frame
  dispatcher never dies of another exception (which would leave every waiter hanging); the bytes it
  buffers stay under one maximal frame plus the stream reader's own limits;
* the unchanged conversation succeeds, with the app's output and exit status intact.

No VM is booted. tests/fuzzing.py has the knob: FUZZ_SECONDS=N makes each property run for N seconds.
"""

from __future__ import annotations

import asyncio
import socket
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvmpod.agent import protocol as p
from kvmpod.agent.codec import TLV_HEADER, FieldSpec, Message, iter_tlv
from kvmpod.agent.session import AgentSession, ProcessSpec
from kvmpod.errors import AgentError, AppStartError, ProtocolError
from tests.fuzzing import fuzz

MESSAGE_CLASSES = sorted(p.MESSAGES.values(), key=lambda cls: cls.TYPE)
ALL_TAGS = sorted({spec.tag for cls in MESSAGE_CLASSES for spec in cls.FIELDS})
_WIDTH = {"u32": 4, "i32": 4, "u64": 8}
_RANGE = {"u32": (0, 2**32 - 1), "i32": (-2**31, 2**31 - 1), "u64": (0, 2**64 - 1)}
_PACK = {"u32": "<I", "i32": "<i", "u64": "<Q"}

# ==================================================================================================
# Strategies: field values, whole messages, TLV payloads that are nearly right.


def _edge_ints(kind: str) -> st.SearchStrategy[int]:
    lo, hi = _RANGE[kind]
    return st.one_of(st.sampled_from([lo, hi, 0, 1, lo + 1, hi - 1, 2**31 - 1, 2**31] if kind != "i32"
                                     else [lo, hi, 0, 1, -1]).filter(lambda v: lo <= v <= hi),
                     st.integers(lo, hi))


def _value(spec: FieldSpec) -> st.SearchStrategy[int | bytes]:
    if spec.type == "str":
        return st.binary(max_size=24).map(lambda b: b.replace(b"\0", b"\1"))
    return _edge_ints(spec.type)


@st.composite
def messages(draw, cls: type[Message] | None = None) -> Message:
    """A valid message of `cls` (or of any tlv message)."""
    cls = cls or draw(st.sampled_from(MESSAGE_CLASSES))
    values = {}
    for spec in cls.FIELDS:
        if spec.repeated:
            values[spec.attr] = draw(st.lists(_value(spec), max_size=3))
        elif spec.required:
            values[spec.attr] = draw(_value(spec))
        else:
            values[spec.attr] = draw(st.none() | _value(spec))
    return cls(**values)


@st.composite
def hostile_payloads(draw, cls: type[Message]) -> bytes:
    """Fields of `cls` and others, of the right width or not, with NULs, twice, missing, cut short."""
    tags = [spec.tag for spec in cls.FIELDS]
    out = bytearray()
    for _ in range(draw(st.integers(0, 6))):
        tag = draw(st.sampled_from(tags) if tags and draw(st.booleans()) else
                   st.sampled_from(ALL_TAGS) | st.integers(0, 0xFFFF))
        spec = next((s for s in cls.FIELDS if s.tag == tag), None)
        if spec is not None and spec.type != "str" and draw(st.integers(0, 3)):
            value = struct.pack(_PACK[spec.type], draw(_edge_ints(spec.type)))
        else:
            value = draw(st.binary(max_size=16))
        length = len(value)
        if draw(st.integers(0, 9)) == 0:   # a length that lies
            length = draw(st.sampled_from([len(value) + 1, len(value) + 1000, 2**32 - 1, 0]))
        out += TLV_HEADER.pack(tag, length) + value
    if out and draw(st.integers(0, 4)) == 0:
        del out[draw(st.integers(0, len(out) - 1)):]
    return bytes(out)


def _decodes_or_protocol_error(cls: type[Message], payload: bytes) -> Message | None:
    try:
        msg = cls.decode(payload)
    except ProtocolError as e:
        assert str(e) and "\n" not in str(e)
        return None
    canonical = msg.encode()
    assert cls.decode(canonical) == msg
    assert cls.decode(canonical).encode() == canonical
    return msg


# ==================================================================================================
# The codec and the header.


@fuzz(max_examples=300)
@given(data=st.data())
def test_any_payload_decodes_or_is_a_protocol_error(data):
    cls = data.draw(st.sampled_from(MESSAGE_CLASSES))
    payload = data.draw(hostile_payloads(cls) | st.binary(max_size=64))
    _decodes_or_protocol_error(cls, payload)


@fuzz(max_examples=200)
@given(msg=messages())
def test_every_valid_message_survives_the_round_trip(msg):
    payload = msg.encode()
    assert type(msg).decode(payload) == msg
    fields = list(iter_tlv(payload))   # the canonical order: the toml's, repeated ones element by element
    order = [spec.tag for spec in msg.FIELDS]
    assert [tag for tag, _ in fields] == sorted((tag for tag, _ in fields), key=order.index)


@fuzz(max_examples=300)
@given(header=st.binary(min_size=p.HEADER_SIZE, max_size=p.HEADER_SIZE)
       | st.tuples(st.integers(0, 2**32 - 1) | st.sampled_from([p.MAX_PAYLOAD, p.MAX_PAYLOAD + 1]),
                   st.integers(0, 25), st.sampled_from([0, 0, 1, 0x8000]), st.sampled_from([0, 1, 2**32 - 1]))
       .map(lambda t: struct.pack("<IHHI", *t)))
def test_any_header_is_judged_before_its_payload_is_read(header):
    try:
        mtype, stream, length = p.decode_header(header)
    except ProtocolError as e:
        assert str(e) and "\n" not in str(e)
        return
    assert length <= p.MAX_PAYLOAD and isinstance(mtype, p.MessageType)
    assert struct.unpack("<IHHI", header) == (length, mtype, 0, stream)


# ==================================================================================================
# Whole sessions against a hostile guest.

SPEC = ProcessSpec(app_name="app", disk_serial="disk", argv=["/bin/app"], env=[])
SESSION_BOUND = 5          # seconds a session may take at most (it takes milliseconds)
READER_LIMIT = 1 << 16     # asyncio's default StreamReader limit
TRANSPORT_READ = 1 << 18   # the most one socket read of asyncio's selector transport appends


class TrackingReader(asyncio.StreamReader):
    """A StreamReader that remembers the most it ever buffered."""

    most = 0

    def feed_data(self, data: bytes) -> None:
        super().feed_data(data)
        self.most = max(self.most, len(self._buffer))  # type: ignore[attr-defined]


def raw_frame(mtype: int, stream: int, payload: bytes = b"", flags: int = 0, length: int | None = None) -> bytes:
    return struct.pack("<IHHI", len(payload) if length is None else length, mtype, flags, stream) + payload


def conversation(scenario: str, output: list[tuple[int, bytes]], exit_code: int, logs: int) -> list[bytes]:
    """What a well-behaved agent sends for `scenario` (the host's part: tests below)."""
    T = p.MessageType
    frames = [p.frame(p.Hello(proto_min=1, proto_max=p.VERSION, agent_version=b"fuzz", boot_ns=1)).encode()]
    frames += [p.frame(p.Log(message=b"log %d" % i)).encode() for i in range(logs)]
    if scenario == "prepare":
        return frames + [p.Frame(T.PREPARED, 0, p.Prepared().encode()).encode()]
    frames.append(p.frame(p.Started(pid=42), 1).encode())
    frames += [p.Frame(T.STDOUT if fd == 1 else T.STDERR, 1, data).encode() for fd, data in output]
    frames.append(p.frame(p.Window(bytes=0), 1).encode())
    return frames + [p.frame(p.Exit(exit_code=exit_code), 1).encode()]


_HOSTILE_TEXT = st.sampled_from([b"", b"exec", b"line\nkvmpod: error: forged", b"\x1b[2J", b"\xff\xfe", b"\t\r"])
_INSERTS = st.one_of(
    st.builds(lambda stream, stage, errno_, message: raw_frame(p.MessageType.ERROR, stream, p.Error(
        stage=stage, errno=errno_, message=message).encode()),   # the guest's own reports, with hostile text
        st.sampled_from([0, 1]), _HOSTILE_TEXT, st.none() | _edge_ints("u32"), _HOSTILE_TEXT),
    st.builds(lambda text: raw_frame(p.MessageType.LOG, 0, p.Log(message=text).encode()), _HOSTILE_TEXT),
    st.builds(raw_frame, st.integers(0, 24), st.sampled_from([0, 1, 2, 7]), st.binary(max_size=16),
              st.sampled_from([0, 0, 0, 1])),
    messages().flatmap(lambda m: st.sampled_from([0, 1, 3]).map(lambda s: raw_frame(m.TYPE, s, m.encode()))),
    st.builds(lambda n: raw_frame(p.MessageType.STDOUT, 1, b"\xAA" * n),   # a large, valid output frame
              st.sampled_from([p.DATA_CHUNK, p.MAX_PAYLOAD])),
    st.builds(lambda t, n: raw_frame(t, 1, length=n), st.sampled_from([7, 11]),   # a length never sent
              st.sampled_from([p.MAX_PAYLOAD, p.MAX_PAYLOAD + 1, 2**32 - 1])),
)


@st.composite
def mutated(draw, frames: list[bytes]) -> tuple[list[bytes], bool]:
    """`frames` after up to 3 mutations; whether any was made."""
    frames = list(frames)
    n = draw(st.integers(0, 3))
    for _ in range(n):
        kind = draw(st.sampled_from(["drop", "duplicate", "swap", "insert", "insert", "corrupt", "oversize"]))
        i = draw(st.integers(0, len(frames) - 1))
        if kind == "drop" and len(frames) > 1:
            del frames[i]
        elif kind == "duplicate":
            frames.insert(i, frames[i])
        elif kind == "swap":
            j = draw(st.integers(0, len(frames) - 1))
            frames[i], frames[j] = frames[j], frames[i]
        elif kind == "insert":
            frames.insert(i, draw(_INSERTS))
        elif kind == "corrupt":
            f = bytearray(frames[i])
            at = draw(st.integers(0, len(f) - 1))
            f[at] = draw(st.integers(0, 255))
            frames[i] = bytes(f)
        else:   # a header that claims more than the frame has
            f = bytearray(frames[i])
            f[0:4] = struct.pack("<I", draw(st.sampled_from([len(f), p.MAX_PAYLOAD + 1, 2**32 - 1])))
            frames[i] = bytes(f)
    return frames, n > 0


async def _session_run(scenario: str, stream: bytes, cuts: list[int]) -> tuple[object, list[bytes], AgentSession,
                                                                                  TrackingReader]:
    """Run the host's side of `scenario` while the fake guest sends `stream` (in pieces at `cuts`)
    and then closes its end. Returns what the host's part returned or raised."""
    loop = asyncio.get_running_loop()
    host_sock, guest = socket.socketpair()
    guest.setblocking(False)
    reader = TrackingReader(limit=READER_LIMIT, loop=loop)
    protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
    transport, _ = await loop.create_connection(lambda: protocol, sock=host_sock)
    writer = asyncio.StreamWriter(transport, protocol, reader, loop)
    session = AgentSession(reader, writer)
    stdout: list[bytes] = []

    async def guest_sends() -> None:
        try:
            start = 0
            for cut in [*sorted(c % (len(stream) + 1) for c in cuts), len(stream)]:
                if cut > start:
                    await loop.sock_sendall(guest, stream[start:cut])
                    start = cut
            guest.shutdown(socket.SHUT_WR)
        except OSError:
            pass   # the host closed first

    async def guest_drains() -> None:
        try:
            while await loop.sock_recv(guest, 1 << 16):
                pass
        except OSError:
            pass

    async def host() -> object:
        await session.handshake()
        if scenario == "prepare":
            await session.prepare_snapshot(["disk"])
            return "prepared"
        proc = await session.start(SPEC, stdout.append, stdout.append)
        return await proc.wait()

    tasks = [loop.create_task(guest_sends()), loop.create_task(guest_drains())]
    try:
        result: object = await asyncio.wait_for(host(), SESSION_BOUND)
    except asyncio.TimeoutError:
        dispatcher = session._reader_task
        died = dispatcher.exception() if dispatcher and dispatcher.done() and not dispatcher.cancelled() else None
        raise AssertionError(f"the session hung (its dispatcher died of {died!r})") from died
    except Exception as e:
        result = e
    # the dispatcher ends only by turning what stopped it into the session's failure
    dispatcher = session._reader_task
    if dispatcher is not None and dispatcher.done() and not dispatcher.cancelled():
        assert dispatcher.exception() is None, f"the frame dispatcher died of {dispatcher.exception()!r}"
    await session.close()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    guest.close()
    return result, stdout, session, reader


def run_session(scenario: str, stream: bytes, cuts: list[int] = ()):
    return asyncio.run(_session_run(scenario, stream, list(cuts)))


_OUTPUT = st.lists(st.tuples(st.sampled_from([1, 2]), st.binary(min_size=1, max_size=32)), max_size=4)


@fuzz(max_examples=600)
@given(scenario=st.sampled_from(["start", "prepare"]), output=_OUTPUT, exit_code=_edge_ints("i32"),
       logs=st.integers(0, 2), data=st.data(), cuts=st.lists(st.integers(0, 2**16), max_size=4))
def test_a_hostile_guest_ends_the_session_with_a_clear_error(scenario, output, exit_code, logs, data, cuts):
    frames, changed = data.draw(mutated(conversation(scenario, output, exit_code, logs)))
    result, stdout, session, reader = run_session(scenario, b"".join(frames), cuts)
    if isinstance(result, BaseException):
        assert isinstance(result, AgentError), f"{type(result).__name__} escaped: {result!r}"
        message = str(result)
        assert message and "\n" not in message, repr(message)
        assert changed, f"the unchanged conversation failed: {message}"
        if session.hello.done() and not isinstance(result, AppStartError):
            # after the handshake (which raises its own), a failure is the session's, told to every waiter
            assert session.failed.done() and isinstance(session.failed.result(), AgentError)
    elif not changed and scenario == "start":
        assert result.code == exit_code and result.signal is None
        assert stdout == [data for _, data in output]
    elif not changed:
        assert result == "prepared"
    # one frame at most in the buffer, plus what the reader reads ahead before pausing the socket
    assert reader.most <= p.HEADER_SIZE + p.MAX_PAYLOAD + 2 * READER_LIMIT + TRANSPORT_READ


# -- what the fuzzing found (each was a hang: the dispatcher died of a non-AgentError) ----------------

@pytest.mark.parametrize("errno_", [2**31, 2**32 - 1])
def test_an_error_frame_with_an_errno_no_c_int_holds_is_a_start_error(errno_):
    """ERROR(STAGE, ERRNO, empty MESSAGE) made the host describe the errno with os.strerror, which raises
    OverflowError past a C int: the dispatcher died and `start` waited for ever."""
    stream = b"".join(conversation("start", [], 0, 0)[:1]) + p.frame(
        p.Error(stage=b"exec", errno=errno_, message=b""), 1).encode()
    result, _, _, _ = run_session("start", stream)
    assert isinstance(result, AppStartError) and str(result) == f"exec failed: errno {errno_}"


def test_a_session_whose_guest_says_nothing_ends_when_the_channel_closes():
    result, _, session, _ = run_session("start", b"")
    assert isinstance(result, AgentError) and str(result) == "agent channel closed"



@pytest.mark.parametrize("stream", [0, 1])
def test_the_guest_text_in_an_error_cannot_forge_a_line_or_drive_the_terminal(stream):
    """STAGE and MESSAGE of an ERROR went into kvmpod's error as the guest sent them: a newline there
    forged a second `kvmpod: error:` line, an escape sequence reached the terminal."""
    stream_bytes = conversation("start", [], 0, 0)[0] + p.frame(
        p.Error(stage=b"exec\x1b[2J", message=b"no\nkvmpod: error: forged"), stream).encode()
    result, _, _, _ = run_session("start", stream_bytes)
    assert isinstance(result, AgentError)
    assert "\n" not in str(result) and "\x1b" not in str(result)
    assert "no\\x0akvmpod: error: forged" in str(result)
