"""The TLV codec of the agent protocol's messages, driven by the tables kvmpod/agent/messages.py has.

messages.py (generated from protocol.toml by gen_protocol.py) declares one dataclass per tlv message,
each with a FIELDS table: the field's attribute, tag, type, and whether it is repeated or required.
Message.encode() and Message.decode() here read that table, as the agent's generic C decoder
(guest-agent/src/tlv.c) reads its own generated one, so both ends follow one definition:

* encode writes the fields in FIELDS order (the toml's), a repeated one element by element, a single
  one only when it is set (not None). It raises ValueError/TypeError for a value the type cannot hold
  (the host built it: a bug, not a guest's fault).
* decode accepts the fields in any order. A tag the message does not list is skipped unread (a newer
  peer may add optional fields); a listed one must have its type's width (str: no NUL byte), a single
  one may appear once, a required one must appear. Anything else raises ProtocolError: the guest is
  untrusted, so no IndexError or struct.error ever escapes.

Re-encoding a decoded message therefore gives the canonical form of the payload: its listed fields in
the toml's order, without the skipped ones (tests/golden/frames.json pins that, byte for byte).
"""

from __future__ import annotations

import enum
import functools
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Iterator

from kvmpod.errors import ProtocolError

if TYPE_CHECKING:
    from typing import Self

TLV_HEADER = struct.Struct("<HI")
TLV_HEADER_SIZE = TLV_HEADER.size
_FIXED = {"u32": struct.Struct("<I"), "i32": struct.Struct("<i"), "u64": struct.Struct("<Q")}
_RANGE = {"u32": (0, 2**32 - 1), "i32": (-2**31, 2**31 - 1), "u64": (0, 2**64 - 1)}


@dataclass(frozen=True, slots=True)
class FieldSpec:
    """One field of a message, as protocol.toml's [[message]] fields list it."""

    attr: str        # the dataclass attribute: the field's name in lower case
    name: str        # the field's name in protocol.toml (APP_NAME)
    tag: int
    type: str        # "u32" | "i32" | "u64" | "str" (bytes without NUL)
    repeated: bool = False
    required: bool = False


def iter_tlv(payload: bytes) -> Iterator[tuple[int, bytes]]:
    """The (tag, value) pairs of a TLV payload, in order, whatever the tags; ProtocolError if truncated."""
    pos, end = 0, len(payload)
    while pos < end:
        if end - pos < TLV_HEADER_SIZE:
            raise ProtocolError("truncated field header")
        tag, length = TLV_HEADER.unpack_from(payload, pos)
        pos += TLV_HEADER_SIZE
        if length > end - pos:
            raise ProtocolError(f"field {tag} claims {length} bytes, only {end - pos} remain")
        yield tag, payload[pos:pos + length]
        pos += length


def encode_value(spec: FieldSpec, value: object) -> bytes:
    """One field (header and value) of `spec`'s type."""
    if spec.type == "str":
        if not isinstance(value, bytes):
            raise TypeError(f"{spec.name} is a str field: bytes expected, not {type(value).__name__}")
        if b"\0" in value:
            raise ValueError(f"{spec.name} value contains a NUL byte")
        raw = value
    else:
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{spec.name} is a {spec.type} field: int expected, not {type(value).__name__}")
        lo, hi = _RANGE[spec.type]
        if not lo <= value <= hi:
            raise ValueError(f"{spec.name} value {value} does not fit a {spec.type}")
        raw = _FIXED[spec.type].pack(value)
    return TLV_HEADER.pack(spec.tag, len(raw)) + raw


def encoded_size(spec: FieldSpec, value: object) -> int:
    """How many payload bytes encode_value(spec, value) takes."""
    size = len(value) if isinstance(value, bytes) else _FIXED[spec.type].size
    return TLV_HEADER_SIZE + size


def _decode_value(name: str, spec: FieldSpec, raw: bytes) -> int | bytes:
    if spec.type == "str":
        if b"\0" in raw:
            raise ProtocolError(f"{name}: {spec.name} contains a NUL byte")
        return raw
    fixed = _FIXED[spec.type]
    if len(raw) != fixed.size:
        raise ProtocolError(f"{name}: {spec.name} has {len(raw)} bytes, expected {fixed.size}")
    value: int = fixed.unpack(raw)[0]
    return value


@functools.cache
def _by_tag(fields: tuple[FieldSpec, ...]) -> dict[int, FieldSpec]:
    return {spec.tag: spec for spec in fields}


class Message:
    """Base of the generated message dataclasses: encode/decode from the class's FIELDS table."""

    __slots__ = ()
    TYPE: ClassVar[enum.IntEnum]             # the MessageType member
    FIELDS: ClassVar[tuple[FieldSpec, ...]]  # in encoding order

    if TYPE_CHECKING:
        def __init__(self, **values: Any) -> None: ...

    def encode(self) -> bytes:
        """The payload: the fields in FIELDS order. A missing required field is a ValueError."""
        out = bytearray()
        for spec in self.FIELDS:
            value = getattr(self, spec.attr)
            if spec.repeated:
                if not isinstance(value, list):
                    raise TypeError(f"{self.TYPE.name}: {spec.name} is repeated: a list expected")
                for item in value:
                    out += encode_value(spec, item)
            elif value is not None:
                out += encode_value(spec, value)
            elif spec.required:
                raise ValueError(f"{self.TYPE.name} lacks {spec.name}")
        return bytes(out)

    @classmethod
    def decode(cls, payload: bytes) -> Self:
        """The message a payload carries; ProtocolError if it breaks the message's definition."""
        name = cls.TYPE.name
        by_tag = _by_tag(cls.FIELDS)
        values: dict[str, Any] = {spec.attr: [] for spec in cls.FIELDS if spec.repeated}
        for tag, raw in iter_tlv(payload):
            spec = by_tag.get(tag)
            if spec is None:
                continue  # not one of this message's fields: skipped
            value = _decode_value(name, spec, raw)
            if spec.repeated:
                values[spec.attr].append(value)
            elif spec.attr in values:
                raise ProtocolError(f"{name} carries {spec.name} twice")
            else:
                values[spec.attr] = value
        for spec in cls.FIELDS:
            if spec.required and spec.attr not in values:
                raise ProtocolError(f"{name} lacks {spec.name}")
        return cls(**values)

    def split(self, limit: int) -> list[Self]:
        """This message as several whose payloads each take at most `limit` bytes: the elements of its
        repeated fields in order, as many per message as fit, every single field in each. For messages
        whose repeated fields append across frames (METADATA's document pieces)."""
        singles = [spec for spec in self.FIELDS if not spec.repeated]
        base = sum(encoded_size(spec, getattr(self, spec.attr)) for spec in singles
                   if getattr(self, spec.attr) is not None)
        parts: list[Self] = []
        lists: dict[str, list[Any]] = {}
        size = base

        def flush() -> None:
            parts.append(type(self)(**{spec.attr: getattr(self, spec.attr) for spec in singles},
                                    **{spec.attr: lists.get(spec.attr, []) for spec in self.FIELDS
                                       if spec.repeated}))

        for spec in self.FIELDS:
            if not spec.repeated:
                continue
            for item in getattr(self, spec.attr):
                item_size = encoded_size(spec, item)
                if lists and size + item_size > limit:
                    flush()
                    lists, size = {}, base
                lists.setdefault(spec.attr, []).append(item)
                size += item_size
        if lists or not parts:
            flush()
        return parts
