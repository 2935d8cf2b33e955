"""Fuzzing what kvmpod reads from the guest's serial console (kvmpod/vm/console.py; issue 23,
docs/reliability.md "Fuzzing"): the guest writes it, and a line of it becomes part of kvmpod's error
when the guest dies (`the VM ended before the app finished: guest agent: ...`, or the kernel's panic
reason) and of --debug's log. Whatever the bytes, explain() gives None or one line without control
characters, and tail() only such lines."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from kvmpod.vm.console import AGENT_PREFIX, explain, tail
from tests.fuzzing import fuzz

_PIECES = st.sampled_from([AGENT_PREFIX.encode(), b" error: ", b"Kernel panic - not syncing: ", b"Attempted to kill init",
                           b"[    1.234567] ", b"\n", b"\r", b"\r\n", b"\x1b[2J", b"\x1b]0;title\x07", b"\x00", b"\t",
                           b"\xff\xfe", "\u2028".encode(), b"\x85", "caf\u00e9".encode(), b"x" * 100])
consoles = st.lists(_PIECES | st.binary(max_size=20), max_size=30).map(b"".join)


def _clean(line: str) -> bool:
    return line.isprintable()


@fuzz(max_examples=300)
@given(console=consoles, max_bytes=st.sampled_from([1 << 16, 64, 7]))
def test_whatever_the_guest_wrote_the_explanation_is_one_clean_line(tmp_path_factory, console, max_bytes):
    log = tmp_path_factory.getbasetemp() / "console.log"
    log.write_bytes(console)
    assert all(_clean(line) for line in tail(log, max_bytes))
    why = explain(log)
    assert why is None or (why and _clean(why)), repr(why)


def test_an_escape_sequence_in_the_console_stays_out_of_the_error(tmp_path):
    """The agent's error line and the panic reason went into kvmpod's error as the guest wrote them."""
    log = tmp_path / "console.log"
    log.write_bytes(b"[    0.5] kvmpod-agent: error: \x1b[2Jgone\x07\n")
    assert explain(log) == "guest agent: \\x1b[2Jgone\\x07"
    log.write_bytes(b"Kernel panic - not syncing: \x1b]0;owned\x07\n")
    assert explain(log) == "the guest kernel panicked: \\x1b]0;owned\\x07"
