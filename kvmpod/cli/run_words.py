"""`kvmpod run`'s words (rkt's: pod flags, then IMAGE [app flags] [-- ARGS] [---] [IMAGE2 ...]): where the
pod flags end and each app's flags begin. Part of the grammar (parser.py), so it imports nothing heavy."""

from __future__ import annotations

import argparse

from kvmpod.cli.types import KvmpodParser as _Parser
from kvmpod.cli.types import env_pair
from kvmpod.errors import UsageError

APP_SEPARATOR = "---"


def app_parser() -> _Parser:
    """Per-app flags: they follow the image they apply to."""
    p = _Parser(prog="kvmpod run IMAGE", add_help=False)
    p.add_argument("--exec", metavar="PATH", help="run PATH instead of the image's app.exec[0]")
    p.add_argument("--set-env", action="append", type=env_pair, default=[], metavar="NAME=VALUE")
    p.add_argument("--user", help="user name or number (names resolve in the image's /etc/passwd)")
    p.add_argument("--group", help="group name or number (names resolve in the image's /etc/group)")
    p.add_argument("--working-dir", metavar="DIR", help="absolute working directory in the app's rootfs")
    p.add_argument("--name", help="the app's name in the pod (default: from the image name)")
    p.add_argument("--readonly-rootfs", action="store_true", help="mount the app's rootfs read-only")
    p.add_argument("--mount", action="append", default=[], metavar="volume=NAME,target=PATH",
                   help="mount the pod volume NAME at PATH in this app (docs/volumes.md)")
    return p


def app_flag_names() -> set[str]:
    return {flag for action in app_parser()._actions for flag in action.option_strings}


def takes_value(parser: argparse.ArgumentParser) -> dict[str, bool]:
    """Each option string of `parser`, and whether it is followed by a value."""
    return {flag: action.nargs != 0 for action in parser._actions for flag in action.option_strings}


def split_run_words(words: list[str], pod_parser: argparse.ArgumentParser) -> tuple[list[str], str | None, list[str]]:
    """rkt's `run [pod flags] IMAGE ...`: the pod flags (each with its value), the first IMAGE, and the
    rest (its app flags, `-- ARGS`, more images). The first word that is neither a pod flag nor a pod
    flag's value is the IMAGE, so a flag kvmpod does not know is named as such, not taken for one."""
    pod_flags = takes_value(pod_parser)
    app_only = app_flag_names() - set(pod_flags)  # --set-env is both
    i = 0
    while i < len(words):
        word = words[i]
        if word in ("--", APP_SEPARATOR):  # no IMAGE: cmd_run says what is wrong (--pod-manifest or not)
            return words[:i], None, words[i:]
        if not word.startswith("-") or word == "-":
            return words[:i], word, words[i + 1:]
        name, has_value, _ = word.partition("=")
        if name in pod_flags:
            i += 2 if pod_flags[name] and not has_value else 1
            continue
        if name.startswith("-") and not name.startswith("--") and all(f"-{c}" in pod_flags and not pod_flags[f"-{c}"]
                                                                      for c in name[1:]):
            i += 1  # short switches together (-id)
            continue
        if name in app_only:
            raise UsageError(f"run: {name} is an app flag: it goes after the IMAGE it applies to "
                             "(a --pod-manifest gives each app's settings in the manifest)")
        raise UsageError(f"run: unknown flag {name} (pod flags go before the first IMAGE; kvmpod run --help)")
    return words, None, []
