"""The parser class and argument types every kvmpod command shares."""

from __future__ import annotations

import argparse
import re
from typing import NoReturn

from kvmpod.errors import UsageError
from kvmpod.image.names import AC_NAME


class KvmpodParser(argparse.ArgumentParser):
    """argparse, but usage errors are KvmpodErrors: one line, exit code 125."""

    run_parser: argparse.ArgumentParser  # the top-level parser's `run` subcommand

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}")


def env_pair(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=VALUE")
    return name, value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from e
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def duration(text: str) -> float:
    """Seconds from a duration like 90, 2s, 1.5s, 5m, 1h30m (units ms, s, m, h, d; none: seconds)."""
    if re.fullmatch(r"\d+(\.\d+)?", text):
        seconds = float(text)
    elif re.fullmatch(f"(?:{_DURATION.pattern})+", text):
        seconds = sum(float(n) * _DURATION_UNITS[u] for n, u in _DURATION.findall(text))
    else:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 30s, 5m or 1h30m")
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be more than 0")
    return seconds


def memory_mib(text: str) -> int:
    units = {"": 1, "m": 1, "mi": 1, "mib": 1, "g": 1024, "gi": 1024, "gib": 1024}
    number = text.rstrip("gGmMiIbB")
    unit = text[len(number):].lower()
    if not number.isdigit() or unit not in units:
        raise argparse.ArgumentTypeError(f"{text!r} is not a memory size like 256M or 1G")
    mib = int(number) * units[unit]
    if mib < 64:
        raise argparse.ArgumentTypeError(f"{text}: a pod needs at least 64 MiB")
    return mib


_HOSTNAME_LABEL = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")


def hostname(text: str) -> str:
    """RFC 1123 host name: dot-separated labels of letters, digits and inner dashes, at most 64 bytes
    (the kernel's limit; it travels on the guest kernel command line, so nothing else may be in it)."""
    if len(text) > 64 or not all(_HOSTNAME_LABEL.match(label) for label in text.split(".")):
        raise argparse.ArgumentTypeError(f"{text!r} is not a host name (letters, digits, '-' and '.')")
    return text


def annotation(text: str) -> tuple[str, str]:
    """NAME=VALUE with NAME an AC Name (spec/pods.md)."""

    name, value = env_pair(text)
    if not AC_NAME.match(name):
        raise argparse.ArgumentTypeError(f"{name!r} is not an AC Name (lower-case letters, digits, dashes)")
    return name, value
