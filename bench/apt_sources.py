"""The Debian mirror of this machine's apt configuration, for the image bench's debootstrap (bench/image.py).

apt reads /etc/apt/sources.list and /etc/apt/sources.list.d/*.list in the one-line format
(`deb [options] URI suite [component...]`) and /etc/apt/sources.list.d/*.sources in the deb822
format (paragraphs of `Types:`, `URIs:`, `Suites:`, `Components:`, `Enabled:` fields); see
sources.list(5). Files with other names (`*.disabled`, `*.save`) are ignored, as apt ignores them.
The mirror is the first URI, in apt's reading order, of an enabled `deb` source that serves the
suite with its `main` component. Not a test module; asserts nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path


class NoMirror(Exception):
    """No apt source of the machine serves the suite: said in one line naming the files read."""


@dataclass(frozen=True)
class Source:
    types: tuple[str, ...]
    uris: tuple[str, ...]
    suites: tuple[str, ...]
    components: tuple[str, ...]
    enabled: bool
    origin: str  # "FILE:LINE" where the source was read


def source_files(root: Path = Path("/")) -> list[Path]:
    """The files apt reads, in its order: sources.list, then sources.list.d/ sorted by name."""
    etc = root / "etc" / "apt"
    files = [etc / "sources.list"] if (etc / "sources.list").is_file() else []
    parts = etc / "sources.list.d"
    if parts.is_dir():
        files += sorted(p for p in parts.iterdir() if p.is_file() and p.suffix in (".list", ".sources"))
    return files


def parse_one_line(text: str, origin: str) -> list[Source]:
    """Sources of the one-line format: `deb [opt=value ...] URI suite [component ...]`, '#' comments."""
    found = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        kind, _, rest = line.partition(" ")
        rest = rest.strip()
        enabled = True
        if rest.startswith("["):  # options, which may hold spaces: "[ arch=amd64 signed-by=/x ]"
            options, _, rest = rest[1:].partition("]")
            enabled = not re.search(r"(^|\s)enabled=no(\s|$)", options.strip())
        words = rest.split()
        if len(words) < 2:
            continue  # apt refuses such a line; it cannot name a mirror
        found.append(Source((kind,), (words[0],), (words[1],), tuple(words[2:]), enabled, f"{origin}:{n}"))
    return found


def parse_deb822(text: str, origin: str) -> list[Source]:
    """Sources of the deb822 format: paragraphs split by blank lines, `Field: value` with continuation
    lines indented, '#' comment lines, field names case-insensitive, `Enabled: no` to switch one off."""
    found = []
    fields: dict[str, str] = {}
    start = 0
    last = ""

    def close() -> None:
        if fields:
            def words(name: str) -> tuple[str, ...]:
                return tuple(fields.get(name, "").split())
            enabled = fields.get("enabled", "yes").strip().lower() != "no"
            found.append(Source(words("types"), words("uris"), words("suites"), words("components"), enabled,
                                f"{origin}:{start}"))
        fields.clear()

    for n, line in enumerate([*text.splitlines(), ""], 1):
        if line.startswith("#"):
            continue
        if not line.strip():
            close()
            continue
        if line[0] in " \t" and last:  # a continuation of the field before
            fields[last] += " " + line.strip()
            continue
        name, colon, value = line.partition(":")
        if not colon:
            continue
        if not fields:
            start = n
        last = name.strip().lower()
        fields[last] = value.strip()
    return found


def read_sources(root: Path = Path("/")) -> list[Source]:
    sources: list[Source] = []
    for path in source_files(root):
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue  # unreadable: apt would say so; another file may still name the mirror
        parse = parse_deb822 if path.suffix == ".sources" else parse_one_line
        sources += parse(text, str(path))
    return sources


def debian_mirror(suite: str, root: Path = Path("/")) -> str:
    """The URI (no trailing '/') of the first enabled `deb` source serving `suite` with `main`."""
    for source in read_sources(root):
        if source.enabled and "deb" in source.types and suite in source.suites and "main" in source.components:
            for uri in source.uris:
                if uri.startswith(("http://", "https://", "ftp://", "file:/")):
                    return uri.rstrip("/")
    read = ", ".join(str(p) for p in source_files(root)) or f"no {root / 'etc/apt/sources.list'} nor " \
        f"{root / 'etc/apt/sources.list.d'}/*.list|*.sources"
    raise NoMirror(f"no enabled 'deb' apt source serves {suite} main (read: {read}); "
                   f"add one (a line 'deb MIRROR-URI {suite} main' in /etc/apt/sources.list)")
