"""How a kvmpod command ends: a failure as one line on stderr and its exit status, logging set up
alike, and the exit itself. Shared by the CLI (kvmpod/cli) and a pod's process coming back from
kvmpod-relay (kvmpod/pod/resume.py), which must not pay for importing every command."""

from __future__ import annotations

import logging
import os
import sys
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
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="kvmpod: %(message)s")
    if not debug:
        logging.getLogger("asyncio").setLevel(logging.CRITICAL)  # its noise is ours to explain


def reporting_failures(command: Callable[[], int], debug: Callable[[], bool]) -> int:
    """Run `command`; a failure becomes one line on stderr and its exit status (a traceback with --debug)."""
    try:
        return command()
    except KvmpodError as e:
        print(f"kvmpod: error: {e}", file=sys.stderr)
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
