"""The `kvmpod` command: parse (kvmpod/cli/parser.py), then import and run the one command asked for.
Each command module (run, pods, interact, images, setup) imports what it needs at its top; importing
only the command that runs is what keeps `kvmpod --help` fast."""

from __future__ import annotations

import importlib
import sys
from typing import Callable, Sequence

from kvmpod import paths
from kvmpod.cli.parser import build_parser, parse
from kvmpod.outcome import configure_logging, exit_now, reporting_failures
from kvmpod.startup import imports_without_gc, own_the_process

__all__ = ["build_parser", "entry", "main"]


def command_function(name: str) -> Callable[..., int]:
    """"MODULE:FUNCTION" of kvmpod/cli/ (the parser's names for its commands), imported now."""
    module, _, function = name.partition(":")
    found: Callable[..., int] = getattr(importlib.import_module(f"kvmpod.cli.{module}"), function)
    return found


def entry() -> None:
    """The `kvmpod` command: main(), then out at once. By then every pod, file and child kvmpod made
    is dealt with, and tearing the interpreter down would only add ~20-50 ms to each command."""
    own_the_process()
    exit_now(main())


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    debug = False

    def command() -> int:
        nonlocal debug
        ns = parse(parser, list(sys.argv[1:] if argv is None else argv))
        if not getattr(ns, "func", None):
            parser.print_help()
            return 2
        if ns.dir:
            paths.set_store_dir(ns.dir)
        debug = getattr(ns, "debug", False)
        configure_logging(debug)
        with imports_without_gc():
            function = command_function(ns.func)
        return function(ns)

    return reporting_failures(command, lambda: debug)
