"""Reading the guest's serial console log to explain why a guest died."""

from __future__ import annotations

import re
from pathlib import Path

from kvmpod.errors import printable

AGENT_PREFIX = "kvmpod-agent:"
_PANIC = re.compile(r"Kernel panic - not syncing: (.*)")
_KMSG_PREFIX = re.compile(r"^\[\s*\d+\.\d+\]\s*")


def tail(path: Path, max_bytes: int = 1 << 16) -> list[str]:
    try:
        with path.open("rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - max_bytes))
            data = f.read()
    except OSError:
        return []
    # the guest wrote it: control characters are escaped, so that no line of it drives the terminal
    return [printable(_KMSG_PREFIX.sub("", line).strip()) for line in data.decode("utf-8", "replace").splitlines()]


def explain(path: Path) -> str | None:
    """The most telling line of the console log, rephrased: an agent error or a kernel panic."""
    lines = tail(path)
    for line in reversed(lines):
        if AGENT_PREFIX in line:
            return "guest agent: " + line.split(AGENT_PREFIX, 1)[1].strip().removeprefix("error:").strip()
    for line in reversed(lines):
        if m := _PANIC.search(line):
            reason = m.group(1).strip()
            if "Attempted to kill init" in reason:
                return f"the guest agent (PID 1) crashed: kernel panic: {reason}"
            return f"the guest kernel panicked: {reason}"
    return None
