"""The agent protocol: its definition and what is generated from it, the message codec against the
golden frames, and the host session against a fake guest speaking raw frames."""

from __future__ import annotations

import asyncio
import json
import re
import struct
from pathlib import Path
from typing import Any

import pytest

from kvmpod.agent import gen_protocol as gen
from kvmpod.agent import protocol as p
from kvmpod.agent.session import AgentSession, ProcessSpec
from kvmpod.errors import EXIT_NOT_FOUND, AgentError, AppStartError, ProtocolError

T, F = p.MessageType, p.Field
REPO = Path(__file__).resolve().parents[2]
DEFINITION = gen.load()
GOLDEN = gen.load_golden()


# -- the definition and the generated files -------------------------------------------------

def test_definition_is_consistent():
    assert len({m.value for m in T}) == len(T)
    assert len({f.value for f in F}) == len(F)
    assert p.DATA_CHUNK <= p.MAX_PAYLOAD and p.STDIN_WINDOW <= p.MAX_PAYLOAD
    for spec in p.MESSAGE_SPECS.values():
        assert spec.sender in ("host", "guest") and spec.payload in ("tlv", "raw", "empty")
    assert set(p.MESSAGES) == {mtype for mtype, spec in p.MESSAGE_SPECS.items() if spec.payload == "tlv"}


@pytest.mark.parametrize("path", gen.CHECKED_IN, ids=lambda path: path.name)
def test_the_checked_in_generated_files_are_up_to_date(path):
    """The CI check: protocol.toml and what is generated from it and checked in agree."""
    assert path.read_text() == gen.render(path, DEFINITION), \
        f"{path.relative_to(REPO)} is stale: run `make generate` (kvmpod/agent/gen_protocol.py)"


def test_the_generator_writes_only_what_changed(tmp_path):
    target = tmp_path / "messages.py"
    assert gen.main(["gen", str(target)]) == 0 and target.read_text() == gen.render_python(DEFINITION)
    mtime = target.stat().st_mtime_ns
    assert gen.main(["gen", str(target)]) == 0 and target.stat().st_mtime_ns == mtime
    assert gen.main(["gen", str(tmp_path / "nothing.txt")]) == 1


@pytest.mark.parametrize("change, problem", [
    (lambda d: d["message"][0]["fields"].append({"name": "NO_SUCH_FIELD"}), "unknown key or field"),
    (lambda d: d["message"][0]["fields"].append({"name": "PROTO_MIN"}), "listed twice"),
    (lambda d: d["message"][0]["fields"].append({"name": "PID", "repeated": True, "required": True}),
     "required is for single fields"),
    (lambda d: d["message"][0]["fields"].append({"name": "PID", "optional": True}), "unknown key"),
    (lambda d: d["message"][4].update(fields=[]), "a tlv message lists its fields, no other does"),
    (lambda d: d["message"][1].pop("fields"), "a tlv message lists its fields"),
    (lambda d: d["field"].append(dict(d["field"][0], name="OTHER")), "is taken"),
    (lambda d: d["field"][0].update(type="u16"), "unknown type"),
])
def test_the_generator_refuses_a_broken_definition(change, problem):
    import tomllib
    definition = tomllib.loads(gen.TOML.read_text())
    change(definition)
    with pytest.raises(gen.DefinitionError, match=problem):
        gen.check(definition)


def test_c_header_names_every_constant_message_and_field():
    text = gen.render_c_header(DEFINITION)
    for m in T:
        assert f"#define KP_MSG_{m.name} {m.value} " in text
    for f in F:
        assert f"#define KP_F_{f.name} {f.value} " in text
    assert f"#define KP_METADATA_DOC_MAX {p.METADATA_DOC_MAX}u" in text
    assert f"#define KP_VSOCK_PORT {p.VSOCK_PORT}u" in text


def test_c_structs_and_tables_follow_the_toml():
    header, tables = gen.render_c_messages_h(DEFINITION), gen.render_c_messages_c(DEFINITION)
    for cls in p.MESSAGES.values():
        name = cls.TYPE.name.lower()
        assert f"struct kp_{name} {{" in header and f"const struct kp_msg_desc kp_{name}_desc = {{" in tables
        table = re.search(rf"static const struct kp_field_desc {cls.TYPE.name}_FIELDS\[\] = {{(.*?)\n}};", tables, re.S)
        names = re.findall(r'\.name = "(\w+)"', table.group(1)) if table else []
        assert names == [spec.name for spec in cls.FIELDS]  # the same fields, in the same order
    assert "uint32_t errno_;" in header  # ERRNO: errno is a macro in C


def test_the_doc_lists_every_message_and_field():
    doc = (REPO / "docs" / "agent-protocol.md").read_text()
    section = doc[doc.index(gen.DOC_BEGIN):doc.index(gen.DOC_END)]
    for cls in p.MESSAGES.values():
        row = next(line for line in section.splitlines() if line.startswith(f"| {cls.TYPE.value} | {cls.TYPE.name} |"))
        assert all(f"`{spec.name}" in row for spec in cls.FIELDS)
    for f in F:
        assert f"| {f.value} | `{f.name}` |" in section


def test_the_agent_uses_the_generated_constants():
    """No hand copy of a shared constant in the agent (METADATA_DOC_MAX was one)."""
    agent = REPO / "guest-agent"
    paths = [*agent.glob("src/*.[ch]"), *agent.glob("tests/*.c"), *agent.glob("tools/*.c"),
             *(REPO / "kvmpod" / "relay").glob("*.c")]
    sources = {path: path.read_text() for path in paths}
    for key in gen.constants(DEFINITION):
        for path, text in sources.items():  # e.g. "#define METADATA_DOC_MAX 4194304"
            assert not re.search(rf"#define \w*{key.upper()}\s+\d", text), f"{path.name} copies {key}"


# -- the codec ------------------------------------------------------------------------------

def test_a_message_round_trips_with_its_order_and_repeats():
    start = p.Start(app_name=b"web", disk_serial=b"img0", arg=[b"/bin/sh", b"-c", b""], supp_gid=[7, 0],
                    start_flags=0, oom_score_adj=-1000)
    assert p.Start.decode(start.encode()) == start
    tags = [tag for tag, _ in p.iter_tlv(start.encode())]
    assert tags == [F.APP_NAME, F.DISK_SERIAL, F.ARG, F.ARG, F.ARG, F.SUPP_GID, F.SUPP_GID, F.START_FLAGS,
                    F.OOM_SCORE_ADJ]
    thaw = p.Thaw(hostname=b"h", entropy=[0, 2**64 - 1], realtime_ns=2**63)
    assert p.Thaw.decode(thaw.encode()) == thaw


@pytest.mark.parametrize("message, problem", [
    (p.Log(message=b"a\0b"), "contains a NUL byte"),
    (p.Started(pid=-1), "does not fit a u32"),
    (p.Started(pid=2**32), "does not fit a u32"),
    (p.Exit(exit_code=2**31), "does not fit a i32"),
    (p.Thaw(hostname=b"h", realtime_ns=2**64), "does not fit a u64"),
    (p.Start(app_name=b"a", disk_serial=None), "START lacks DISK_SERIAL"),  # type: ignore[arg-type]
])
def test_a_value_its_field_cannot_carry_is_refused_when_encoding(message, problem):
    with pytest.raises(ValueError, match=problem):
        message.encode()


@pytest.mark.parametrize("message", [
    p.Log(message="text"),  # type: ignore[arg-type]  # str fields are bytes
    p.Started(pid="1"),  # type: ignore[arg-type]
    p.Started(pid=True),
    p.Prepare(disk_serial=(b"a",)),  # type: ignore[arg-type]  # repeated fields are lists
])
def test_a_value_of_the_wrong_type_is_refused_when_encoding(message):
    with pytest.raises(TypeError):
        message.encode()


def test_split_spreads_repeated_fields_over_messages_that_fit():
    pieces = [bytes([i]) * 100_000 for i in range(1, 6)]
    whole = p.Metadata(app_name=b"web", image_manifest=pieces[:3], app_annotations=pieces[3:])
    parts = whole.split(p.MAX_PAYLOAD)
    assert [len(part.image_manifest) + len(part.app_annotations) for part in parts] == [2, 2, 1]
    assert all(part.app_name == b"web" and len(part.encode()) <= p.MAX_PAYLOAD for part in parts)
    assert [piece for part in parts for piece in part.image_manifest + part.app_annotations] == pieces
    assert p.Metadata(pod_annotations=[b""]).split(10) == [p.Metadata(pod_annotations=[b""])]


def test_a_frame_carries_a_message():
    frame = p.frame(p.Signal(signo=15), 3)
    assert frame == p.Frame(T.SIGNAL, 3, struct.pack("<HII", F.SIGNO, 4, 15))
    assert frame.encode()[:12] == struct.pack("<IHHI", 10, T.SIGNAL, 0, 3)


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


# -- the golden frames (tests/golden/frames.json; the agent's side: guest-agent/tests/test_golden.c) --

def _message(g: dict[str, Any]) -> p.Message:
    """The golden frame's message, built from the JSON's field values."""
    cls = p.MESSAGES[T[g["message"]]]
    values: dict[str, Any] = {}
    for spec in cls.FIELDS:
        if spec.name in g["fields"]:
            value = g["fields"][spec.name]
            convert = (lambda v: v.encode()) if spec.type == "str" else (lambda v: v)
            values[spec.attr] = [convert(v) for v in value] if spec.repeated else convert(value)
    assert set(g["fields"]) <= {spec.name for spec in cls.FIELDS}, f"{g['name']}: a field {g['message']} lacks"
    return cls(**values)


def test_the_golden_frames_cover_every_tlv_message():
    covered = {g["message"] for g in GOLDEN if "error" not in g}
    assert covered == {mtype.name for mtype in p.MESSAGES}
    assert any("encoded" in g and g["message"] == "SIGNAL" for g in GOLDEN)  # a frame with unknown tags
    assert len({g["name"] for g in GOLDEN}) == len(GOLDEN)


@pytest.mark.parametrize("g", [g for g in GOLDEN if "error" not in g], ids=lambda g: g["name"])
def test_a_golden_frame_decodes_and_encodes_byte_for_byte(g):
    frame = gen.golden_bytes(g["frame"])
    mtype, stream, length = p.decode_header(frame[:p.HEADER_SIZE])
    assert (mtype.name, stream, length) == (g["message"], g["stream"], len(frame) - p.HEADER_SIZE)
    message = _message(g)
    assert p.MESSAGES[mtype].decode(frame[p.HEADER_SIZE:]) == message
    encoded = gen.golden_bytes(g.get("encoded", g["frame"]))
    assert p.frame(message, stream).encode() == encoded
    assert p.MESSAGES[mtype].decode(encoded[p.HEADER_SIZE:]) == message


@pytest.mark.parametrize("g", [g for g in GOLDEN if "error" in g], ids=lambda g: g["name"])
def test_a_bad_golden_frame_is_a_protocol_error(g):
    frame = gen.golden_bytes(g["frame"])
    mtype, _, _ = p.decode_header(frame[:p.HEADER_SIZE])
    with pytest.raises(ProtocolError, match=re.escape(g["error"])):
        p.MESSAGES[mtype].decode(frame[p.HEADER_SIZE:])


def test_the_agents_golden_test_passes(agent_c_tests):
    """The agent decodes and encodes the same golden frames (guest-agent/tests/test_golden.c)."""
    assert re.search(rf"golden: {len(GOLDEN)} frames, \d+ checks, 0 failed", agent_c_tests.stdout), \
        agent_c_tests.stdout[-2000:] + agent_c_tests.stderr[-2000:]


def test_the_golden_file_is_what_its_comment_says():
    doc = json.loads(gen.GOLDEN.read_text())
    assert "frames" in doc and any("golden" in line.lower() for line in doc["comment"])


# -- the session against a scripted fake guest ----------------------------------------------

class FakeGuest:
    """The guest end of a socketpair: reads host frames, writes whatever the test says."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer

    async def recv(self) -> tuple[p.MessageType, int, Any]:
        """(type, stream, the decoded message, or the raw payload of a raw/empty message)."""
        mtype, stream, length = p.decode_header(await self.reader.readexactly(p.HEADER_SIZE))
        payload = await self.reader.readexactly(length) if length else b""
        return mtype, stream, p.MESSAGES[mtype].decode(payload) if mtype in p.MESSAGES else payload

    def send(self, frame: p.Frame | bytes) -> None:
        self.writer.write(frame.encode() if isinstance(frame, p.Frame) else frame)

    async def hello(self) -> None:
        self.send(p.frame(p.Hello(proto_min=1, proto_max=1, agent_version=b"fake", boot_ns=123)))
        mtype, _, ack = await self.recv()
        assert mtype is T.HELLO_ACK and ack.proto_version == 1


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
    mtype, stream, _ = await guest.recv()
    assert mtype is T.START
    guest.send(p.frame(p.Started(pid=42), stream))
    return host, guest, await start


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 10))


def test_full_process_life_cycle():
    async def scenario():
        host, guest = await _pair()
        await asyncio.gather(host.handshake(), guest.hello())
        out, err = bytearray(), bytearray()
        start = asyncio.ensure_future(host.start(SPEC, out.extend, err.extend))
        mtype, stream, msg = await guest.recv()
        assert mtype is T.START and msg.arg == [b"/bin/sh", b"-c", b"true"]
        assert msg.start_flags == 0 and msg.workdir == b"/" and msg.app_name == b"app"
        guest.send(p.frame(p.Started(pid=42), stream))
        proc = await start
        assert proc.pid == 42
        guest.send(p.Frame(T.STDOUT, stream, b"hello\n"))
        guest.send(p.Frame(T.STDERR, stream, b"oops\n"))
        guest.send(p.frame(p.Exit(exit_code=7), stream))
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
        guest.send(p.frame(p.Window(bytes=p.STDIN_WINDOW), stream))
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
        guest.send(p.frame(p.Error(stage=b"exec", errno=2, message=b"exec /bin/nope: No such file or directory"),
                           stream))
        with pytest.raises(AppStartError, match="/bin/nope") as info:
            await start
        assert info.value.exit_code == EXIT_NOT_FOUND
        await host.close()
    run(scenario())


@pytest.mark.parametrize("evil, problem", [
    (struct.pack("<IHHI", 10**6, T.STDOUT, 0, 1), "exceeds"),
    (p.Frame(T.STDOUT, 9, b"x").encode(), "never started"),
    (p.Frame(T.SHUTDOWN, 0).encode(), "host-to-guest"),
    (p.frame(p.Exit(), 1).encode(), "exactly one"),
    (p.frame(p.Exit(exit_code=0, term_signal=9), 1).encode(), "exactly one"),
    (p.frame(p.Window(bytes=5), 1).encode(), "never sent"),
    (p.Frame(T.WINDOW, 1).encode(), "WINDOW lacks BYTES"),
    (p.Frame(T.STARTED, 1, p.Started(pid=1).encode() * 2).encode(), "STARTED carries PID twice"),
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
        guest.send(p.frame(p.Hello(proto_min=7, proto_max=9)))
        with pytest.raises(AgentError, match="protocol 7..9"):
            await host.handshake()
        await host.close()
    run(scenario())
