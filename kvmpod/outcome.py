"""How a kvmpod command ends: a failure as one line on stderr and its exit status, logging set up
alike, and the exit itself. Shared by the CLI (kvmpod/cli) and a pod's process coming back from
kvmpod-relay (kvmpod/pod/resume.py), which must not pay for importing every command."""

from __future__ import annotations

import logging
import os
import sys
import traceback
from typing import Callable

from kvmpod.errors import EXIT_KVMPOD_FAILURE, KvmpodError


def exit_now(code: int) -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (BrokenPipeError, ValueError):
            code = code or EXIT_KVMPOD_FAILURE
    logging.shutdown()
    os._exit(code)


def configure_logging(debug: bool) -> None:
    """Warnings and errors from anyone; with --debug, kvmpod's own debug lines only: third-party
    libraries (pyroute2's netlink dumps, qemu.qmp's messages, asyncio's selector) stay at WARNING,
    since CI logs are read by people."""
    logging.basicConfig(level=logging.WARNING, format="kvmpod: %(message)s")
    logging.getLogger("kvmpod").setLevel(logging.DEBUG if debug else logging.WARNING)
    if not debug:
        logging.getLogger("asyncio").setLevel(logging.CRITICAL)  # its noise is ours to explain


def causes(error: BaseException) -> list[BaseException]:
    """What led to `error`, nearest first: its chain of __cause__ (raise ... from) and __context__."""
    chain: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    return chain[1:]


def print_causes(error: BaseException) -> None:
    """--debug: under the one-line error, each cause on a line of its own, then the full traceback."""
    for cause in causes(error):
        print(f"kvmpod: caused by: {type(cause).__name__}: {cause}", file=sys.stderr)
    traceback.print_exception(error, file=sys.stderr)


def reporting_failures(command: Callable[[], int], debug: Callable[[], bool]) -> int:
    """Run `command`; a failure becomes one line on stderr and its exit status. With --debug the line
    is followed by the causes it was raised from (exceptions are chained: `raise ... from e`) and the
    traceback; without it, nothing more."""
    try:
        return command()
    except KvmpodError as e:
        print(f"kvmpod: error: {e}", file=sys.stderr)
        if debug():
            print_causes(e)
        return e.exit_code
    except KeyboardInterrupt:
        print("kvmpod: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return EXIT_KVMPOD_FAILURE
    except Exception as e:  # a bug: one line for users, the traceback with --debug
        if debug():
            raise
        print(f"kvmpod: internal error: {type(e).__name__}: {e} (run with --debug for details)", file=sys.stderr)
        return EXIT_KVMPOD_FAILURE
