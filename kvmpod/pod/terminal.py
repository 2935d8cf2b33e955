"""The local terminal of `kvmpod enter` and `kvmpod run --interactive`: raw mode and its size.

In raw mode every key (^C, ^Z, ^D included) goes to the pod's pty as a byte, and the pty's line
discipline in the guest does what a terminal does; the local terminal only shows bytes. The
saved settings come back on every way out: the context's exit (normal, exception) and restore(),
which callers also run from their signal paths.
"""

from __future__ import annotations

import os
import termios
import tty
from types import TracebackType


def is_terminal(fd: int) -> bool:
    return os.isatty(fd)


def window_size(fd: int) -> tuple[int, int] | None:
    """(rows, cols) of the terminal on `fd`, or None when it is not one or reports no size."""
    try:
        size = os.get_terminal_size(fd)
    except OSError:
        return None
    return (size.lines, size.columns) if size.lines and size.columns else None


class RawTerminal:
    """`with RawTerminal(fd):` puts the terminal in raw mode and restores it however the block ends."""

    def __init__(self, fd: int):
        self.fd = fd
        self._saved: list | None = None

    def __enter__(self) -> "RawTerminal":
        self._saved = termios.tcgetattr(self.fd)
        try:
            tty.setraw(self.fd, termios.TCSANOW)
        except BaseException:
            self.restore()
            raise
        return self

    def restore(self) -> None:
        """Put the saved settings back (once; later calls do nothing). Output already queued is
        written first (TCSADRAIN), so the last bytes of the session are not cut off."""
        saved, self._saved = self._saved, None
        if saved is not None:
            try:
                termios.tcsetattr(self.fd, termios.TCSADRAIN, saved)
            except termios.error:
                pass  # the terminal has gone (hangup): nothing left to restore

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.restore()
