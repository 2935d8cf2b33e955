"""Importing kvmpod's modules without Python's cyclic garbage collector, in kvmpod's own processes.

An import makes objects that live as long as the process (classes, functions, the methods dataclasses
generate), and allocating them runs the collector every 700 or so: `kvmpod run /bin/true` went through
63 collections that found almost nothing and cost 16-19 ms (measured with gc.callbacks on the test
machine, 2026-12-07, a run of ~0.55 s). Pausing the collector alone gains nothing: the first
collection after it scans everything the imports made. So the survivors are frozen (gc.freeze(): left
out of every later collection) before the collector is back on: 21 collections, 3-6 ms. Reference
counting frees what it can throughout.

Freezing is only for a process that is kvmpod's own (its entry points say so: `kvmpod`, kvmpod-oci,
the stage1 entry, the API's worker): a program using the Python API keeps its heap as it was, and
these imports run with its collector as it was.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

_own_process = False


def own_the_process() -> None:
    """The `kvmpod` command's entry point: this interpreter is kvmpod's alone."""
    global _own_process
    _own_process = True


@contextmanager
def imports_without_gc() -> Iterator[None]:
    if not (_own_process and gc.isenabled()):
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        gc.enable()
