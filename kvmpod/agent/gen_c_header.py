"""Write protocol.toml as a C header for the guest agent (run by guest-agent/Makefile)."""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path


def render(definition: dict) -> str:
    lines = [
        "/* Generated from kvmpod/agent/protocol.toml by kvmpod/agent/gen_c_header.py. Do not edit. */",
        "#ifndef KVMPOD_PROTOCOL_H",
        "#define KVMPOD_PROTOCOL_H",
        "",
    ]
    for key in ("version", "min_version", "header_size", "max_payload", "data_chunk", "stdin_window", "max_streams"):
        lines.append(f"#define KP_{key.upper()} {definition[key]}u")
    lines.append("")
    for msg in definition["message"]:
        lines.append(f"#define KP_MSG_{msg['name']} {msg['id']}  /* {msg['from']} -> */")
    lines.append("")
    for field in definition["field"]:
        lines.append(f"#define KP_F_{field['name']} {field['tag']}  /* {field['type']}: {field['doc']} */")
    lines.append("")
    for name, value in definition["flags"].items():
        lines.append(f"#define KP_{name} {value}u")
    lines += ["", *_rule_tables(definition), "", "#endif", ""]
    return "\n".join(lines)


_FROM = {"host": "KP_FROM_HOST", "guest": "KP_FROM_GUEST"}
_STREAM = {"zero": "KP_STREAM_ZERO", "process": "KP_STREAM_PROCESS", "any": "KP_STREAM_ANY"}
_PAYLOAD = {"tlv": "KP_PAYLOAD_TLV", "raw": "KP_PAYLOAD_RAW", "empty": "KP_PAYLOAD_EMPTY"}
_FIELD_TYPE = {"u32": "KP_T_U32", "i32": "KP_T_I32", "u64": "KP_T_U64", "str": "KP_T_STR"}


def _rule_tables(definition: dict) -> list[str]:
    """The per-message and per-field rules as X-macros, so the agent checks frames from data, not copies."""
    lines = [
        "enum kp_from { KP_FROM_HOST, KP_FROM_GUEST };",
        "enum kp_stream_kind { KP_STREAM_ZERO, KP_STREAM_PROCESS, KP_STREAM_ANY };",
        "enum kp_payload_kind { KP_PAYLOAD_TLV, KP_PAYLOAD_RAW, KP_PAYLOAD_EMPTY };",
        "enum kp_field_type { KP_T_U32, KP_T_I32, KP_T_U64, KP_T_STR };",
        "",
        "/* X(NAME, from, stream kind, payload kind); the id is KP_MSG_##NAME. */",
        "#define KP_MESSAGES(X) \\",
    ]
    for m in definition["message"]:
        lines.append(f"    X({m['name']}, {_FROM[m['from']]}, {_STREAM[m['stream']]}, {_PAYLOAD[m['payload']]}) \\")
    lines += ["", "/* X(NAME, type); the tag is KP_F_##NAME. */", "#define KP_FIELDS(X) \\"]
    for f in definition["field"]:
        lines.append(f"    X({f['name']}, {_FIELD_TYPE[f['type']]}) \\")
    lines.append("")
    return lines


def main(argv: list[str]) -> int:
    source, target = Path(argv[1]), Path(argv[2])
    with source.open("rb") as f:
        text = render(tomllib.load(f))
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists() or target.read_text() != text:
        target.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
