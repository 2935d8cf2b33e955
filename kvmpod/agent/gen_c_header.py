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
    lines += ["", "#endif", ""]
    return "\n".join(lines)


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
