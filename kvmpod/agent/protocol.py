"""Frame and field codec for the agent protocol, generated from protocol.toml at import.

The guest is untrusted: every decoder here checks bounds and raises ProtocolError,
never IndexError/struct.error, so a malformed frame ends the pod with a clear message.
"""

from __future__ import annotations

import enum
import struct
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from kvmpod.errors import ProtocolError


def _load_definition() -> dict:
    with open(Path(__file__).with_name("protocol.toml"), "rb") as f:  # a plain file: importlib.resources costs 4 ms
        return tomllib.load(f)


DEFINITION = _load_definition()
VERSION: int = DEFINITION["version"]
MIN_VERSION: int = DEFINITION["min_version"]
HEADER_SIZE: int = DEFINITION["header_size"]
MAX_PAYLOAD: int = DEFINITION["max_payload"]
DATA_CHUNK: int = DEFINITION["data_chunk"]
STDIN_WINDOW: int = DEFINITION["stdin_window"]
MAX_STREAMS: int = DEFINITION["max_streams"]
VSOCK_PORT: int = DEFINITION["vsock_port"]

MessageType = enum.IntEnum("MessageType", {m["name"]: m["id"] for m in DEFINITION["message"]})
Field = enum.IntEnum("Field", {f["name"]: f["tag"] for f in DEFINITION["field"]})
StartFlag = enum.IntFlag(
    "StartFlag", {k.removeprefix("START_FLAG_"): v for k, v in DEFINITION["flags"].items()}
)

FIELD_TYPES: dict[Field, str] = {Field[f["name"]]: f["type"] for f in DEFINITION["field"]}
MESSAGE_SPECS: dict[MessageType, dict] = {MessageType[m["name"]]: m for m in DEFINITION["message"]}

_HEADER = struct.Struct("<IHHI")
_TLV_HEADER = struct.Struct("<HI")
_FIXED = {"u32": struct.Struct("<I"), "i32": struct.Struct("<i"), "u64": struct.Struct("<Q")}
assert _HEADER.size == HEADER_SIZE


@dataclass(frozen=True, slots=True)
class Frame:
    type: MessageType
    stream: int
    payload: bytes = b""

    def encode(self) -> bytes:
        if len(self.payload) > MAX_PAYLOAD:
            raise ValueError(f"{self.type.name} payload of {len(self.payload)} bytes exceeds {MAX_PAYLOAD}")
        return _HEADER.pack(len(self.payload), self.type, 0, self.stream) + self.payload


def decode_header(header: bytes) -> tuple[MessageType, int, int]:
    """Return (type, stream, payload_length) of a 12-byte header, checked against the definition."""
    length, type_id, flags, stream = _HEADER.unpack(header)
    if length > MAX_PAYLOAD:
        raise ProtocolError(f"frame payload of {length} bytes exceeds the {MAX_PAYLOAD}-byte limit")
    try:
        mtype = MessageType(type_id)
    except ValueError:
        raise ProtocolError(f"unknown message type {type_id}") from None
    if flags:
        raise ProtocolError(f"{mtype.name} frame has reserved flags 0x{flags:x} set")
    kind = MESSAGE_SPECS[mtype]["stream"]
    if (kind == "zero" and stream != 0) or (kind == "process" and stream == 0):
        raise ProtocolError(f"{mtype.name} frame on stream {stream}, which it may not use")
    if MESSAGE_SPECS[mtype]["payload"] == "empty" and length:
        raise ProtocolError(f"{mtype.name} frame carries a payload")
    return mtype, stream, length


FieldValue = int | bytes


def encode_fields(fields: Iterable[tuple[Field, FieldValue | str]]) -> bytes:
    out = bytearray()
    for tag, value in fields:
        kind = FIELD_TYPES[tag]
        if kind == "str":
            raw = value.encode() if isinstance(value, str) else bytes(value)
            if b"\0" in raw:
                raise ValueError(f"{tag.name} value contains a NUL byte")
        else:
            raw = _FIXED[kind].pack(value)
        out += _TLV_HEADER.pack(tag, len(raw)) + raw
    return bytes(out)


def iter_fields(payload: bytes) -> Iterator[tuple[Field, FieldValue]]:
    """Decode a TLV payload; unknown tags are skipped, malformed ones raise ProtocolError."""
    pos, end = 0, len(payload)
    while pos < end:
        if end - pos < _TLV_HEADER.size:
            raise ProtocolError("truncated field header")
        tag_id, length = _TLV_HEADER.unpack_from(payload, pos)
        pos += _TLV_HEADER.size
        if length > end - pos:
            raise ProtocolError(f"field {tag_id} claims {length} bytes, only {end - pos} remain")
        raw = payload[pos:pos + length]
        pos += length
        try:
            tag = Field(tag_id)
        except ValueError:
            continue
        kind = FIELD_TYPES[tag]
        if kind == "str":
            yield tag, raw
        else:
            if length != _FIXED[kind].size:
                raise ProtocolError(f"field {tag.name} has {length} bytes, expected {_FIXED[kind].size}")
            yield tag, _FIXED[kind].unpack(raw)[0]


@dataclass(slots=True)
class Fields:
    """Decoded TLV payload: scalar access for single fields, lists for repeated ones."""

    items: list[tuple[Field, FieldValue]]

    @classmethod
    def decode(cls, payload: bytes) -> "Fields":
        return cls(list(iter_fields(payload)))

    def get(self, tag: Field, default: FieldValue | None = None) -> FieldValue | None:
        for t, v in self.items:
            if t == tag:
                return v
        return default

    def text(self, tag: Field, default: str = "") -> str:
        value = self.get(tag)
        return value.decode("utf-8", "replace") if isinstance(value, bytes) else default

    def all(self, tag: Field) -> list[FieldValue]:
        return [v for t, v in self.items if t == tag]


def message(mtype: MessageType, stream: int = 0, *fields: tuple[Field, FieldValue | str]) -> Frame:
    return Frame(mtype, stream, encode_fields(fields))
