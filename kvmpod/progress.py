"""Progress bars for long imports, downloads and conversions: shown on a terminal, silent otherwise.

rich is imported only when a bar is actually drawn, so scripts and the fast run path never pay for it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

Advance = Callable[[int], None]


def _no_progress(_: int) -> None:
    pass


@contextmanager
def progress(description: str, total: int | None) -> Iterator[Advance]:
    """Yield `advance(n_bytes)`; a transient bar on stderr when it is a terminal, a no-op otherwise."""
    if not sys.stderr.isatty():
        yield _no_progress
        return
    from rich.console import Console
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                               TransferSpeedColumn)

    columns = [TextColumn("{task.description}"), BarColumn(), DownloadColumn(binary_units=True),
               TransferSpeedColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)
